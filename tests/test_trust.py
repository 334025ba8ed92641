"""Client-IP resolution: strict parsing, rightmost-untrusted walk, and fail-closed behaviour."""

from __future__ import annotations

import netaddr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.trust import ClientIP, TrustedProxies, parse_ip, resolve_client_ip

PROXIES = TrustedProxies(["10.0.0.0/8", "130.211.0.0/22", "fd00::/8", "::1/128"])


def xff(*lines: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", line.encode("latin-1")) for line in lines]


def fwd(*lines: str) -> list[tuple[bytes, bytes]]:
    return [(b"forwarded", line.encode("latin-1")) for line in lines]


# ---------------------------------------------------------------------------------------------
# parse_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("255.255.255.255:65535", "255.255.255.255"),
        (" 1.2.3.4\t", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::1", "::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("[::ffff:1.2.3.4]:80", "1.2.3.4"),
        ("::ffff:0102:0304", "1.2.3.4"),
    ],
)
def test_parse_ip_accepts(text: str, expected: str) -> None:
    ip = parse_ip(text)
    assert ip is not None
    assert str(ip) == expected


def test_parse_ip_mapped_becomes_ipv4() -> None:
    ip = parse_ip("::ffff:10.1.2.3")
    assert ip is not None and ip.version == 4


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "unknown",
        "_hidden",
        "_abc:_def",
        "junk",
        "127.1",
        "010.0.0.1",
        "01.2.3.4",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "0x7f.0.0.1",
        "2130706433",
        "fe80::1%eth0",
        "[fe80::1%eth0]:80",
        "fe80::1%1",
        "1.2.3.4:",
        "1.2.3.4:65536",
        "1.2.3.4:http",
        "1.2.3.4:123456",
        "[1.2.3.4]",
        "[1.2.3.4]:80",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "[2001:db8::1]:99999",
        "2001:db8:::1",
        "2001:db8::1/64",
        "1.2.3.4/32",
        "1.2.3.4 5.6.7.8",
        "\u0661.\u0662.\u0663.\u0664",  # Arabic-Indic digits
        '"1.2.3.4"',
    ],
)
def test_parse_ip_rejects(text: str) -> None:
    assert parse_ip(text) is None


# ---------------------------------------------------------------------------------------------
# TrustedProxies


def test_trusted_proxies_membership() -> None:
    assert netaddr.IPAddress("10.9.8.7") in PROXIES
    assert netaddr.IPAddress("130.211.3.255") in PROXIES
    assert netaddr.IPAddress("130.211.4.0") not in PROXIES
    assert netaddr.IPAddress("fd12::1") in PROXIES
    assert netaddr.IPAddress("::ffff:10.0.0.1") in PROXIES
    assert netaddr.IPAddress("2001:db8::1") not in PROXIES
    assert "10.0.0.1" not in PROXIES  # only addresses, never strings


def test_trusted_proxies_rejects_bad_cidr() -> None:
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/8", "127.1/32"])


# ---------------------------------------------------------------------------------------------
# resolve_client_ip, X-Forwarded-For


def test_untrusted_peer_ignores_forged_header() -> None:
    got = resolve_client_ip("203.0.113.7", xff("34.90.0.1"), PROXIES)
    assert got == ClientIP("203.0.113.7", via_proxy=False, malformed=False)


def test_untrusted_peer_with_port_and_no_headers() -> None:
    assert resolve_client_ip("203.0.113.7", [], PROXIES).ip == "203.0.113.7"


def test_no_peer_is_unknown() -> None:
    assert resolve_client_ip(None, xff("34.90.0.1"), PROXIES) == ClientIP("")


def test_unparseable_peer_is_unknown_and_ignores_headers() -> None:
    got = resolve_client_ip("testclient", xff("34.90.0.1"), PROXIES)
    assert got.ip == "" and got.malformed


def test_trusted_peer_without_header_is_the_peer() -> None:
    assert resolve_client_ip("10.0.0.1", [], PROXIES) == ClientIP("10.0.0.1")


def test_trusted_peer_rightmost_untrusted() -> None:
    # attacker-written, real client, LB forwarding-rule address (trusted), GFE peer
    got = resolve_client_ip("130.211.0.9", xff("34.90.0.1, 198.51.100.4, 10.1.2.3"), PROXIES)
    assert got == ClientIP("198.51.100.4", via_proxy=True, malformed=False)


