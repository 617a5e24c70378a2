"""Live connections follow status changes: pushed revocations, re-validation, trust reloads.

Real OpenSSL handshakes in memory through a real InboundListener and OutboundConnector; the
status checker is the project's fake (a table) or the real OCSP checker against the CA's
status server over StubTreq.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface import providedBy
from zope.interface.verify import verifyObject

from s2sgw.ca.ocsp import Responder
from s2sgw.ca.publisher import StatusPublisher
from s2sgw.ca.server import build_root
from s2sgw.config import InboundRoute, OutboundRoute, TimeoutsConfig
from s2sgw.interfaces import Decision, IStatusCache, IStatusChecker, Reason
from s2sgw.ops.audit import AUDIT_NAMESPACE, AuditLog
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.routes.inbound import InboundListener
from s2sgw.routes.outbound import OutboundConnector
from s2sgw.status.enforce import Enforcer, LiveCloseMetrics, PushedRevocations
from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.tlstransport import TLSFactory
from s2sgw.wire.feed import FeedDocument, FeedEntry
from s2sgw.wire.ocsp import CertStatus, StatusUnavailable, key_hash
from tests.doubles import FakeStatusChecker
from tests.tlshelpers import (
    PKI,
    FakeAuthorizer,
    FakeTrustStore,
    HalfCloseCollector,
    Wire,
    WireEndpoint,
    pump_all,
)

TIMEOUTS = TimeoutsConfig(handshake=10.0, connect=5.0, idle=1e9, drain=10.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture
def audit_events() -> Iterator[list[dict]]:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == AUDIT_NAMESPACE:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@attrs.define(eq=False)
class Rig:
    """An inbound route (callers -> orders) and an outbound route (orders -> users) in memory."""

    pki: PKI
    checker: Any
    fail: str = "closed"
    cache: Any = None  # the checker's status cache, when it keeps one (as the gateway wires it)
    clock: MemoryReactorClock = attrs.Factory(MemoryReactorClock)
    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    backend: WireEndpoint = attrs.Factory(WireEndpoint)
    remote: WireEndpoint = attrs.field(init=False)
    wires: list[Wire] = attrs.Factory(list)
    listener: InboundListener = attrs.field(init=False)
    connector: OutboundConnector = attrs.field(init=False)
    enforcer: Enforcer = attrs.field(init=False)
    trusted: bool = True

    def __attrs_post_init__(self) -> None:
        if self.clock.seconds() == 0:
            self.clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
        users_options = self.pki.options("users")
        self.remote = WireEndpoint(
            peer_factory=lambda: TLSFactory(users_options, False, Factory.forProtocol(HalfCloseCollector)).buildProtocol(None)
        )
        store = FakeTrustStore(
            servers={"orders": self.pki.options("orders")}, clients={"orders": self.pki.options("orders")}
        )
        metrics, closes = RouteMetrics(), LiveCloseMetrics()
        for counted in (metrics, closes):  # as the gateway's MetricsService does when it starts
            self.registry.register(counted)
        inbound = InboundRoute("orders-in", "orders", "tcp:0", "tcp:127.0.0.1:1", allow=("callers",))
        outbound = OutboundRoute("orders-to-users", "orders", "tcp:0", "tcp:users.example:8443", "users")
        self.listener = InboundListener(
            inbound,
            store,
            FakeAuthorizer(Decision(True, Reason.OK, "spiffe://example.test/caller", self.serial("caller"))),
            self.clock,
            TIMEOUTS,
            metrics=metrics,
            audit=AuditLog(),
            backend=self.backend,
        )
        self.connector = OutboundConnector(
            outbound,
            store,
            FakeAuthorizer(Decision(True, Reason.OK, "spiffe://example.test/users", self.serial("users"))),
            self.clock,
            TIMEOUTS,
            metrics=metrics,
            audit=AuditLog(),
            remote=self.remote,
        )
        self.enforcer = Enforcer.for_routes(
            {"orders-in": self.listener, "orders-to-users": self.connector},
            self.checker,
            self.clock,
            fail=self.fail,
            verify_chain=lambda chain: self.trusted,
            metrics=closes,
            cache=self.cache,
        )

    def serial(self, name: str) -> int:
        return self.pki.identity(name).record.serial

    def call_in(self, name: str = "caller") -> HalfCloseCollector:
        """A peer gateway holding ``name``'s certificate connects to orders-in."""
        caller = HalfCloseCollector()
        client = TLSFactory(self.pki.options(name), True, Factory.forProtocol(lambda: caller)).buildProtocol(None)
        server = self.listener.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        self.wires.append(Wire(client, server))
        self.pump()
        return caller

    def call_out(self) -> HalfCloseCollector:
        """The local service opens a connection through orders-to-users."""
        client = HalfCloseCollector()
        self.wires.append(Wire(client, self.connector.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))))
        self.pump()
        return client

    def pump(self) -> None:
        while True:
            count = len(self.backend.wires) + len(self.remote.wires)
            pump_all(*self.wires, *self.backend.wires, *self.remote.wires)
            if len(self.backend.wires) + len(self.remote.wires) == count:
                return

    def live(self) -> int:
        return self.listener.active + self.connector.active

    def feed(self, *names: str, issuer: Any = None) -> FeedDocument:
        issuer = issuer if issuer is not None else self.pki.ca.intermediate_cert
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        entries = tuple(FeedEntry(i + 1, self.serial(n), now, "keyCompromise") for i, n in enumerate(names))
        return FeedDocument(key_hash(issuer), 0, len(entries), len(entries), now, entries)


