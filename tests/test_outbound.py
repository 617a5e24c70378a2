"""Outbound routes: a local client is relayed only to a remote gateway proven to be the peer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from s2sgw.config import InboundRoute, OutboundRoute, TimeoutsConfig
from s2sgw.interfaces import Decision, Reason
from s2sgw.ops.audit import AUDIT_NAMESPACE, AuditLog
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.routes.inbound import InboundListener
from s2sgw.routes.outbound import OutboundConnector
from s2sgw.tlstransport import TLSFactory
from s2sgw.transport import client_endpoint, server_endpoint
from tests.tlshelpers import (
    PKI,
    FakeAuthorizer,
    FakeTrustStore,
    HalfCloseCollector,
    Wire,
    WireEndpoint,
    pump_all,
)

PROVEN = Decision(True, Reason.OK, "spiffe://example.test/users", 0x5EED)
TIMEOUTS = TimeoutsConfig(handshake=10.0, connect=5.0, idle=300.0, drain=10.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("other") / "ca", "other.test")


@pytest.fixture
def audit_events() -> Iterator[list[dict]]:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == AUDIT_NAMESPACE:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def only(events: list[dict]) -> dict:
    assert len(events) == 1, events
    return events[0]


@attrs.define(eq=False)
class Rig:
    """local client <-wire-> connector ... TLS over a wire ... remote gateway's service."""

    pki: PKI
    remote_pki: PKI | None = None
    authorizer: FakeAuthorizer = attrs.Factory(lambda: FakeAuthorizer(PROVEN))
    hold_dial: bool = False
    max_connections: int = 1024
    clock: MemoryReactorClock = attrs.Factory(MemoryReactorClock)
    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    metrics: RouteMetrics = attrs.Factory(RouteMetrics)
    services: list[HalfCloseCollector] = attrs.Factory(list)
    wires: list[Wire] = attrs.Factory(list)
    connector: OutboundConnector = attrs.field(init=False)
    remote: WireEndpoint = attrs.field(init=False)
    store: FakeTrustStore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.registry.register(self.metrics)  # as the gateway's MetricsService does when it starts
        remote_pki = self.remote_pki or self.pki
        server_options = remote_pki.options("users")

        def remote_gateway() -> Any:
            service = HalfCloseCollector()
            self.services.append(service)
            return TLSFactory(server_options, False, Factory.forProtocol(lambda: service)).buildProtocol(None)

        self.remote = WireEndpoint(peer_factory=remote_gateway, hold=self.hold_dial)
        self.store = FakeTrustStore(clients={"orders": self.pki.options("orders")})
        route = OutboundRoute(
            name="orders-to-users",
            service="orders",
            listen="tcp:9001:interface=127.0.0.1",
            remote="tcp:users.example:8443",
            peer="users",
            max_connections=self.max_connections,
        )
        self.connector = OutboundConnector(
            route,
            self.store,
            self.authorizer,
            self.clock,
            TIMEOUTS,
            metrics=self.metrics,
            audit=AuditLog(),
            remote=self.remote,
        )

    def connect(self) -> tuple[HalfCloseCollector, Wire]:
        client = HalfCloseCollector()
        wire = Wire(client, self.connector.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000)))
        self.wires.append(wire)
        return client, wire

    def pump(self) -> None:
        while True:
            count = len(self.remote.wires)
            pump_all(*self.wires, *self.remote.wires)
            if len(self.remote.wires) == count:
                return