def test_multiple_header_lines_are_concatenated_in_order() -> None:
    got = resolve_client_ip("10.0.0.1", xff("34.90.0.1", "198.51.100.4", "10.2.2.2"), PROXIES)
    assert got.ip == "198.51.100.4"
    # Reading only the first line would answer 34.90.0.1; only the last, the peer.
    got = resolve_client_ip("10.0.0.1", xff("34.90.0.1, 198.51.100.4", "10.2.2.2"), PROXIES)
    assert got.ip == "198.51.100.4"


def test_other_headers_between_lines_do_not_matter() -> None:
    headers = [
        (b"x-forwarded-for", b"34.90.0.1"),
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"198.51.100.4"),
    ]
    assert resolve_client_ip("10.0.0.1", headers, PROXIES).ip == "198.51.100.4"


def test_all_trusted_chain_gives_leftmost() -> None:
    got = resolve_client_ip("10.0.0.1", xff("10.0.0.3, 10.0.0.2"), PROXIES)
    assert got == ClientIP("10.0.0.3", via_proxy=True, malformed=False)


def test_empty_list_elements_are_ignored() -> None:
    got = resolve_client_ip("10.0.0.1", xff(" , 198.51.100.4,, 10.0.0.2 ,"), PROXIES)
    assert got.ip == "198.51.100.4" and not got.malformed


@pytest.mark.parametrize("garbage", ["unknown", "127.1", "_x", "1.2.3.4:99999", "fe80::1%eth0"])
def test_garbage_in_walk_fails_closed(garbage: str) -> None:
    got = resolve_client_ip("10.0.0.1", xff(f"198.51.100.4, {garbage}, 10.0.0.2"), PROXIES)
    assert got == ClientIP("10.0.0.2", via_proxy=True, malformed=True)


def test_garbage_right_next_to_peer_fails_closed_to_peer() -> None:
    got = resolve_client_ip("10.0.0.1", xff("198.51.100.4, junk"), PROXIES)
    assert got == ClientIP("10.0.0.1", via_proxy=False, malformed=True)


def test_garbage_left_of_client_is_irrelevant() -> None:
    got = resolve_client_ip("10.0.0.1", xff("junk, 127.1, 198.51.100.4, 10.0.0.2"), PROXIES)
    assert got == ClientIP("198.51.100.4", via_proxy=True, malformed=False)


def test_ports_in_xff() -> None:
    got = resolve_client_ip("10.0.0.1", xff("198.51.100.4:5555, 10.0.0.2:80"), PROXIES)
    assert got.ip == "198.51.100.4"
    got = resolve_client_ip("10.0.0.1", xff("[2001:db8::9]:443"), PROXIES)
    assert got.ip == "2001:db8::9"


def test_ipv6_peer_and_hops() -> None:
    got = resolve_client_ip("fd00::1", xff("2001:db8::bad, 2001:DB8::7, fd00::2"), PROXIES)
    assert got == ClientIP("2001:db8::7", via_proxy=True)
    assert resolve_client_ip("2001:db8::1", xff("1.2.3.4"), PROXIES).ip == "2001:db8::1"


def test_ipv4_mapped_peer() -> None:
    # A dual-stack socket reports a trusted IPv4 proxy as ::ffff:10.0.0.1.
    got = resolve_client_ip("::ffff:10.0.0.1", xff("198.51.100.4"), PROXIES)
    assert got == ClientIP("198.51.100.4", via_proxy=True)
    got = resolve_client_ip("::ffff:203.0.113.7", xff("198.51.100.4"), PROXIES)
    assert got == ClientIP("203.0.113.7")


def test_mapped_hop_is_normalized_and_can_be_trusted() -> None:
    got = resolve_client_ip("10.0.0.1", xff("198.51.100.4, ::ffff:10.0.0.9"), PROXIES)
    assert got.ip == "198.51.100.4"
    assert resolve_client_ip("10.0.0.1", xff("::ffff:198.51.100.4"), PROXIES).ip == "198.51.100.4"


def test_only_configured_header_is_read() -> None:
    headers = xff("198.51.100.4") + fwd("for=203.0.113.9")
    assert resolve_client_ip("10.0.0.1", headers, PROXIES).ip == "198.51.100.4"
    assert resolve_client_ip("10.0.0.1", headers, PROXIES, "forwarded").ip == "203.0.113.9"
    # The header the LB does not write is ignored even when it is the only one present.
    assert resolve_client_ip("10.0.0.1", fwd("for=203.0.113.9"), PROXIES).ip == "10.0.0.1"
    assert resolve_client_ip("10.0.0.1", xff("198.51.100.4"), PROXIES, "forwarded").ip == (
        "10.0.0.1"
    )


