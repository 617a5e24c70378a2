"""The store watcher with a store that pushes its changes: a poll per change, never two at once."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.ocsp import Responder
from s2sgw.ca.publisher import StatusPublisher, StoreWatcher


@attrs.define
class Held:
    """Store work that finishes only when the test says so (a slow database)."""

    pending: list[tuple[defer.Deferred, Callable[..., Any], tuple]] = attrs.field(factory=list)

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def finish_all(self) -> int:
        """Finish what is pending now (not what finishing it starts)."""
        now, self.pending = self.pending, []
        for d, f, args in now:
            d.callback(f(*args))
        return len(now)


@attrs.define
class PushingStore:
    """What ``ICAStore.watch`` gives the watcher: the callbacks, and whether it was stopped."""

    on_change: Callable[[], None] | None = None
    stopped: bool = False

    def watch(self, on_change: Callable[[], None], on_error: Callable[[str], None]) -> Callable[[], None]:
        self.on_change = on_change
        return lambda: setattr(self, "stopped", True)


def _publisher(ca: CertificateAuthority, clock: task.Clock, in_thread: Any) -> StatusPublisher:
    responder = Responder(
        issuer=ca.intermediate_cert, signer_cert=ca.ocsp_cert, signer_key=ca.ocsp_key,
        validity=datetime.timedelta(seconds=300),
    )  # fmt: skip
    return StatusPublisher(ca=ca, responder=responder, clock=clock, in_thread=in_thread)


def test_a_pushed_change_is_polled_at_once_and_the_timed_poll_slows_down(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    held = Held()
    publisher = _publisher(ca, clock, held)
    store = PushingStore()
    watcher = StoreWatcher(
        publisher, clock, registry=CollectorRegistry(), watch=store.watch, call_from_thread=lambda f, *a, **k: f(*a, **k)
    )
    watcher.startService()
    while held.finish_all():
        pass
    assert publisher.ready
    bob = ca.issue("bob").record
    ca.revoke(name="bob")

    store.on_change()  # NOTIFY arrived
    while held.finish_all():  # the read, then the new CRL
        pass
    assert publisher.last_seq == 1
    assert publisher._statuses[bob.serial].state == "revoked"

    clock.advance(watcher.poll_interval * 4)  # the quarter-second poll no longer runs...
    assert held.pending == []
    clock.advance(watcher.pushed_poll_interval)  # ...the safety net does
    assert len(held.pending) == 1
    held.finish_all()
    assert publisher.healthy()
    watcher.stopService()
    assert store.stopped


def test_polls_asked_for_while_one_runs_make_one_more_poll(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
    clock = task.Clock()
    held = Held()
    publisher = _publisher(ca, clock, held)
    publisher.poll()
    while held.finish_all():
        pass
    ca.issue("alice")
    publisher.poll()
    for _ in range(5):
        publisher.poll()  # notifications arriving while the store is read
    assert len(held.pending) == 1
    held.finish_all()
    assert len(held.pending) == 1  # exactly one more read, for what came meanwhile
    held.finish_all()
    assert held.pending == []
