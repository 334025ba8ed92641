"""The sender allowlist: which source addresses may post OneSignal events to us.

OneSignal sends Event Streams and webhooks from Google Cloud europe-west4, so the allowlist is
Google's ``cloud.json`` (https://www.gstatic.com/ipranges/cloud.json) filtered by scope, plus the
list OneSignal published "as of April 10, 2024", plus configured extras. Every tenant of the
region shares these ranges, so this is a coarse filter, not authentication: the shared secret
header is what authenticates a sender.

The snapshot bundled in ``gateway/data/cloud-europe-west4.json`` is *not* a copy of Google's
file: it was seeded from OneSignal's published europe-west4 list (the 17 CIDRs of April 2024),
because the machine that built it could not reach gstatic.com. Its ``syncToken`` is "0" so that
``gateway ranges update`` always treats it as older and replaces it with Google's current list.

Refresh is on by default (daily from Google's URL, the first one right after start, in the
background). A refresh swaps the whole set in one assignment and keeps the last good set when the
new file is unreadable, empty for our scopes, too big, or older than the data in use: a bad
download must never empty or shrink the allowlist. After a good refresh the active set is

    Google's current prefixes for our scopes
    + the start-up snapshot (``allowlist.snapshot``, else the bundled one): the floor
    + OneSignal's published list (if ``include_onesignal_published``)
    + ``allowlist.extra_cidrs``

(a union), so it is never smaller than the set the process started with. The two errors are
not alike: an address wrongly refused is an event lost (OneSignal does not retry a 4xx), while an
address wrongly allowed still needs the shared secret, which is what authenticates. A prefix
Google drops from our scopes stays allowed only if the floor has it; one that a refresh added and
a later refresh dropped goes, so the set does not grow without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import importlib.resources
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import netaddr
import orjson

from gateway.config import AllowlistConfig
from gateway.core.trust import parse_ip
from gateway.metrics import IngressMetrics

__all__ = [
    "BUNDLED_SNAPSHOT",
    "MAX_BYTES",
    "ONESIGNAL_PUBLISHED",
    "STALE_AFTER_S",
    "Allowlist",
    "RangeRefresher",
    "RangeSnapshot",
    "RangesError",
    "build_ipset",
    "data_time",
    "diff",
    "fetch_cloud_json",
    "load_snapshot",
    "log_if_stale",
    "parse_cloud_json",
    "write_snapshot",
]

log = logging.getLogger(__name__)

MAX_BYTES = 10_000_000  # Google's file is ~100 kB; anything this big is not it.
# a set in use older than this is logged at WARNING (start-up, and after a refresh)
STALE_AFTER_S = 30 * 86400.0
BUNDLED_SNAPSHOT = "data/cloud-europe-west4.json"
_SERVICE = "Google Cloud"

# OneSignal's REST API overview, "as of April 10, 2024": its outgoing traffic (webhooks, Event
# Streams) comes from these GCP europe-west4 (Groningen) ranges.
ONESIGNAL_PUBLISHED: tuple[str, ...] = (
    "34.32.128.0/17",
    "34.34.0.0/17",
    "34.90.0.0/15",
    "34.104.126.0/23",
    "34.124.62.0/23",
    "34.141.128.0/17",
    "34.147.0.0/17",
    "34.157.80.0/23",
    "34.157.92.0/22",
    "34.157.208.0/23",
    "34.157.220.0/22",
    "35.204.0.0/16",
    "35.214.128.0/17",
    "35.220.16.0/23",
    "35.234.160.0/20",
    "35.242.16.0/23",
    "2600:1900:4060::/44",
)


class RangesError(ValueError):
    """A range list that cannot be used; the message is one line saying what and where."""


@dataclass(frozen=True)
class RangeSnapshot:
    """The prefixes of one cloud.json version that fall in our scopes.

    ``prefix_scopes`` (parallel to ``cidrs``, may be empty) remembers each prefix's scope so
    that a snapshot written with several scopes reads back the same with any subset of them.
    """

    sync_token: str
    creation_time: str
    scopes: tuple[str, ...]
    cidrs: tuple[str, ...]
    prefix_scopes: tuple[str, ...] = ()


def _network(value: object, version: int, where: str) -> netaddr.IPNetwork:
    if not isinstance(value, str):
        raise RangesError(f"{where}: must be a string CIDR, got {value!r:.80}")
    try:
        net = netaddr.IPNetwork(value)  # strict in netaddr >= 1.0: no inet_aton shorthands
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise RangesError(f"{where}: not a CIDR: {value!r:.80}") from None
    if net.version != version:
        raise RangesError(f"{where}: not an IPv{version} CIDR: {value!r:.80}")
    return net.cidr  # host bits cleared, so equal ranges compare equal in diffs


def _sort_key(cidr: str) -> tuple[int, int, int]:
    net = netaddr.IPNetwork(cidr)
    return net.version, net.first, net.prefixlen


def data_time(snapshot: RangeSnapshot | None) -> float | None:
    """When the snapshot's data was made, in seconds since the epoch, or None if it does not say.

    Google's ``syncToken`` is milliseconds since the epoch; ``creationTime`` is ISO 8601 without
    a zone (UTC). The token wins when it is a positive integer; the bundled snapshot's is "0" on
    purpose (so ``ranges update`` always replaces it), and its ``creationTime`` is the date of
    OneSignal's list.
    """
    if snapshot is None:
        return None
    token = snapshot.sync_token
    if token.isascii() and token.isdigit() and 0 < int(token) < 10**15:
        return int(token) / 1000.0
    try:
        made = datetime.datetime.fromisoformat(snapshot.creation_time)
    except ValueError:
        return None
    if made.tzinfo is None:
        made = made.replace(tzinfo=datetime.UTC)
    return made.timestamp()


def parse_cloud_json(data: bytes | str | Mapping[str, Any], scopes: Iterable[str]) -> RangeSnapshot:
    """Read Google's cloud.json format and keep the prefixes whose scope is in ``scopes``.

    Raises :class:`RangesError` for anything that is not a plausible, non-empty list for our
    scopes, so a bad refresh can never replace a good set. Every prefix is validated, not only
    the kept ones: a file with garbage in it is not trusted at all.
    """
    wanted = tuple(scopes)
    if isinstance(data, bytes | bytearray | str):
        if len(data) > MAX_BYTES:
            raise RangesError(f"cloud.json: {len(data)} bytes is over the {MAX_BYTES} limit")
        try:
            doc: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RangesError(f"cloud.json: not valid JSON ({exc})") from None
    else:
        doc = data
    if not isinstance(doc, Mapping):
        raise RangesError(f"cloud.json: must be a JSON object, got {type(doc).__name__}")
    prefixes = doc.get("prefixes")
    if not isinstance(prefixes, list) or not prefixes:
        raise RangesError("cloud.json: 'prefixes' is missing, empty or not a list")
    sync_token = doc.get("syncToken", "")
    creation_time = doc.get("creationTime", "")
    if not isinstance(sync_token, str) or not isinstance(creation_time, str):
        raise RangesError("cloud.json: 'syncToken' and 'creationTime' must be strings")

    kept: dict[str, str] = {}  # cidr -> scope, in file order, first scope wins
    for i, entry in enumerate(prefixes):
        where = f"cloud.json: prefixes[{i}]"
        if not isinstance(entry, Mapping):
            raise RangesError(f"{where}: must be an object, got {type(entry).__name__}")
        has4, has6 = "ipv4Prefix" in entry, "ipv6Prefix" in entry
        if has4 == has6:
            raise RangesError(f"{where}: needs exactly one of ipv4Prefix, ipv6Prefix")
        net = (
            _network(entry["ipv4Prefix"], 4, f"{where}.ipv4Prefix")
            if has4
            else _network(entry["ipv6Prefix"], 6, f"{where}.ipv6Prefix")
        )
        scope = entry.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise RangesError(f"{where}.scope: must be a string, got {scope!r:.80}")
        if scope in wanted:
            kept.setdefault(str(net), scope)
    if not kept:
        raise RangesError(
            f"cloud.json: none of its {len(prefixes)} prefixes is in scopes {', '.join(wanted)}"
        )
    return RangeSnapshot(
        sync_token=sync_token,
        creation_time=creation_time,
        scopes=wanted,
        cidrs=tuple(kept),
        prefix_scopes=tuple(kept.values()),
    )


def _to_cloud_json(snapshot: RangeSnapshot) -> bytes:
    scopes = snapshot.prefix_scopes
    if len(scopes) != len(snapshot.cidrs):
        if len(snapshot.scopes) != 1:
            raise RangesError("snapshot: prefix scopes unknown and not exactly one scope to use")
        scopes = snapshot.scopes * len(snapshot.cidrs)
    prefixes = [
        {
            ("ipv6Prefix" if ":" in cidr else "ipv4Prefix"): cidr,
            "service": _SERVICE,
            "scope": scope,
        }
        for cidr, scope in zip(snapshot.cidrs, scopes, strict=True)
    ]
    doc = {
        "syncToken": snapshot.sync_token,
        "creationTime": snapshot.creation_time,
        "prefixes": prefixes,
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def write_snapshot(path: str | os.PathLike[str], snapshot: RangeSnapshot) -> None:
    """Write the snapshot as a cloud.json-format file, atomically.

    A temp file in the same directory plus ``os.replace``: a reader, or a crash mid-write,
    sees the old file or the new one, never half of one.
    """
    target = Path(path)
    data = _to_cloud_json(snapshot)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; keep the old file's mode, else the umask's default.
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_bundled() -> bytes:
    try:
        return importlib.resources.files("gateway").joinpath(BUNDLED_SNAPSHOT).read_bytes()
    except OSError:
        # An editable install made before gateway/__init__.py existed maps "gateway" as a
        # namespace package, which importlib.resources (3.11) cannot read; the file is still
        # next to this module.
        return Path(__file__).parents[1].joinpath(BUNDLED_SNAPSHOT).read_bytes()


def load_snapshot(path: str | None, scopes: Iterable[str]) -> RangeSnapshot:
    """The snapshot at ``path``, or the one bundled with the package when ``path`` is empty."""
    wanted = tuple(scopes)
    if not path:
        where = f"bundled snapshot {BUNDLED_SNAPSHOT}"
        try:
            data = _read_bundled()
        except OSError as exc:
            raise RangesError(f"{where}: cannot read ({exc}); reinstall the package") from None
    else:
        where = f"allowlist snapshot {path}"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise RangesError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        return parse_cloud_json(data, wanted)
    except RangesError as exc:
        hint = "" if path else "; set allowlist.snapshot to a cloud.json file for other scopes"
        raise RangesError(f"{where}: {exc}{hint}") from None


def build_ipset(
    snapshot: RangeSnapshot | None,
    *,
    include_onesignal_published: bool,
    extra_cidrs: Iterable[str],
    floor: RangeSnapshot | None = None,
) -> netaddr.IPSet:
    """One IPSet of the snapshot's and the floor's ranges, OneSignal's list and the extras."""
    nets: list[netaddr.IPNetwork] = []
    for part in (snapshot, floor):
        if part is not None:
            nets.extend(netaddr.IPNetwork(c) for c in part.cidrs)
    if include_onesignal_published:
        nets.extend(netaddr.IPNetwork(c) for c in ONESIGNAL_PUBLISHED)
    for i, cidr in enumerate(extra_cidrs):
        try:
            nets.append(netaddr.IPNetwork(cidr))
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise RangesError(f"allowlist.extra_cidrs[{i}]: not a CIDR: {cidr!r:.80}") from None
    return netaddr.IPSet(nets)