def test_header_name_is_matched_exactly() -> None:
    # ASGI servers lowercase names; a differently spelled header is another header.
    headers = [(b"x-forwarded-for-x", b"198.51.100.4")]
    assert resolve_client_ip("10.0.0.1", headers, PROXIES).ip == "10.0.0.1"


def test_unknown_header_setting_is_refused() -> None:
    with pytest.raises(ValueError):
        resolve_client_ip("10.0.0.1", [], PROXIES, "x-real-ip")


# ---------------------------------------------------------------------------------------------
# resolve_client_ip, RFC 7239 Forwarded


def resolve_fwd(*lines: str, peer: str = "10.0.0.1") -> ClientIP:
    return resolve_client_ip(peer, fwd(*lines), PROXIES, "forwarded")


def test_forwarded_quoted_bracketed_ipv6_with_port() -> None:
    got = resolve_fwd('for="[2001:db8::17]:4711";proto=https, for=10.0.0.2')
    assert got == ClientIP("2001:db8::17", via_proxy=True)


def test_forwarded_quoted_ipv4_with_port_and_other_params() -> None:
    got = resolve_fwd('for=34.90.0.1, by=10.0.0.2;for="198.51.100.4:8080";host=example.com')
    assert got.ip == "198.51.100.4"


def test_forwarded_mixed_case_parameter_names() -> None:
    assert resolve_fwd("For=198.51.100.4;PROTO=https").ip == "198.51.100.4"
    assert resolve_fwd('FOR="[2001:db8::5]"').ip == "2001:db8::5"


@pytest.mark.parametrize("node", ["unknown", "_hidden", '"_hidden"', '"unknown"'])
def test_forwarded_obfuscated_node_fails_closed(node: str) -> None:
    got = resolve_fwd(f"for=198.51.100.4, for={node}, for=10.0.0.2")
    assert got == ClientIP("10.0.0.2", via_proxy=True, malformed=True)


def test_forwarded_obfuscated_port_keeps_known_address() -> None:
    assert resolve_fwd('for="[2001:db8::17]:_p1"').ip == "2001:db8::17"
    assert resolve_fwd('for="198.51.100.4:_abc"').ip == "198.51.100.4"


def test_forwarded_comma_inside_quotes_is_not_a_separator() -> None:
    # A quoted ',' must not split the element, or "10.0.0.3" would become a hop of its own.
    got = resolve_fwd('for=198.51.100.4;host="a,for=10.0.0.3", for=10.0.0.2')
    assert got.ip == "198.51.100.4" and not got.malformed


def test_forwarded_multiple_lines_concatenated() -> None:
    assert resolve_fwd("for=34.90.0.1", "for=198.51.100.4", "for=10.0.0.2").ip == "198.51.100.4"


@pytest.mark.parametrize(
    "element",
    [
        "proto=https",  # a hop without for=
        "for=198.51.100.5;for=198.51.100.6",  # duplicate parameter
        "for",  # no '='
        'for="198.51.100.5',  # unterminated quote
        'for=198.51."100.5"',  # quote inside a token
        "for=",  # empty
        "for = 198.51.100.5",  # whitespace around '=' is not allowed
    ],
)
def test_forwarded_malformed_element_fails_closed(element: str) -> None:
    got = resolve_fwd(f"for=198.51.100.4, {element}")
    assert got == ClientIP("10.0.0.1", via_proxy=False, malformed=True)


def test_forwarded_malformed_left_of_client_is_irrelevant() -> None:
    got = resolve_fwd('for="[broken, for=198.51.100.4', "for=203.0.113.5, for=10.0.0.2")
    assert got == ClientIP("203.0.113.5", via_proxy=True)


def test_forwarded_escaped_quote_in_quoted_string() -> None:
    assert resolve_fwd(r'host="a\"b";for=198.51.100.4').ip == "198.51.100.4"


# ---------------------------------------------------------------------------------------------
# property tests against an independent reference walk

TRUSTED_V4 = netaddr.IPNetwork("10.0.0.0/8")
TRUSTED_V6 = netaddr.IPNetwork("fd00::/8")


