"""The event-kind vocabulary: today's kinds, the old spellings, and (channel, action)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.kinds import EVENT_STREAM_KINDS, KNOWN_KINDS, canonical_kind, split_kind

# Copied by hand from the Event Streams kind reference (onesignal-reference.md, 1.3).
REFERENCE_TABLE = [
    "message.push.sent",
    "message.push.received",
    "message.push.clicked",
    "message.push.failed",
    "message.push.unsubscribed",
    "message.iam.impression",
    "message.iam.clicked",
    "message.iam.page_displayed",
    "message.email.sent",
    "message.email.received",
    "message.email.opened",
    "message.email.clicked",
    "message.email.unsubscribed",
    "message.email.reported_as_spam",
    "message.email.bounced",
    "message.email.failed",
    "message.email.suppressed",
    "message.sms.sent",
    "message.sms.failed",
    "message.sms.delivered",
    "message.sms.undelivered",
    "message.live_activity.sent",
    "message.live_activity.delivered",
    "message.live_activity.unsubscribed",
    "message.live_activity.failed",
    "message.live_activity.clicked",
]

TOKEN = re.compile(r"[a-z0-9_]+")


def test_the_reference_table_has_26_kinds_and_they_are_all_known() -> None:
    assert len(set(REFERENCE_TABLE)) == 26
    assert frozenset(REFERENCE_TABLE) == EVENT_STREAM_KINDS
    extras = {
        "message.push.displayed",
        "message.push.dismissed",
        "journey.webhook",
        "journey.webhook.text",
    }
    assert frozenset(REFERENCE_TABLE) | extras == KNOWN_KINDS


@pytest.mark.parametrize("kind", sorted(KNOWN_KINDS))
def test_known_kinds_are_their_own_canonical_name(kind: str) -> None:
    assert canonical_kind(kind) == kind


@pytest.mark.parametrize(
    ("legacy", "today"),
    [
        # older snapshots of the kind reference
        ("message.iam.displayed", "message.iam.impression"),
        ("message.iam.pagedisplayed", "message.iam.page_displayed"),
        ("message.email.hardbounced", "message.email.bounced"),
        ("message.email.supressed", "message.email.suppressed"),
        ("message.email.resporedasspam", "message.email.reported_as_spam"),
        ("message.push receivedp", "message.push.received"),
        # the even older action vocabulary
        ("message.email.spam", "message.email.reported_as_spam"),
        ("message.email.bounce", "message.email.bounced"),
        ("message.iam.impression", "message.iam.impression"),
        ("message.iam.page_displayed", "message.iam.page_displayed"),
        # separators, case and padding from hand-written templates
        ("message.push received", "message.push.received"),
        ("message.live-activity.sent", "message.live_activity.sent"),
        ("message.liveActivity.clicked", "message.live_activity.clicked"),
        ("Message.Push.Clicked", "message.push.clicked"),
        ("  MESSAGE.EMAIL.OPENED\n", "message.email.opened"),
        ("message.email.reported-as-spam", "message.email.reported_as_spam"),
        ("message.email.reportedAsSpam", "message.email.reported_as_spam"),
        ("message.iam.page displayed", "message.iam.page_displayed"),
        ("message.in-app.clicked", "message.iam.clicked"),
        ("push.clicked", "message.push.clicked"),
        ("Journey Webhook", "journey.webhook"),
    ],
)
def test_legacy_and_misspelled_kinds_map_to_todays_name(legacy: str, today: str) -> None:
    assert canonical_kind(legacy) == today


def test_displayed_is_only_an_alias_where_it_means_impression() -> None:
    # web-push reports message.push.displayed itself; it must not become an "impression"
    assert canonical_kind("message.push.displayed") == "message.push.displayed"
    assert canonical_kind("message.iam.displayed") == "message.iam.impression"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("  Custom.Event  ", "custom.event"),
        ("message.whatsapp.sent", "message.whatsapp.sent"),
        ("message.sms.spam", "message.sms.spam"),  # an alias only applies if it yields a kind
        ("message.push", "message.push"),
        ("", ""),
        ("   ", ""),
        ("message", "message"),
    ],
)
def test_unknown_kinds_pass_through_trimmed_and_lowercased(kind: str, expected: str) -> None:
    assert canonical_kind(kind) == expected


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("message.push.clicked", ("push", "clicked")),
        ("message.live_activity.sent", ("live_activity", "sent")),
        ("message.email.reported_as_spam", ("email", "reported_as_spam")),
        ("message.iam.page_displayed", ("iam", "page_displayed")),
        ("journey.webhook", ("journey", "webhook")),
        ("message.email.hardbounced", ("email", "bounced")),
        ("Message.Push Receivedp", ("push", "received")),
        ("message.whatsapp.sent", ("whatsapp", "sent")),
        ("message.push", ("push", "unknown")),
        ("sms.something_new", ("sms", "something_new")),
        ("custom", ("unknown", "custom")),
        ("foo.bar", ("unknown", "foo.bar")),
        ("", ("unknown", "unknown")),
        ("message.Wh@ts App!.sent", ("wh_ts_app", "sent")),
        ("message.!!!.sent", ("unknown", "sent")),
    ],
)
def test_split_kind(kind: str, expected: tuple[str, str]) -> None:
    assert split_kind(kind) == expected


@pytest.mark.parametrize("kind", sorted(KNOWN_KINDS))
def test_split_kind_of_known_kinds_puts_them_back_together(kind: str) -> None:
    channel, action = split_kind(kind)
    rebuilt = f"{channel}.{action}" if channel == "journey" else f"message.{channel}.{action}"
    assert rebuilt == kind


@st.composite
def spelling_variants(draw: st.DrawFn) -> tuple[str, str]:
    """A known kind as a person might type it: any case, other separators, padding."""
    kind = draw(st.sampled_from(sorted(KNOWN_KINDS)))
    out = []
    for ch in kind:
        if ch in "._":
            out.append(draw(st.sampled_from([ch, " ", "-", "  ", " - "])) if ch == "." else ch)
        else:
            out.append(ch.upper() if draw(st.booleans()) else ch)
    pad = draw(st.sampled_from(["", " ", "\t", "\n "]))
    return kind, pad + "".join(out) + pad


@settings(max_examples=300, deadline=None)
@given(spelling_variants())
def test_spelling_variants_of_known_kinds_map_back(case: tuple[str, str]) -> None:
    kind, variant = case
    assert canonical_kind(variant) == kind


kind_like_text = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda parts: ".".join(parts),
        st.lists(
            st.sampled_from(
                [
                    "message",
                    "push",
                    "email",
                    "iam",
                    "live",
                    "activity",
                    "spam",
                    "Displayed",
                    "bounce",
                    "journey",
                    "webhook",
                    " ",
                    "-",
                    "",
                    "x",
                    "İ",
                    "ß",
                ]
            ),
            max_size=5,
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(kind_like_text)
def test_canonical_kind_is_idempotent_and_split_kind_names_a_topic_token(kind: str) -> None:
    once = canonical_kind(kind)
    assert canonical_kind(once) == once
    channel, action = split_kind(kind)
    assert TOKEN.fullmatch(channel)
    assert action
    assert split_kind(once) == (channel, action)