def test_a_local_client_is_relayed_to_the_proven_peer_and_audited(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    client, _ = rig.connect()
    client.transport.write(b"PING\r\n")
    rig.pump()
    service = rig.services[0]
    assert bytes(service.received) == b"PING\r\n"
    service.transport.write(b"+PONG\r\n")
    service.transport.loseConnection()
    rig.pump()
    assert bytes(client.received) == b"+PONG\r\n" and client.lost is not None
    assert rig.store.hostnames == ["users.example"]
    route, chain = only(rig.authorizer.calls)  # type: ignore[arg-type]
    assert route is rig.connector.route
    assert chain[0].serial_number == pki.identity("users").record.serial
    event = only(audit_events)
    assert event["log_level"] == LogLevel.info
    assert (event["route"], event["direction"], event["outcome"]) == ("orders-to-users", "outbound", "closed")
    assert (event["peer"], event["serial"]) == ("spiffe://example.test/users", "5EED")
    assert (event["bytes_in"], event["bytes_out"]) == (6, 7)
    assert rig.registry.get_sample_value(
        "s2sgw_handshakes_total", {"route": "orders-to-users", "result": "ok", "reason": ""}
    ) == 1


def test_local_bytes_wait_until_the_remote_is_authorized(pki: PKI) -> None:
    rig = Rig(pki, authorizer=FakeAuthorizer(hold=True))
    client, wire = rig.connect()
    client.transport.write(b"secret")
    rig.pump()
    assert wire.server.reading_paused
    assert rig.services[0].received == b""
    rig.authorizer.release(PROVEN)
    rig.pump()
    assert bytes(rig.services[0].received) == b"secret"


def test_a_remote_that_is_not_the_peer_is_dropped_and_the_client_closed(pki: PKI, audit_events: list[dict]) -> None:
    mismatch = Decision(False, Reason.IDENTITY_MISMATCH, "spiffe://example.test/billing", 0x2, "not users")
    rig = Rig(pki, authorizer=FakeAuthorizer(mismatch))
    client, _ = rig.connect()
    client.transport.write(b"secret")
    rig.pump()
    assert client.lost is not None
    assert rig.services[0].received == b""
    assert rig.remote.wires[0].client.aborted
    event = only(audit_events)
    assert event["log_level"] == LogLevel.warn
    assert (event["outcome"], event["reason"], event["peer"]) == (
        "refused",
        Reason.IDENTITY_MISMATCH,
        "spiffe://example.test/billing",
    )


def test_a_remote_with_an_untrusted_certificate_is_refused(
    pki: PKI, other_pki: PKI, audit_events: list[dict]
) -> None:
    rig = Rig(pki, remote_pki=other_pki)
    client, _ = rig.connect()
    rig.pump()
    assert client.lost is not None and rig.authorizer.calls == []
    assert only(audit_events)["reason"] == Reason.UNTRUSTED_CHAIN


def test_an_unreachable_remote_closes_the_client(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, hold_dial=True)
    client, _ = rig.connect()
    rig.remote.fail(ConnectionRefusedError())
    rig.pump()
    assert client.lost is not None
    assert only(audit_events)["reason"] == Reason.REMOTE_UNREACHABLE


def test_a_remote_that_does_not_answer_hits_the_connect_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, hold_dial=True)
    client, _ = rig.connect()
    rig.clock.advance(TIMEOUTS.connect)
    rig.pump()
    assert client.lost is not None and rig.remote.waiting == []
    assert only(audit_events)["reason"] == Reason.REMOTE_UNREACHABLE


def test_a_slow_authorization_hits_the_handshake_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, authorizer=FakeAuthorizer(hold=True))
    client, _ = rig.connect()
    rig.pump()
    rig.clock.advance(TIMEOUTS.handshake)
    rig.pump()
    assert client.lost is not None
    assert only(audit_events)["reason"] == Reason.HANDSHAKE_TIMEOUT


def test_a_client_that_leaves_while_dialing_cancels_the_dial(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, hold_dial=True)
    client, _ = rig.connect()
    client.transport.abortConnection()  # a reset; a FIN would wait until reading resumes
    rig.pump()
    assert rig.remote.waiting == []
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("closed", Reason.PEER_CLOSED)


def test_clients_over_the_cap_are_aborted_at_once(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, authorizer=FakeAuthorizer(hold=True), max_connections=1)
    rig.connect()
    _, wire = rig.connect()
    assert wire.server.aborted
    rig.pump()
    assert only(audit_events)["reason"] == Reason.TOO_MANY_CONNECTIONS
    assert rig.remote.attempts == 1