def diff(old: RangeSnapshot | None, new: RangeSnapshot) -> tuple[list[str], list[str]]:
    """(added, removed) CIDRs from ``old`` to ``new``, in address order (IPv4 first)."""
    before = set(old.cidrs) if old is not None else set()
    after = set(new.cidrs)
    return sorted(after - before, key=_sort_key), sorted(before - after, key=_sort_key)


_ANSWER_CACHE_SIZE = 4096
_BLOCK_SHIFT = {4: 32 - 16, 6: 128 - 16}


# a block where more ranges start than this gets a second index over its next 16 bits (all of
# Google's IPv6 ranges start in 2600::/16, for one); at most this many such blocks
_DENSE_BLOCK = 16
_MAX_DENSE_BLOCKS = 32


def _block_index(
    starts: tuple[int, ...], shift: int, base: int = 0, lo: int = 0, hi: int | None = None
) -> tuple[int, ...]:
    """For each of 65,536 blocks of ``1 << shift`` addresses from ``base``, the index of the
    first range starting in it or after it (searching ``starts[lo:hi]``), then ``hi``."""
    hi = len(starts) if hi is None else hi
    firsts = [bisect.bisect_left(starts, base | b << shift, lo, hi) for b in range(1 << 16)]
    return (*firsts, hi)


