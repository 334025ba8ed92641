"""Who is the client? The socket peer, or what trusted proxies say in a forwarding header.

Every proxy *appends* the address it received the connection from, so only the entries on the
right, written by proxies we trust, are believable. We walk the configured header from the right,
skip trusted proxies, and take the first untrusted hop as the client (the rightmost-untrusted
rule). Everything left of that hop was written by the client and is ignored, whatever it says.

Only one header is read, the one the load balancer writes (``server.proxy_header``): a client can
always add the other one, and believing whichever is present would let it choose its own IP.
A hop we cannot read (``unknown``, ``_hidden``, junk) stops the walk and fails closed: the answer
is then the last trusted address seen, which the sender allowlist rejects.

Pure functions over plain data, no I/O; all IP parsing is netaddr's strict (``INET_PTON``) mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import netaddr

__all__ = ["ClientIP", "TrustedProxies", "parse_ip", "resolve_client_ip"]

_CACHE_SIZE = 4096
_OWS = " \t"
_HEADERS = ("x-forwarded-for", "forwarded")


@dataclass(frozen=True, slots=True)
class ClientIP:
    """The client address of one request.

    ``ip`` is the normalized text form ("" when unknown); ``via_proxy`` says it came from a
    forwarding header rather than the socket; ``malformed`` says the header could not be read
    where it mattered and the answer is the fail-closed one.
    """

    ip: str
    via_proxy: bool = False
    malformed: bool = False


def _port_ok(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def _ipv4(text: str) -> netaddr.IPAddress | None:
    try:
        return netaddr.IPAddress(text, 4, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None


def _ipv6(text: str) -> netaddr.IPAddress | None:
    # netaddr rejects zone ids ("%eth0") itself; the "." check keeps "1.2.3.4" out of the v6 path.
    try:
        ip = netaddr.IPAddress(text, 6, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    if ip.is_ipv4_mapped():
        return ip.ipv4()  # dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d
    return ip


def parse_ip(text: str) -> netaddr.IPAddress | None:
    """Parse one address as proxies and sockets write it, or None.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443``; IPv4-mapped IPv6 becomes IPv4 so it matches IPv4 ranges. Rejects
    zone ids, ``inet_aton`` shorthands (``127.1``, ``010.0.0.1``), obfuscated identifiers and
    anything else: a hop we cannot read must never be mistaken for an address.
    """
    if not isinstance(text, str):
        return None
    text = text.strip(_OWS)
    if not text or not text.isascii():
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest[0] == ":" and _port_ok(rest[1:])):
            return None
        inner = text[1:end]
        if "." in inner and ":" not in inner:  # "[1.2.3.4]": brackets are for IPv6 only
            return None
        return _ipv6(inner)
    colons = text.count(":")
    if colons == 0:
        return _ipv4(text)
    if colons == 1:
        host, _, port = text.partition(":")
        return _ipv4(host) if _port_ok(port) else None
    return _ipv6(text)


class TrustedProxies:
    """The set of proxy addresses whose forwarding headers we believe.

    Keep it separate from the sender allowlist: putting a public cloud region here would let any
    tenant in it forge the client address.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.cidrs: tuple[str, ...] = tuple(cidrs)
        try:
            self._set = netaddr.IPSet(netaddr.IPNetwork(c) for c in self.cidrs)
        except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
            raise ValueError(f"trusted proxies: not an IP address or CIDR: {exc}") from None
        # Hop text -> (normalized address or None, trusted). Bounded: the text is client-chosen.
        self._classify: Callable[[str], tuple[str | None, bool]] = functools.lru_cache(
            maxsize=_CACHE_SIZE
        )(self._classify_uncached)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, netaddr.IPAddress):
            return False
        if ip.version == 6 and ip.is_ipv4_mapped():
            ip = ip.ipv4()
        return ip in self._set

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.cidrs)!r})"

    def _classify_uncached(self, text: str) -> tuple[str | None, bool]:
        ip = parse_ip(text)
        if ip is None:
            return None, False
        return str(ip), ip in self._set

    def classify(self, text: str) -> tuple[str | None, bool]:
        """(normalized address or None if unreadable, whether it is a trusted proxy); memoized."""
        return self._classify(text)