def reasons(events: list[dict]) -> list[tuple[str, str, str]]:
    return [(e["route"], e["outcome"], e["reason"]) for e in events]


def test_a_pushed_revocation_closes_live_inbound_connections_of_that_peer_and_refuses_new_ones(
    pki: PKI, audit_events: list[dict]
) -> None:
    checker = FakeStatusChecker(MemoryReactorClock())
    rig = Rig(pki, checker)
    caller = rig.call_in("caller")
    bystander = rig.call_in("bystander")
    assert rig.listener.active == 2
    assert rig.enforcer.revoked(rig.feed("caller")) == 1
    rig.pump()
    assert caller.lost is not None and bystander.lost is None
    assert reasons(audit_events) == [("orders-in", "closed", "revoked")]
    assert "from the revocation feed" in audit_events[0]["detail"]
    assert rig.registry.get_sample_value("s2sgw_live_closes_total", {"reason": "revoked", "cause": "feed"}) == 1


def test_a_pushed_revocation_closes_live_outbound_connections_to_that_peer(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    local = rig.call_out()
    assert rig.connector.active == 1
    rig.enforcer.revoked(rig.feed("users"))
    rig.pump()
    assert local.lost is not None
    assert reasons(audit_events) == [("orders-to-users", "closed", "revoked")]


def test_the_same_serial_from_another_issuer_is_left_alone(pki: PKI, tmp_path: Any) -> None:
    other = PKI.create(tmp_path / "other")
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    caller = rig.call_in("caller")
    assert rig.enforcer.revoked(rig.feed("caller", issuer=other.ca.intermediate_cert)) == 0
    rig.pump()
    assert caller.lost is None


def test_pushed_revocations_are_a_checker_with_a_status_cache(pki: PKI) -> None:
    """What the gateway puts in front of a checker without a cache (CRL, off) when it follows the feed."""
    clock = MemoryReactorClock()
    pushed = PushedRevocations(FakeStatusChecker(clock), clock)
    assert set(providedBy(pushed)) == {IStatusChecker, IStatusCache}
    assert verifyObject(IStatusChecker, pushed) and verifyObject(IStatusCache, pushed)
    closed: list[Any] = []
    pushed.close().addBoth(closed.append)
    assert closed == [None]


def test_pushed_revocations_answer_new_handshakes_for_checkers_without_their_own(pki: PKI) -> None:
    clock = MemoryReactorClock()
    pushed = PushedRevocations(FakeStatusChecker(clock), clock)
    leaf, issuer = pki.ca.issue("x"), pki.ca.intermediate_cert
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(leaf.record.pem)
    assert pushed.lookup(certificate, issuer) is None
    pushed.revoke(certificate.serial_number, reason="keyCompromise")
    status = []
    pushed.check(certificate, issuer).addCallback(status.append)
    assert status[0].state == "revoked" and status[0].revocation_reason == "keyCompromise"


def test_revalidation_closes_a_peer_the_ca_now_calls_revoked(pki: PKI, audit_events: list[dict]) -> None:
    checker = FakeStatusChecker(MemoryReactorClock())
    rig = Rig(pki, checker)
    caller = rig.call_in("caller")
    rig.enforcer.revalidate()
    rig.pump()
    assert caller.lost is None
    checker.set(rig.serial("caller"), "revoked")
    rig.enforcer.revalidate()
    rig.pump()
    assert caller.lost is not None
    assert reasons(audit_events) == [("orders-in", "closed", "revoked")]
    assert "re-validation" in audit_events[0]["detail"]


def test_revalidation_under_fail_closed_closes_a_peer_the_ca_cannot_vouch_for(pki: PKI, audit_events: list[dict]) -> None:
    checker = FakeStatusChecker(MemoryReactorClock())
    rig = Rig(pki, checker)
    rig.call_in("caller")
    checker.set(rig.serial("caller"), StatusUnavailable("connection refused"))
    rig.enforcer.revalidate()
    rig.pump()
    assert reasons(audit_events) == [("orders-in", "closed", "ca_unreachable")]


def test_revalidation_under_fail_open_keeps_the_connection_and_asks_again_later(pki: PKI) -> None:
    checker = FakeStatusChecker(MemoryReactorClock())
    rig = Rig(pki, checker, fail="open")
    caller = rig.call_in("caller")
    checker.set(rig.serial("caller"), StatusUnavailable("connection refused"))
    rig.enforcer.revalidate()
    asked = len(checker.calls)
    rig.enforcer.revalidate()  # within the retry time: not asked again
    assert len(checker.calls) == asked
    rig.clock.advance(rig.enforcer.retry)
    checker.set(rig.serial("caller"), "revoked")
    rig.enforcer.revalidate()
    rig.pump()
    assert caller.lost is not None


def test_a_peer_certificate_that_expires_while_connected_is_disconnected(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    caller = rig.call_in("caller")
    leaf = rig.listener.gate.live.copy().pop().chain[0]
    rig.clock.advance((leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds() + 1)
    rig.enforcer.revalidate()
    rig.pump()
    assert caller.lost is not None
    assert reasons(audit_events) == [("orders-in", "closed", "expired")]


def test_after_a_trust_reload_peers_that_no_longer_verify_are_disconnected(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    caller = rig.call_in("caller")
    local = rig.call_out()
    assert rig.enforcer.trust_reloaded(2) == 0
    rig.trusted = False
    assert rig.enforcer.trust_reloaded(3) == 2
    rig.pump()
    assert caller.lost is not None and local.lost is not None
    assert sorted(reasons(audit_events)) == [
        ("orders-in", "closed", "untrusted_chain"),
        ("orders-to-users", "closed", "untrusted_chain"),
    ]


def test_revalidation_runs_on_its_interval_once_started(pki: PKI) -> None:
    checker = FakeStatusChecker(MemoryReactorClock())
    rig = Rig(pki, checker)
    caller = rig.call_in("caller")
    rig.enforcer.startService()
    checker.set(rig.serial("caller"), "revoked")
    rig.clock.advance(1.0)
    rig.pump()
    assert caller.lost is not None
    rig.enforcer.stopService()


# -- with the real OCSP checker and the CA's status server -------------------------------------


@attrs.define
class Inline:
    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(f, *args)


def ocsp_rig(pki: PKI, max_cache_age: float) -> tuple[Rig, OCSPStatusChecker, StatusPublisher, StubTreq]:
    rig_clock = MemoryReactorClock()
    rig_clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    responder = Responder(
        issuer=pki.ca.intermediate_cert,
        signer_cert=pki.ca.ocsp_cert,
        signer_key=pki.ca.ocsp_key,
        validity=datetime.timedelta(seconds=60),
    )
    publisher = StatusPublisher(ca=pki.ca, responder=responder, clock=rig_clock, in_thread=Inline())
    stub = StubTreq(build_root(publisher))
    publisher.load()
    checker = OCSPStatusChecker("http://ca.test/ocsp", rig_clock, http=stub, max_cache_age=max_cache_age)
    rig = Rig(pki, checker, clock=rig_clock, cache=checker)
    return rig, checker, publisher, stub


def test_revalidation_asks_the_ca_only_when_the_cached_answer_runs_out(pki: PKI, audit_events: list[dict]) -> None:
    rig, checker, publisher, stub = ocsp_rig(pki, max_cache_age=5.0)
    caller = rig.call_in("caller")
    rig.enforcer.revalidate()  # nothing cached yet: one query
    stub.flush()
    assert checker.queries == 1
    pki.ca.revoke(serial=rig.serial("caller"), reason="keyCompromise")
    publisher.poll()
    for _ in range(4):  # cached good answer: no query, connection stays
        rig.clock.advance(1.0)
        rig.enforcer.revalidate()
        stub.flush()
    assert checker.queries == 1 and caller.lost is None
    rig.clock.advance(1.0)  # max_cache_age reached: asked again, now revoked
    rig.enforcer.revalidate()
    stub.flush()
    rig.pump()
    assert checker.queries == 2
    assert caller.lost is not None
    assert reasons(audit_events) == [("orders-in", "closed", "revoked")]


def test_a_newer_root_crl_closes_live_connections_under_the_issuing_ca_it_revokes(
    pki: PKI, audit_events: list[dict]
) -> None:
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    caller, local = rig.call_in("caller"), rig.call_out()
    revoked_issuer: list[int] = []
    asked: list[int] = []

    def judge(issuer: Any) -> CertStatus | None:
        asked.append(issuer.serial_number)
        if issuer.serial_number not in revoked_issuer:
            return None
        now = datetime.datetime.fromtimestamp(rig.clock.seconds(), datetime.UTC)
        return CertStatus("revoked", now, None, revoked_at=now, revocation_reason="keyCompromise")

    assert rig.enforcer.issuers_revoked(judge) == 0  # a root CRL that revokes another issuing CA
    rig.pump()
    assert caller.lost is None and local.lost is None
    assert asked == [pki.ca.intermediate_cert.serial_number]  # once per issuing CA, not per connection

    revoked_issuer.append(pki.ca.intermediate_cert.serial_number)
    assert rig.enforcer.issuers_revoked(judge) == 2
    rig.pump()
    assert caller.lost is not None and local.lost is not None
    assert sorted(reasons(audit_events)) == [("orders-in", "closed", "revoked"), ("orders-to-users", "closed", "revoked")]
    assert all("from the root CRL" in event["detail"] for event in audit_events)
    assert rig.registry.get_sample_value("s2sgw_live_closes_total", {"reason": "revoked", "cause": "root_crl"}) == 2


def test_a_stale_root_crl_closes_nothing_on_its_own(pki: PKI) -> None:
    rig = Rig(pki, FakeStatusChecker(MemoryReactorClock()))
    caller = rig.call_in("caller")

    def stale(issuer: Any) -> CertStatus | None:
        raise StatusUnavailable("the root CRL held is stale")

    assert rig.enforcer.issuers_revoked(stale) == 0
    rig.pump()
    assert caller.lost is None