def _dense_index(
    starts: tuple[int, ...], index: tuple[int, ...], shift: int
) -> dict[int, tuple[int, ...]]:
    """Second-level indexes for the blocks where many ranges start (see _DENSE_BLOCK)."""
    dense = [b for b in range(1 << 16) if index[b + 1] - index[b] > _DENSE_BLOCK]
    return {
        b: _block_index(starts, shift - 16, b << shift, index[b], index[b + 1])
        for b in dense[:_MAX_DENSE_BLOCKS]
    }


@dataclass(frozen=True)
class _State:
    """One immutable version of the allowlist.

    ``IPSet.__contains__`` walks every prefix length (up to 128 dict probes for IPv6, ~100 µs
    per miss), so lookups bisect sorted, merged integer ranges taken from the same IPSet.
    """

    ipset: netaddr.IPSet
    snapshot: RangeSnapshot | None
    size: int
    starts: Mapping[int, tuple[int, ...]]  # IP version -> first address of each range
    ends: Mapping[int, tuple[int, ...]]  # IP version -> last address of each range
    # IP version -> for each of the 65,536 top-16-bit blocks, the index of its first start (and
    # one past the end): a lookup bisects only the ranges that start in its block, so it costs
    # about the same with 17 ranges or 1,000+
    blocks: Mapping[int, tuple[int, ...]]
    dense: Mapping[int, dict[int, tuple[int, ...]]]  # IP version -> block -> its second index
    # answers per address text: OneSignal sends from few addresses, and parsing one costs more
    # than the lookup; it belongs to this version, so a swap starts with an empty cache
    answers: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, ipset: netaddr.IPSet, snapshot: RangeSnapshot | None) -> _State:
        ranges = sorted((r.version, r.first, r.last) for r in ipset.iter_ipranges())
        starts = {v: tuple(f for ver, f, _ in ranges if ver == v) for v in (4, 6)}
        ends = {v: tuple(last for ver, _, last in ranges if ver == v) for v in (4, 6)}
        blocks = {v: _block_index(starts[v], _BLOCK_SHIFT[v]) for v in (4, 6)}
        dense = {v: _dense_index(starts[v], blocks[v], _BLOCK_SHIFT[v]) for v in (4, 6)}
        return cls(ipset, snapshot, len(ipset.iter_cidrs()), starts, ends, blocks, dense)