@st.composite
def hop(draw: st.DrawFn, trusted: bool) -> netaddr.IPAddress:
    """An address known by construction to be inside or outside the trusted ranges."""
    if draw(st.booleans()):
        if trusted:
            value = draw(st.integers(TRUSTED_V4.first, TRUSTED_V4.last))
        else:
            value = draw(
                st.integers(1 << 24, (1 << 32) - 1).filter(
                    lambda v: (
                        not TRUSTED_V4.first <= v <= TRUSTED_V4.last
                        and not 0x82D30000 <= v <= 0x82D303FF
                    )  # 130.211.0.0/22
                )
            )
        return netaddr.IPAddress(value, 4)
    if trusted:
        value = draw(st.integers(TRUSTED_V6.first, TRUSTED_V6.last))
    else:  # 2000::/3, global unicast: never trusted, never IPv4-mapped
        value = draw(st.integers(0x2 << 124, (0x4 << 124) - 1))
    return netaddr.IPAddress(value, 6)


@st.composite
def xff_text(draw: st.DrawFn, ip: netaddr.IPAddress) -> str:
    port = draw(st.none() | st.integers(1, 65535))
    if ip.version == 4:
        return str(ip) if port is None else f"{ip}:{port}"
    if port is not None:
        return f"[{ip}]:{port}"
    return draw(st.sampled_from([str(ip), f"[{ip}]", ip.format(netaddr.ipv6_verbose)]))


@st.composite
def fwd_text(draw: st.DrawFn, ip: netaddr.IPAddress) -> str:
    port = draw(st.none() | st.integers(1, 65535))
    name = draw(st.sampled_from(["for", "For", "FOR", "fOr"]))
    if ip.version == 4:
        node = f'"{ip}:{port}"' if port is not None else draw(st.sampled_from([str(ip), f'"{ip}"']))
    else:
        node = f'"[{ip}]:{port}"' if port is not None else f'"[{ip}]"'
    extras = draw(st.lists(st.sampled_from(["proto=https", "by=_lb", 'host="a.example, b"'])))
    pairs = [f"{name}={node}", *extras]
    draw(st.randoms()).shuffle(pairs)
    return ";".join(pairs)


def split_lines(draw: st.DrawFn, items: list[str]) -> list[str]:
    """Spread the hops over one or more header lines, with random spacing."""
    if not items:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(items) - 1)), max_size=3)))
    lines, start = [], 0
    for cut in [*cuts, len(items)]:
        if cut > start:
            sep = draw(st.sampled_from([",", ", ", " ,\t"]))
            lines.append(sep.join(items[start:cut]))
            start = cut
    return lines


def reference(peer_trusted: bool, peer: str, chain: list[tuple[str | None, bool]]) -> str:
    """Rightmost-untrusted, written as plainly as possible: (address or None, trusted) hops."""
    if not peer_trusted:
        return peer
    answer = peer
    for address, trusted in reversed(chain):
        if address is None:
            return answer
        answer = address
        if not trusted:
            return answer
    return answer


@st.composite
def scenario(draw: st.DrawFn, fmt: str) -> tuple[str, list[tuple[bytes, bytes]], str]:
    render = xff_text if fmt == "x-forwarded-for" else fwd_text
    peer_trusted = draw(st.booleans())
    peer = draw(hop(peer_trusted))
    flags = draw(st.lists(st.booleans(), max_size=8))
    chain: list[tuple[str | None, bool]] = []
    texts: list[str] = []
    for trusted in flags:
        if draw(st.integers(0, 9)) == 0:
            bad = draw(st.sampled_from(["unknown", "_hidden", "127.1", "1.2.3.4:99999", "x"]))
            texts.append(bad if fmt == "x-forwarded-for" else f"for={bad}")
            chain.append((None, False))
            continue
        ip = draw(hop(trusted))
        texts.append(draw(render(ip)))
        chain.append((str(ip), trusted))
    lines = split_lines(draw, texts)
    name = fmt.encode()
    headers = [(name, line.encode()) for line in lines]
    other = b"forwarded" if fmt == "x-forwarded-for" else b"x-forwarded-for"
    if draw(st.booleans()):  # the header we do not read, forged
        headers.insert(draw(st.integers(0, len(headers))), (other, b"for=203.0.113.66"))
    expected = reference(peer_trusted, str(peer), chain)
    peer_text = (
        draw(st.sampled_from([str(peer), f"::ffff:{peer}"])) if peer.version == 4 else str(peer)
    )
    return peer_text, headers, expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=scenario("x-forwarded-for"))
def test_xff_matches_reference(data: tuple[str, list[tuple[bytes, bytes]], str]) -> None:
    peer, headers, expected = data
    assert resolve_client_ip(peer, headers, PROXIES).ip == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=scenario("forwarded"))
