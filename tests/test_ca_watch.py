"""The store watcher with a store that pushes its changes: a poll per change, never two at once."""

from __future__ import annotations

import datetime
import shutil
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


def test_a_crl_signed_by_another_server_on_the_store_is_served_and_never_rolled_back(
    tmp_path: Path, pg_url: str
) -> None:
    first = CertificateAuthority.init(tmp_path / "a", "example.org", store=pg_url)
    shutil.copytree(first.directory, tmp_path / "b")
    second = CertificateAuthority.open(tmp_path / "b")
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    held_a, held_b = Held(), Held()
    a, b = _publisher(first, clock, held_a), _publisher(second, clock, held_b)
    for publisher, held in ((a, held_a), (b, held_b)):
        publisher.poll()
        while held.finish_all():
            pass
    older = b.crl_der
    first.issue("orders")
    first.revoke(name="orders")
    a.poll()  # a sees the revocation and signs a CRL, which it offers through the store
    while held_a.finish_all():
        pass
    assert a.crl_number > b.crl_number
    b.poll()  # b takes a's CRL (and, for the revocation it saw, signs a newer one)
    held_b.finish_all()
    assert b.crl_der == a.crl_der and b.crl_number == a.crl_number
    while held_b.finish_all():
        pass
    assert b.crl_number > a.crl_number
    newest = b.crl_der
    b._take_crl(older, "late")  # a slow, older CRL arriving now changes nothing
    assert b.crl_der == newest
