"""The event-kind vocabulary: today's OneSignal kinds and the old spellings that map onto them.

OneSignal renamed and misspelled kinds over the years (``message.iam.displayed``,
``message.email.supressed``, ``message.push receivedp``...). Every event is published under
today's name so that consumers and tag rules match one spelling; the raw spelling stays in the
event's ``original_kind``. Kinds we do not know pass through unchanged (lowercased): OneSignal
adds kinds, and a new kind must not be lost because this table is older.
"""

from __future__ import annotations

import re

__all__ = [
    "CHANNELS",
    "EVENT_STREAM_KINDS",
    "KNOWN_KINDS",
    "SOURCE_FORMATS",
    "TOPIC_CHANNELS",
    "canonical_kind",
    "split_kind",
]

# The body layouts a source may declare (``sources[].format``).
SOURCE_FORMATS = ("event-stream", "journey", "web-push")
# The message channels of OneSignal's kinds (``message.<channel>.<action>``); a topic each.
CHANNELS = ("push", "email", "sms", "iam", "live_activity")
# The channels that name a topic (``kafka.topic``): the message channels and Journey webhooks.
# Input never adds one: an event of another channel (``message.whatsapp.sent``, a kind with no
# channel) is dead-lettered or goes to ``kafka.unknown_channel_topic`` (core/ingest.py).
TOPIC_CHANNELS = (*CHANNELS, "journey")

# The Event Streams kind reference (26 kinds), channel by channel.
EVENT_STREAM_KINDS: frozenset[str] = frozenset(
    {
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
    }
)

# Plus what only the browser SDK reports, and the kinds a Journey webhook step implies.
KNOWN_KINDS: frozenset[str] = EVENT_STREAM_KINDS | {
    "message.push.displayed",
    "message.push.dismissed",
    "journey.webhook",
    "journey.webhook.text",  # a Journey webhook step with a plain-text body
}

# Old or misspelled actions, written without separators (the lookup strips them), mapped to
# today's action. An alias only applies when it yields a known kind, so ``displayed`` becomes
# ``impression`` for in-app messages but a web-push ``message.push.displayed`` stays itself.
_ACTION_ALIASES: dict[str, str] = {
    "displayed": "impression",
    "pagedisplayed": "page_displayed",
    "hardbounced": "bounced",
    "hardbounce": "bounced",
    "bounce": "bounced",
    "supressed": "suppressed",
    "suppress": "suppressed",
    "resporedasspam": "reported_as_spam",
    "reportedasspam": "reported_as_spam",
    "spam": "reported_as_spam",
    "receivedp": "received",
    "receive": "received",
    "send": "sent",
    "click": "clicked",
    "open": "opened",
    "fail": "failed",
    "deliver": "delivered",
    "unsubscribe": "unsubscribed",
}

# Channel spellings seen in hand-written templates ("live-activity", "liveActivity", "in-app").
_CHANNEL_ALIASES: dict[str, str] = {
    "liveactivity": "live_activity",
    "inapp": "iam",
}

_SEPARATORS = re.compile(r"[\s._\-/:]+")
_NOT_TOKEN = re.compile(r"[^a-z0-9_]+")
_MAX_CHANNEL_CHARS = 64


def _take_channel(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(channel, remaining tokens) when the tokens start with a channel, else None."""
    if len(tokens) >= 2:
        joined = _CHANNEL_ALIASES.get(tokens[0] + tokens[1])
        if joined is not None:
            return joined, tokens[2:]
    if not tokens:
        return None
    first = _CHANNEL_ALIASES.get(tokens[0], tokens[0])
    if first in CHANNELS or first == "journey":
        return first, tokens[1:]
    return None


def _known_from_tokens(tokens: list[str]) -> str | None:
    """The known kind these separator-free tokens spell, if any."""
    if tokens[:1] == ["message"]:
        tokens = tokens[1:]
    taken = _take_channel(tokens)
    if taken is None or not taken[1]:
        return None
    channel, rest = taken
    prefix = "journey" if channel == "journey" else f"message.{channel}"
    action = "_".join(rest)
    # "journey.webhook.text" is the one known kind whose action has two parts
    dotted = ".".join(rest)
    for candidate_action in (action, _ACTION_ALIASES.get(action.replace("_", "")), dotted):
        if candidate_action is not None:
            candidate = f"{prefix}.{candidate_action}"
            if candidate in KNOWN_KINDS:
                return candidate
    return None


def canonical_kind(kind: str) -> str:
    """Today's name for ``kind``; an unknown kind comes back trimmed and lowercased.

    Never raises: the kind is data from the sender, and an odd kind is still an event.
    """
    text = str(kind).lower().strip()
    if text in KNOWN_KINDS:
        return text
    tokens = [t for t in _SEPARATORS.split(text) if t]
    known = _known_from_tokens(tokens) if tokens else None
    return known if known is not None else text


def _channel_token(text: str) -> str:
    token = _NOT_TOKEN.sub("_", text).strip("_")[:_MAX_CHANNEL_CHARS].strip("_")
    return token or "unknown"


def split_kind(kind: str) -> tuple[str, str]:
    """(channel, action) of a kind, e.g. ``("push", "clicked")``.

    The channel is always a ``[a-z0-9_]+`` token; ``unknown`` when the kind does not say.
    ``message.<channel>.<action>`` is OneSignal's shape, so a future channel
    (``message.whatsapp.sent``) still gets its own name in the event, but only the
    :data:`TOPIC_CHANNELS` name a topic.
    """
    text = canonical_kind(kind)
    parts = text.split(".")
    if parts[0] == "message" and len(parts) >= 2:
        action = ".".join(parts[2:]).strip() or "unknown"
        return _channel_token(parts[1]), action
    if len(parts) >= 2:
        first = _CHANNEL_ALIASES.get(parts[0], parts[0])
        if first in CHANNELS or first == "journey":
            return first, ".".join(parts[1:]).strip() or "unknown"
    return "unknown", text or "unknown"