def test_forwarded_matches_reference(data: tuple[str, list[tuple[bytes, bytes]], str]) -> None:
    peer, headers, expected = data
    assert resolve_client_ip(peer, headers, PROXIES, "forwarded").ip == expected


ATTACKER_JUNK = st.sampled_from(["unknown", "_x", "127.1", "", " ", "[::1", "a,b", '"'])


@settings(max_examples=200, deadline=None)
@given(
    fmt=st.sampled_from(["x-forwarded-for", "forwarded"]),
    attacker=st.lists(st.one_of(hop(True), hop(False)), max_size=5),
    junk=st.lists(ATTACKER_JUNK, max_size=3),
    client=hop(False),
    proxies=st.lists(hop(True), max_size=3),
    peer=hop(True),
    data=st.data(),
)
def test_attacker_prefix_never_wins(
    fmt: str,
    attacker: list[netaddr.IPAddress],
    junk: list[str],
    client: netaddr.IPAddress,
    proxies: list[netaddr.IPAddress],
    peer: netaddr.IPAddress,
    data: st.DataObject,
) -> None:
    """Whatever a client writes left of the hop our proxies added, the answer is that hop."""
    render = xff_text if fmt == "x-forwarded-for" else fwd_text
    forged = [data.draw(render(ip)) for ip in attacker]
    forged += [j if fmt == "x-forwarded-for" else f"for={j}" for j in junk]
    forged = data.draw(st.permutations(forged))
    # The client's own header line(s), then the line(s) the proxies appended.
    honest = [data.draw(render(client)), *(data.draw(render(p)) for p in proxies)]
    lines = [", ".join(forged)] if forged else []
    lines += split_lines(data.draw, honest)
    headers = [(fmt.encode(), line.encode()) for line in lines]
    got = resolve_client_ip(str(peer), headers, PROXIES, fmt)
    assert got == ClientIP(str(client), via_proxy=True, malformed=False)
    assert got.ip not in {str(a) for a in attacker} - {str(client)}


def test_cache_is_bounded() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    for i in range(6000):
        resolve_client_ip("10.0.0.1", xff(f"198.51.{i // 256 % 256}.{i % 256}"), proxies)
    info = proxies._classify.cache_info()  # type: ignore[attr-defined]
    assert info.currsize <= info.maxsize


# ---------------------------------------------------------------------------------------------
# exact behaviour of the helpers, pinned where mutation testing found no test looking


def test_bad_cidr_message_and_repr() -> None:
    with pytest.raises(ValueError, match="trusted proxies: not an IP address or CIDR"):
        TrustedProxies(["10.0.0.0/33"])
    assert repr(TrustedProxies(["10.0.0.0/8"])) == "TrustedProxies(['10.0.0.0/8'])"


def test_only_space_and_tab_are_optional_whitespace() -> None:
    # a vertical tab is not OWS (RFC 9110 §5.6.3): the hop is unreadable, not "1.2.3.4"
    assert resolve_client_ip("10.0.0.1", xff("1.2.3.4\x0b"), PROXIES) == ClientIP(
        "10.0.0.1", malformed=True
    )
    assert resolve_fwd("for=1.2.3.4\x0b") == ClientIP("10.0.0.1", malformed=True)
    # "\x0bfor" is another parameter's name, skipped; the real for= still counts
    assert resolve_fwd("\x0bfor=9.9.9.9;for=1.2.3.4") == ClientIP("1.2.3.4", via_proxy=True)


def test_forwarded_leading_empty_element_is_skipped() -> None:
    assert resolve_fwd(",for=1.2.3.4") == ClientIP("1.2.3.4", via_proxy=True)


def test_split_outside_quotes_skips_escaped_quotes() -> None:
    from gateway.core.trust import _split_outside_quotes

    assert _split_outside_quotes('"a\\"";b', ";") == ['"a\\""', "b"]
    assert _split_outside_quotes('a;b="x\\"y;z";c', ";") == ["a", 'b="x\\"y;z"', "c"]
    assert _split_outside_quotes('a;"b', ";") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ('a"b', None),  # a quote or backslash outside a quoted-string
        ("a\\b", None),
        ('"', None),
        ('"abc', None),
        ('""', ""),
        ('"ab"', "ab"),
        ('"a\\"b"', 'a"b'),
        ('"a\\bc"', "abc"),
        ('"a\\"', None),  # the escape swallows the closing quote
        ('"a"b"', None),  # a bare quote inside
    ],
)
def test_unquote(value: str, expected: str | None) -> None:
    from gateway.core.trust import _unquote

    assert _unquote(value) == expected


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        ("proto=https;for=1.2.3.4", ClientIP("1.2.3.4", via_proxy=True)),  # unknown params skip
        ("=x;for=1.2.3.4", ClientIP("10.0.0.1", malformed=True)),  # a pair without a name
        ("proto;for=1.2.3.4", ClientIP("10.0.0.1", malformed=True)),  # a pair without "="
        # an unbracketed IPv6 cannot carry a port, obfuscated or not
        ('for="2001:db8::1:_x"', ClientIP("10.0.0.1", malformed=True)),
    ],
)
def test_forwarded_pairs(element: str, expected: ClientIP) -> None:
    assert resolve_fwd(element) == expected


