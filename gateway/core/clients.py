"""A request rate per client address, in a table of fixed size: for sources without a secret.

Anyone can post to such a source (web push: browsers), so one client must not be able to
fill Kafka: each address gets a token bucket (``rate`` per second, ``burst`` at most), and a
request without a token is refused with the seconds until the next one (429 + Retry-After).

Memory is bounded whatever the traffic: the table holds at most ``max_clients`` addresses and
forgets the least recently seen one to make room. A forgotten address starts again with a full
bucket, so an attacker with many addresses could reset buckets by flooding the table; IPv6
clients are therefore counted per /64 (what one subscriber line is usually given), so that one
host's 2^64 addresses are one client, not 2^64.

Pure: ``now`` (monotonic seconds) is passed in.
"""

from __future__ import annotations

from collections import OrderedDict

import netaddr

__all__ = ["ClientLimiter", "client_key"]

_V6_PREFIX = 64


def client_key(ip: str) -> str:
    """The address a client is counted by: the IPv4 address, or the /64 of an IPv6 one.

    An IPv4-mapped IPv6 address counts as its IPv4 address. Text that is not an address (the
    trust check gives the peer as it is) is its own key.
    """
    try:
        addr = netaddr.IPAddress(ip)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return ip
    if addr.version == 6:
        if addr.is_ipv4_mapped():
            return str(addr.ipv4())
        return str(netaddr.IPNetwork(f"{addr}/{_V6_PREFIX}").cidr)
    return str(addr)


class ClientLimiter:
    """Token buckets per client address, at most ``max_clients`` of them (LRU)."""

    __slots__ = ("_buckets", "burst", "evicted", "max_clients", "rate")

    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be positive, burst and max_clients at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.evicted = 0
        # key -> [tokens, when they were counted]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, ip: str, now: float) -> float:
        """0.0 when the request may go on (a token was taken), else seconds until a token."""
        key = client_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
                self.evicted += 1
            bucket = self._buckets[key] = [self.burst, now]
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)