class Allowlist:
    """The current set of allowed sender ranges, swapped whole on refresh.

    Readers take ``self._state`` once per lookup; ``replace`` assigns a new immutable state in
    one step, so a lookup sees the old set or the new one, never a half-built set.

    ``floor`` is the snapshot it was made with: a refresh adds Google's current prefixes to it
    and never takes its prefixes away (see the module docstring).
    """

    def __init__(
        self, ipset: netaddr.IPSet | None = None, snapshot: RangeSnapshot | None = None
    ) -> None:
        self._state = _State.build(netaddr.IPSet(), None)
        self.floor = snapshot
        self.last_refresh_ok: float | None = None
        self.last_refresh_error: str | None = None
        # when refreshing started to fail (the last success, else the first failure), or None
        # while the last attempt succeeded or none was made
        self.failing_since: float | None = None
        if ipset is not None:
            self.replace(ipset, snapshot)

    @classmethod
    def from_config(cls, cfg: AllowlistConfig) -> Allowlist:
        """The snapshot (configured or bundled), OneSignal's list and the extras, at start-up."""
        snapshot = load_snapshot(cfg.snapshot or None, cfg.scopes)
        ipset = build_ipset(
            snapshot,
            include_onesignal_published=cfg.include_onesignal_published,
            extra_cidrs=cfg.extra_cidrs,
        )
        return cls(ipset, snapshot)

    def replace(self, ipset: netaddr.IPSet, snapshot: RangeSnapshot | None) -> None:
        """Swap in a new set; callers must not mutate ``ipset`` afterwards."""
        self._state = _State.build(ipset, snapshot)

    def contains(self, ip: str) -> bool:
        """Whether ``ip`` (text, as from :class:`~gateway.core.trust.ClientIP`) may send."""
        state = self._state  # one read: the whole lookup sees one version
        known = state.answers.get(ip)
        if known is not None:
            return known
        addr = parse_ip(ip)
        if addr is None:
            answer = False
        else:
            value = int(addr)
            version = addr.version
            shift = _BLOCK_SHIFT[version]
            block = value >> shift
            # the range holding value, if any, starts in its block (or sub-block) or is the
            # last one before
            sub = state.dense[version].get(block)
            if sub is None:
                index = state.blocks[version]
                lo, hi = index[block], index[block + 1]
            else:
                part = (value >> (shift - 16)) & 0xFFFF
                lo, hi = sub[part], sub[part + 1]
            i = bisect.bisect_right(state.starts[version], value, lo, hi) - 1
            answer = i >= 0 and value <= state.ends[version][i]
        if len(state.answers) < _ANSWER_CACHE_SIZE:
            state.answers[ip] = answer
        return answer

    def note_refresh_ok(self, at: float) -> None:
        self.last_refresh_ok = at
        self.last_refresh_error = None
        self.failing_since = None

    def note_refresh_error(self, message: str, at: float) -> None:
        self.last_refresh_error = message
        if self.failing_since is None:
            self.failing_since = self.last_refresh_ok if self.last_refresh_ok is not None else at

    def age_s(self, now: float) -> float:
        """Seconds from the active data's own time to ``now``; NaN when the data has no time."""
        made = data_time(self._state.snapshot)
        return float("nan") if made is None else max(0.0, now - made)

    def refresh_failing_s(self, now: float) -> float:
        """Seconds since refreshing started to fail; 0 while it works (or was never tried)."""
        since = self.failing_since
        return 0.0 if since is None else max(0.0, now - since)

    @property
    def ipset(self) -> netaddr.IPSet:
        return self._state.ipset

    @property
    def snapshot(self) -> RangeSnapshot | None:
        return self._state.snapshot

    @property
    def loaded(self) -> bool:
        return self._state.size > 0

    @property
    def size(self) -> int:
        """Number of CIDRs in the merged set (overlaps and neighbours counted once)."""
        return self._state.size

    @property
    def sync_token(self) -> str:
        snapshot = self._state.snapshot
        return snapshot.sync_token if snapshot is not None else ""