# ---------------------------------------------------------------------------------------------
# header parsing: each returns the hops left to right; None marks a hop that cannot be read.


def _xff_hops(value: str) -> list[str | None]:
    # Empty list elements are legal HTTP list syntax (RFC 9110 §5.6.1) and carry no hop.
    return [h for h in (part.strip(_OWS) for part in value.split(",")) if h]


def _split_outside_quotes(text: str, sep: str) -> list[str] | None:
    """Split on ``sep`` outside quoted-strings; None on an unterminated quote."""
    parts: list[str] = []
    start = 0
    i = 0
    quoted = False
    n = len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        return None
    parts.append(text[start:])
    return parts


def _unquote(value: str) -> str | None:
    if not value.startswith('"'):
        return value if '"' not in value and "\\" not in value else None
    if len(value) < 2 or not value.endswith('"'):
        return None
    out: list[str] = []
    i = 1
    end = len(value) - 1
    while i < end:
        c = value[i]
        if c == "\\":
            i += 1
            if i >= end:
                return None
            c = value[i]
        elif c == '"':
            return None  # a bare quote inside: not one quoted-string
        out.append(c)
        i += 1
    return "".join(out)


def _forwarded_for(element: str) -> str | None:
    """The ``for=`` node of one RFC 7239 element, unquoted, or None if absent or unreadable."""
    pairs = _split_outside_quotes(element, ";")
    if pairs is None:
        return None
    found: str | None = None
    seen = False
    for pair in pairs:
        pair = pair.strip(_OWS)
        if not pair:
            continue
        name, eq, value = pair.partition("=")
        if not eq or not name or name != name.strip(_OWS):
            return None
        if name.lower() != "for":
            continue
        if seen:  # RFC 7239 §4: a parameter must not occur more than once per element
            return None
        seen = True
        found = _unquote(value.strip(_OWS))
    if not found:
        return None
    # node = nodename [":" node-port]; an obfuscated port ("_abc") still leaves a known address.
    head, colon, port = found.rpartition(":")
    if colon and port.startswith("_") and (head.endswith("]") or head.count(":") == 0):
        found = head
    return found


def _forwarded_hops(value: str) -> list[str | None]:
    elements = _split_outside_quotes(value, ",")
    if elements is None:
        return [None]  # an unterminated quote swallows the rest: one unreadable hop
    hops: list[str | None] = []
    for element in elements:
        if element.strip(_OWS):
            hops.append(_forwarded_for(element))
    return hops


def resolve_client_ip(
    peer: str | None,
    headers: Sequence[tuple[bytes, bytes]],
    proxies: TrustedProxies,
    header: str = "x-forwarded-for",
) -> ClientIP:
    """The client address of a request, by the rightmost-untrusted rule.

    ``headers`` are raw ASGI headers (lowercase names, possibly repeated); every line of the
    configured header is used, in order, and no other header is read. A peer that is not a
    trusted proxy is the client, and its headers are ignored entirely.
    """
    if header not in _HEADERS:
        raise ValueError(f"proxy header must be one of {', '.join(_HEADERS)}, got {header!r}")
    if peer is None:
        return ClientIP("")
    peer_ip, peer_trusted = proxies.classify(peer)
    if peer_ip is None:
        return ClientIP("", malformed=True)
    if not peer_trusted:
        return ClientIP(peer_ip)

    name = header.encode("ascii")
    split = _xff_hops if header == "x-forwarded-for" else _forwarded_hops
    hops: list[str | None] = []
    for key, value in headers:
        if key == name:
            hops.extend(split(value.decode("latin-1")))

    last_trusted = peer_ip
    via_proxy = False
    for hop in reversed(hops):
        if hop is None:
            return ClientIP(last_trusted, via_proxy, malformed=True)
        ip, trusted = proxies.classify(hop)
        if ip is None:
            return ClientIP(last_trusted, via_proxy, malformed=True)
        if not trusted:
            return ClientIP(ip, via_proxy=True)
        last_trusted = ip
        via_proxy = True
    # Every hop is a trusted proxy: the leftmost is the best we know (uvicorn does the same).
    return ClientIP(last_trusted, via_proxy)