# ---------------------------------------------------------------------------------------------
# Rules the mutation run found unheld (docs/testing.md, "Mutation testing")


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4:065535",  # six digits, in range as a number: still not a port
        "[2001:db8::1]:065535",
        "1.2.3.4:000080",
    ],
)
def test_a_port_has_at_most_five_digits(text: str) -> None:
    assert parse_ip(text) is None
    assert parse_ip(text.replace(":0", ":", 1)) is not None  # the five-digit form is one


@pytest.mark.parametrize("text", ["\x0b1.2.3.4", "1.2.3.4\x0c", "\n::1", "\r[::1]:80"])
def test_parse_ip_strips_only_space_and_tab(text: str) -> None:
    assert parse_ip(text) is None
    assert parse_ip(f" \t{text.strip()}\t ") is not None


def test_classify_says_an_unreadable_hop_is_not_trusted() -> None:
    # a fresh set: PROXIES' memo may already hold these texts from other tests
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.classify("garbage") == (None, False)
    assert proxies.classify("10.1.2.3:80") == ("10.1.2.3", True)
    assert proxies.classify("203.0.113.9") == ("203.0.113.9", False)


def test_an_empty_pair_is_skipped_not_the_end_of_the_element() -> None:
    assert resolve_fwd(";for=1.2.3.4") == ClientIP("1.2.3.4", via_proxy=True)
    assert resolve_fwd("proto=https;;for=1.2.3.4") == ClientIP("1.2.3.4", via_proxy=True)


def test_a_for_value_holding_equals_is_still_a_for_pair() -> None:
    # The name ends at the first "=": 'for="x=y"' is a for= pair (unreadable), so a second
    # for= in the element is a repeated parameter and the element fails closed.
    assert resolve_fwd('for="x=y";for=1.2.3.4') == ClientIP("10.0.0.1", malformed=True)
    assert resolve_fwd('for="x=y"') == ClientIP("10.0.0.1", malformed=True)


def test_a_vertical_tab_element_is_an_unreadable_hop_not_an_empty_one() -> None:
    # only space and tab make an element empty (skipped); "\x0b" is an element we cannot read
    assert resolve_fwd("for=1.2.3.4, \x0b") == ClientIP("10.0.0.1", malformed=True)
    assert resolve_fwd("for=1.2.3.4, \t") == ClientIP("1.2.3.4", via_proxy=True)


def test_an_unreadable_hop_behind_a_trusted_one_keeps_via_proxy() -> None:
    # the answer is the nearest trusted hop, which did come from the header
    assert resolve_client_ip("10.0.0.1", xff("garbage, 10.0.0.5"), PROXIES) == ClientIP(
        "10.0.0.5", via_proxy=True, malformed=True
    )
    assert resolve_client_ip(
        "10.0.0.1", fwd("for=unknown, for=10.0.0.5"), PROXIES, "forwarded"
    ) == (ClientIP("10.0.0.5", via_proxy=True, malformed=True))
    # an element without for= is a hop we cannot read, as is "unknown"
    assert resolve_fwd("proto=https, for=10.0.0.5") == ClientIP(
        "10.0.0.5", via_proxy=True, malformed=True
    )
    assert resolve_client_ip("10.0.0.1", fwd('for="1.2.3.4'), PROXIES, "forwarded") == ClientIP(
        "10.0.0.1", via_proxy=False, malformed=True
    )


def test_an_unknown_proxy_header_names_the_ones_it_takes() -> None:
    with pytest.raises(ValueError) as raised:
        resolve_client_ip("10.0.0.1", [], PROXIES, "x-real-ip")
    assert str(raised.value) == (
        "proxy header must be one of x-forwarded-for, forwarded, got 'x-real-ip'"
    )