def _safe_url(url: str) -> str:
    """The URL without credentials or query, for messages and logs."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))


async def fetch_cloud_json(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int = MAX_BYTES,
    progress: Callable[[int, int | None], None] | None = None,
) -> bytes:
    """GET ``url`` streamed, refusing anything but a 200 and anything over ``max_bytes``.

    ``progress`` is called with (bytes so far, Content-Length or None) after each chunk, so a
    terminal can show the download without this module knowing about terminals.
    """
    shown = _safe_url(url)
    try:
        async with client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise RangesError(f"GET {shown}: HTTP {resp.status_code}, expected 200")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RangesError(f"GET {shown}: {declared} bytes is over the {max_bytes} limit")
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise RangesError(f"GET {shown}: body is over the {max_bytes} byte limit")
                chunks.append(chunk)
                if progress is not None:
                    progress(total, int(declared) if declared.isdigit() else None)
    except httpx.HTTPError as exc:
        raise RangesError(f"GET {shown}: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)


def log_if_stale(allowlist: Allowlist, now: float, hint: str) -> bool:
    """Warn when the data in use is older than :data:`STALE_AFTER_S`; True if it warned."""
    age = allowlist.age_s(now)
    if not age > STALE_AFTER_S:  # NaN (no time in the data) does not warn either
        return False
    snapshot = allowlist.snapshot
    made = snapshot.creation_time if snapshot is not None else ""
    log.warning(
        "allowlist data in use is %d days old (creationTime %s): senders at newer Google "
        "addresses are refused; %s",
        age // 86400,
        made or "unknown",
        hint,
        extra={"allowlist_age_s": round(age), "sync_token": allowlist.sync_token},
    )
    return True


def _token(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


class RangeRefresher:
    """Refresh the allowlist from ``cfg.refresh_url``; keep the last good set on any failure.

    ``run`` tries once at once (in the background: start-up and readiness never wait for it),
    then every ``refresh_interval_s`` after a success and every ``refresh_retry_s`` (at most the
    interval) after a failure, so one bad morning does not leave a stale set for a whole day.
    """

    def __init__(
        self,
        allowlist: Allowlist,
        cfg: AllowlistConfig,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
        *,
        max_bytes: int = MAX_BYTES,
        metrics: IngressMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.allowlist = allowlist
        self.cfg = cfg
        self.client_factory = client_factory or self._client
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.clock = clock
        self.successes = 0
        self.failures = 0

    def _client(self) -> httpx.AsyncClient:
        # a bounded wait per attempt: a machine without network fails fast and quietly
        return httpx.AsyncClient(timeout=self.cfg.refresh_timeout_s)

    def _build(self, data: bytes) -> tuple[netaddr.IPSet, RangeSnapshot]:
        snapshot = parse_cloud_json(data, self.cfg.scopes)
        current = _token(self.allowlist.sync_token)
        fresh = _token(snapshot.sync_token)
        if current is not None and fresh is not None and fresh < current:
            # a stale mirror or cache: its data is older than what we already use
            raise RangesError(
                f"cloud.json: syncToken {fresh} is older than the set in use ({current})"
            )
        ipset = build_ipset(
            snapshot,
            include_onesignal_published=self.cfg.include_onesignal_published,
            extra_cidrs=self.cfg.extra_cidrs,
            floor=self.allowlist.floor,
        )
        return ipset, snapshot

    def _counted(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.allowlist_refreshes.labels(result).inc()

    async def refresh_once(self) -> tuple[list[str], list[str]]:
        """Fetch, parse, build and swap; return (added, removed) against the previous cloud.json
        data (the floor's prefixes stay allowed either way). Raises RangesError on failure."""
        try:
            if not self.cfg.refresh_url:
                raise RangesError("allowlist.refresh_url: not set, nothing to refresh from")
            async with self.client_factory() as client:
                data = await fetch_cloud_json(
                    client, self.cfg.refresh_url, max_bytes=self.max_bytes
                )
            # Parsing ~1,000 prefixes takes milliseconds; keep them off the event loop.
            ipset, snapshot = await asyncio.to_thread(self._build, data)
        except Exception as exc:
            self.failures += 1
            self._counted("error")
            error = exc if isinstance(exc, RangesError) else RangesError(f"refresh: {exc!r}")
            self.allowlist.note_refresh_error(str(error), self.clock())
            if error is exc:
                raise
            raise error from exc
        changes = diff(self.allowlist.snapshot, snapshot)
        self.allowlist.replace(ipset, snapshot)
        self.allowlist.note_refresh_ok(self.clock())
        self.successes += 1
        self._counted("ok")
        return changes

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh now, then on the schedule above, until ``stop`` is set; never raises."""
        interval = self.cfg.refresh_interval_s
        if interval <= 0 or not self.cfg.refresh_url:
            return
        while not stop.is_set():
            wait = interval
            try:
                added, removed = await self.refresh_once()
            except Exception as exc:
                wait = min(self.cfg.refresh_retry_s, interval)
                log.warning(
                    "allowlist refresh failed, keeping the last good set; next try in %.0f s: %s",
                    wait,
                    exc,
                    extra={"error": str(exc), "failures": self.failures},
                )
            else:
                log.info(
                    "allowlist refreshed to syncToken %s: %d added, %d removed from cloud.json "
                    "(the start-up snapshot's prefixes stay allowed)",
                    self.allowlist.sync_token,
                    len(added),
                    len(removed),
                    extra={
                        "sync_token": self.allowlist.sync_token,
                        "added": len(added),
                        "removed": len(removed),
                        "size": self.allowlist.size,
                    },
                )
                served = _safe_url(self.cfg.refresh_url)
                log_if_stale(self.allowlist, self.clock(), f"{served} serves old data")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