def test_a_client_that_shuts_its_write_side_gets_the_whole_answer_over_tls(pki: PKI) -> None:
    rig = Rig(pki)
    client, _ = rig.connect()
    client.transport.write(b"question")
    client.transport.loseWriteConnection()
    rig.pump()
    service = rig.services[0]
    assert service.eof and bytes(service.received) == b"question"
    assert client.lost is None
    answer = b"0123456789" * 50000
    service.transport.write(answer)
    service.transport.loseWriteConnection()
    rig.pump()
    assert bytes(client.received) == answer and client.lost is not None


def test_drain_aborts_live_relays_with_reason_shutdown(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    client, _ = rig.connect()
    rig.pump()
    drained: list[object] = []
    rig.connector.drain(2.0).addCallback(drained.append)
    rig.clock.advance(2.0)
    rig.pump()
    assert drained == [None] and client.lost is not None
    assert only(audit_events)["reason"] == Reason.SHUTDOWN
    _, wire = rig.connect()  # still listening (no port here), but draining: refused
    assert wire.server.aborted
    assert [e["reason"] for e in audit_events] == [Reason.SHUTDOWN, Reason.SHUTDOWN]


# ---------------------------------------------------------------------------------------------
# Real sockets on loopback: client -> connector -> mTLS -> listener -> backend


@implementer(IHalfCloseableProtocol)
class DigestBackend(Protocol):
    """Hashes what it receives; at EOF answers with the digest and the byte count."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(f"{self.hash.hexdigest()} {self.count}".encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class PlainUploader(HalfCloseCollector):
    """A local service: sends its payload, shuts its write side, reads the answer."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


@pytest_twisted.ensureDeferred
async def test_a_half_closed_upload_crosses_both_gateways_over_loopback(pki: PKI) -> None:
    await upload_through_both_gateways(pki, hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32))


async def upload_through_both_gateways(pki: PKI, payload: bytes) -> None:
    from twisted.internet import reactor

    backend_port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(DigestBackend)
    )
    inbound = InboundListener(
        InboundRoute(
            name="users-in",
            service="users",
            listen="tcp:0:interface=127.0.0.1",
            backend=f"tcp:127.0.0.1:{backend_port.getHost().port}",
            allow=("orders",),
        ),
        FakeTrustStore(servers={"users": pki.options("users")}),
        FakeAuthorizer(Decision(True, Reason.OK, "spiffe://example.test/orders", 1)),
        reactor,
        TIMEOUTS,
        metrics=RouteMetrics(),
    )
    inbound_port = await inbound.listen()
    outbound = OutboundConnector(
        OutboundRoute(
            name="orders-to-users",
            service="orders",
            listen="tcp:0:interface=127.0.0.1",
            remote=f"tcp:127.0.0.1:{inbound_port.getHost().port}",
            peer="users",
        ),
        FakeTrustStore(clients={"orders": pki.options("orders")}),
        FakeAuthorizer(PROVEN),
        reactor,
        TIMEOUTS,
        metrics=RouteMetrics(),
    )
    outbound_port = await outbound.listen()
    uploader = PlainUploader(payload)
    try:
        await client_endpoint(reactor, f"tcp:127.0.0.1:{outbound_port.getHost().port}").connect(
            Factory.forProtocol(lambda: uploader)
        )
        answer = await uploader.done.addTimeout(20, reactor)
        assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}".encode()
        assert uploader.eof  # the answer ended with a clean EOF, after our own half-close
    finally:
        for route in (outbound, inbound):
            await route.stop_listening()
            await route.drain(1.0)
        await backend_port.stopListening()


def test_a_remote_whose_chain_was_not_verified_is_refused_and_nothing_is_authorized(
    pki: PKI, audit_events: list[dict]
) -> None:
    """A client context that verifies nothing completes the handshake, but the chain the remote
    sent is never judged in place of a verified one."""
    rig = Rig(pki)
    rig.store.clients["orders"] = pki.options("orders", trust=False)
    client, _ = rig.connect()
    client.transport.write(b"secret")
    rig.pump()
    assert client.lost is not None
    assert rig.authorizer.calls == [] and rig.services[0].received == b""
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("refused", Reason.UNTRUSTED_CHAIN)
    assert event["detail"].startswith("the peer's chain did not verify: ")
