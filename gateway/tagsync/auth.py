"""Refused API keys (401/403): the app's updates wait for a working key, none is dead-lettered.

Two halves. On the delivery side, :class:`AuthGates` holds one gate per refused app: one held
request at a time probes the key, every ``auth_retry_s`` or as soon as a re-read key differs;
the app's other users are parked, and the partitions their events came from are published
(:attr:`AuthGates.blocked`) for the source, which pauses them. On the source side,
:class:`ApiKeys` re-reads every app's key every ``auth_retry_s`` and on SIGHUP, and hands a
changed key to the delivery side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import gateway.tagsync.metrics as m
from gateway.config import OneSignalApp, Secret, read_api_key
from gateway.logs import register_secrets
from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.rules import Alias

__all__ = ["ApiKeys", "AuthGate", "AuthGates"]

log = logging.getLogger("gateway.tagsync.worker")


@dataclass(slots=True)
class AuthGate:
    """One app whose API key OneSignal refused."""

    failing: bool = False
    probing: bool = False
    next_probe: float = 0.0
    generation: int = 0  # bumped when the key changes, so a probe with the old key is stale
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    parked: dict[Alias, None] = field(default_factory=dict)
    partitions: set[tuple[str, int]] = field(default_factory=set)


class AuthGates:
    """The gates of the apps whose key was refused; lives on the delivery's event loop."""

    def __init__(self, retry_s: float, clock: Callable[[], float]) -> None:
        self.retry_s = retry_s
        self._clock = clock
        self._gates: dict[str, AuthGate] = {}
        # Partitions holding updates of an app whose key is refused: the source pauses them.
        # Replaced whole (never mutated), so the source thread reads it without a lock.
        self.blocked: frozenset[tuple[str, int]] = frozenset()

    def refusing(self, app_id: str) -> AuthGate | None:
        """The app's gate while its key is refused, else None."""
        if not self._gates:
            return None
        gate = self._gates.get(app_id)
        return gate if gate is not None and gate.failing else None

    def parked(self) -> int:
        """Users parked behind a refused key (shutdown does not wait for them)."""
        return sum(len(gate.parked) for gate in self._gates.values()) if self._gates else 0

    def park(self, gate: AuthGate, alias: Alias, sources: Iterable[SourceRef]) -> None:
        """A due user of a refused app: back to the due queue once the key works."""
        gate.parked[alias] = None
        self.block(gate, sources)

    def block(self, gate: AuthGate, sources: Iterable[SourceRef]) -> None:
        before = len(gate.partitions)
        gate.partitions.update((src.topic, src.partition) for src in sources)
        if len(gate.partitions) != before:
            self._publish_blocked()

    def _publish_blocked(self) -> None:
        self.blocked = frozenset(
            key for gate in self._gates.values() if gate.failing for key in gate.partitions
        )

    @staticmethod
    def _signal(gate: AuthGate) -> None:
        """Wake every request waiting on the gate (they look at it again)."""
        gate.changed.set()
        gate.changed = asyncio.Event()

    def wake_all(self) -> None:
        """Shutting down: requests waiting for a working key look again (and give up)."""
        for gate in self._gates.values():
            self._signal(gate)

    def refused(
        self,
        alias: Alias,
        sources: Iterable[SourceRef],
        status: int | None,
        probe: int | None,
        pending: Callable[[str], Iterable[SourceRef]],
    ) -> None:
        """A 401/403. ``probe``: the gate's generation when this request probed, else None;
        ``pending``: the sources of what the app has pending (paused too, on the first)."""
        now = self._clock()
        gate = self._gates.get(alias.app_id)
        if gate is None:
            gate = self._gates[alias.app_id] = AuthGate()
        if not gate.failing:
            gate.failing = True
            gate.next_probe = now + self.retry_s
            m.AUTH_FAILING.labels(alias.app_id).set(1)
            log.warning(
                "OneSignal refuses the app's API key; its updates wait for a working key",
                extra={"app_id": alias.app_id, "status": status, "retry_in_s": self.retry_s},
            )
            gate.partitions.update((src.topic, src.partition) for src in pending(alias.app_id))
        elif probe is not None:
            gate.probing = False
            # a key that changed while the probe was out is tried at once
            stale = probe != gate.generation
            gate.next_probe = now if stale else now + self.retry_s
            m.AUTH_PROBES.labels("refused").inc()
            log.info(
                "API key still refused",
                extra={"app_id": alias.app_id, "status": status, "stale_key": stale},
            )
        self.block(gate, sources)
        self._publish_blocked()
        self._signal(gate)

    def accepted(self, app_id: str) -> list[Alias] | None:
        """A probe got an answer other than 401/403: the key works; returns the parked users
        to send (None when the app was not refused)."""
        gate = self._gates.get(app_id)
        if gate is None or not gate.failing:
            return None
        gate.failing = False
        gate.probing = False
        m.AUTH_FAILING.labels(app_id).set(0)
        m.AUTH_PROBES.labels("accepted").inc()
        log.info(
            "the app's API key is accepted again; sending its held updates",
            extra={"app_id": app_id, "parked_users": len(gate.parked)},
        )
        parked = list(gate.parked)
        gate.parked.clear()
        gate.partitions.clear()
        self._publish_blocked()
        self._signal(gate)
        return parked

    def unanswered(self, app_id: str) -> None:
        """A probe without an HTTP answer (transport error): nothing learnt; next probe on
        the timer, so waiting requests do not take turns hammering a dead connection."""
        gate = self._gates.get(app_id)
        if gate is not None and gate.failing:
            gate.probing = False
            gate.next_probe = self._clock() + self.retry_s
            self._signal(gate)

    def key_reread(self, app_id: str, *, changed: bool, probe: bool) -> None:
        """The app's key was re-read (``changed``: it differs); a new key, or ``probe``, makes
        a refused app try its held update now instead of at the next ``retry_s``."""
        gate = self._gates.get(app_id)
        if gate is None:
            return
        if changed:
            gate.generation += 1
        if gate.failing and (probe or changed):
            gate.next_probe = self._clock()
            self._signal(gate)

    async def turn(
        self, app_id: str, sources: Iterable[SourceRef], draining: Callable[[], bool]
    ) -> bool | int:
        """Before each attempt: True to send (the key is not refused), the gate's generation
        to send as the app's probe, False to give up (shutting down while refused)."""
        gate = self._gates.get(app_id)
        while gate is not None and gate.failing:
            if draining():
                return False
            self.block(gate, sources)
            now = self._clock()
            if not gate.probing and now >= gate.next_probe:
                gate.probing = True
                return gate.generation
            changed = gate.changed
            timeout = None if gate.probing else gate.next_probe - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        return True


class ApiKeys:
    """Every app's API key as in use, re-read every ``retry_s`` and on request (SIGHUP).

    Runs on the source's thread; a changed key is registered with the log scrubber before
    anything could log it, then handed on through ``apply``.
    """

    def __init__(self, apps: Iterable[OneSignalApp], retry_s: float, now: float) -> None:
        self.apps = tuple(apps)
        self.retry_s = retry_s
        self.keys: dict[str, Secret] = {
            a.app_id: a.api_key for a in self.apps if a.api_key is not None
        }
        self.known_apps = {a.app_id for a in self.apps}
        register_secrets(k.reveal() for k in self.keys.values())
        self._asked = threading.Event()
        self._next_read = now + retry_s

    def request_reload(self) -> None:
        """Re-read every app's API key at the next chance and probe refused apps at once."""
        self._asked.set()

    def maybe_reread(self, now: float, apply: Callable[[str, Secret | None, bool], None]) -> None:
        """When due or asked, re-read the keys; ``apply(app_id, new key or None, probe)`` for
        each app whose key changed, and for every app when asked."""
        asked = self._asked.is_set()
        if not asked and now < self._next_read:
            return
        self._asked.clear()
        self._next_read = now + self.retry_s
        for app in self.apps:
            current = self.keys.get(app.app_id)
            if current is None:
                continue  # no key at start-up: its events are dead-lettered
            key = self._read(app)
            changed = key is not None and key != current
            if changed:
                assert key is not None
                register_secrets([key.reveal()])  # before anything could log it
                self.keys[app.app_id] = key
                m.KEY_RELOADS.labels(app.app_id).inc()
                log.info(
                    "the app's API key changed; using the new one",
                    extra={"app_id": app.app_id, "api_key_source": app.api_key_source},
                )
            if changed or asked:
                apply(app.app_id, key if changed else None, asked)

    @staticmethod
    def _read(app: OneSignalApp) -> Secret | None:
        try:
            return read_api_key(app)
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot re-read the app's API key; keeping the one in use",
                extra={
                    "app_id": app.app_id,
                    "api_key_source": app.api_key_source,
                    "error": type(exc).__name__,
                },
            )
            return None
