"""Inbound routes: real OpenSSL handshakes in memory, then refusals, relaying and draining."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from OpenSSL.SSL import Connection
from prometheus_client import CollectorRegistry
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from s2sgw.config import InboundRoute, TimeoutsConfig
from s2sgw.interfaces import Decision, Reason
from s2sgw.ops.audit import AUDIT_NAMESPACE, AuditLog
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.routes.inbound import InboundListener
from s2sgw.tlstransport import TLSFactory
from s2sgw.transport import EagerClient, EagerPort, client_endpoint, server_endpoint
from tests.tlshelpers import (
    PKI,
    FakeAuthorizer,
    FakeTrustStore,
    HalfCloseCollector,
    Wire,
    WireEndpoint,
    pump_all,
)

ALLOWED = Decision(True, Reason.OK, "spiffe://example.test/users", 0xABC)
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


@implementer(IHandshakeListener)
class Caller(HalfCloseCollector):
    """The peer gateway's side of the connection, as a plain protocol under TLS."""

    handshaken = False

    def handshakeCompleted(self) -> None:
        self.handshaken = True


@attrs.define(eq=False)
class Rig:
    pki: PKI
    authorizer: FakeAuthorizer = attrs.Factory(lambda: FakeAuthorizer(ALLOWED))
    backend: WireEndpoint = attrs.Factory(WireEndpoint)
    clock: MemoryReactorClock = attrs.Factory(MemoryReactorClock)
    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    metrics: RouteMetrics = attrs.Factory(RouteMetrics)
    max_connections: int = 1024
    max_pending: int = 1024
    max_pending_per_source: int = 256
    listener: InboundListener = attrs.field(init=False)
    wires: list[Wire] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.registry.register(self.metrics)  # as the gateway's MetricsService does when it starts
        route = InboundRoute(
            name="orders-in",
            service="orders",
            listen="tcp:0",
            backend="tcp:127.0.0.1:8080",
            allow=("users",),
            max_connections=self.max_connections,
            max_pending=self.max_pending,
            max_pending_per_source=self.max_pending_per_source,
        )
        store = FakeTrustStore(servers={"orders": self.pki.options("orders")})
        self.listener = InboundListener(
            route,
            store,
            self.authorizer,
            self.clock,
            TIMEOUTS,
            metrics=self.metrics,
            audit=AuditLog(),
            backend=self.backend,
        )

    def connect(
        self, client_options: Any = None, caller: Protocol | None = None, tls: bool = True, source: str = "10.0.0.1"
    ) -> Any:
        caller = caller if caller is not None else Caller()
        server = self.listener.factory.buildProtocol(IPv4Address("TCP", source, 40000))
        if tls:
            options = client_options if client_options is not None else self.pki.options("users")
            client = TLSFactory(options, True, Factory.forProtocol(lambda: caller)).buildProtocol(None)
        else:
            client = caller
        wire = Wire(client, server)
        self.wires.append(wire)
        return caller, wire

    def pump(self) -> None:
        while True:  # a pump may dial the backend: pump again with its wire
            count = len(self.backend.wires)
            pump_all(*self.wires, *self.backend.wires)
            if len(self.backend.wires) == count:
                return

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def only(events: list[dict]) -> dict:
    assert len(events) == 1, events
    return events[0]


def test_an_allowed_peer_is_relayed_to_the_backend_and_audited(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect()
    caller.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    rig.pump()
    backend = rig.backend.peers[0]
    assert bytes(backend.received) == b"GET / HTTP/1.1\r\n\r\n"
    backend.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    backend.transport.loseConnection()
    rig.pump()
    assert bytes(caller.received) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert caller.lost is not None
    event = only(audit_events)
    assert event["log_level"] == LogLevel.info
    assert (event["route"], event["direction"], event["outcome"], event["reason"]) == (
        "orders-in",
        "inbound",
        "closed",
        Reason.BACKEND_CLOSED,
    )
    assert event["peer"] == "spiffe://example.test/users" and event["serial"] == "0ABC"
    assert event["tls_version"] == "TLSv1.3" and event["cipher"] != "-"
    assert "route=orders-in outcome=closed reason=backend_closed peer=spiffe://example.test/users" in formatEvent(event)
    assert (event["bytes_in"], event["bytes_out"]) == (18, 19)
    assert rig.sample("s2sgw_handshakes_total", route="orders-in", result="ok", reason="") == 1
    assert rig.sample("s2sgw_relay_bytes_total", route="orders-in", direction="in") == 18
    assert rig.sample("s2sgw_active_connections", route="orders-in") == 0
    assert rig.listener.active == 0


def test_metric_labels_stay_bounded() -> None:
    registry = CollectorRegistry()
    metrics = RouteMetrics()
    registry.register(metrics)
    metrics.handshake("r", False, "some new reason text")
    assert registry.get_sample_value("s2sgw_handshakes_total", {"route": "r", "result": "refused", "reason": "other"}) == 1


def test_no_byte_reaches_the_backend_before_authorization(pki: PKI) -> None:
    rig = Rig(pki, authorizer=FakeAuthorizer(hold=True))
    caller, _ = rig.connect()
    rig.pump()
    assert caller.handshaken
    caller.transport.write(b"secret request")
    rig.pump()
    assert len(rig.authorizer.calls) == 1
    assert rig.backend.attempts == 0, "the backend was dialed before the decision"
    rig.authorizer.release(ALLOWED)
    rig.pump()
    assert bytes(rig.backend.peers[0].received) == b"secret request"


def test_the_authorizer_sees_the_verified_chain_leaf_first(pki: PKI) -> None:
    rig = Rig(pki)
    rig.connect()
    rig.pump()
    route, chain = only(rig.authorizer.calls)  # type: ignore[arg-type]
    assert route is rig.listener.route
    assert chain[0].serial_number == pki.identity("users").record.serial
    assert chain[-1] == pki.ca.root_cert
    assert len(chain) == 3


def test_a_refused_peer_is_disconnected_and_the_backend_never_dialed(pki: PKI, audit_events: list[dict]) -> None:
    refusal = Decision(False, Reason.IDENTITY_NOT_ALLOWED, "spiffe://example.test/users", 0x1F, "not on allow")
    rig = Rig(pki, authorizer=FakeAuthorizer(refusal))
    caller, wire = rig.connect()
    caller.transport.write(b"hello")
    rig.pump()
    assert caller.lost is not None and wire.server.aborted
    assert rig.backend.attempts == 0
    event = only(audit_events)
    assert event["log_level"] == LogLevel.warn
    assert (event["outcome"], event["reason"], event["serial"]) == ("refused", Reason.IDENTITY_NOT_ALLOWED, "1F")
    assert rig.sample("s2sgw_handshakes_total", route="orders-in", result="refused", reason="identity_not_allowed") == 1


def test_a_client_without_a_certificate_is_refused_with_no_client_cert(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect(pki.client_options_without_cert())
    caller.transport.write(b"hello")
    rig.pump()
    assert caller.lost is not None
    assert rig.authorizer.calls == [] and rig.backend.attempts == 0
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("refused", Reason.NO_CLIENT_CERT)


def test_a_certificate_from_another_ca_is_refused_as_untrusted(
    pki: PKI, other_pki: PKI, audit_events: list[dict]
) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect(other_pki.options("users", trust=False))
    rig.pump()
    assert caller.lost is not None and rig.backend.attempts == 0
    assert only(audit_events)["reason"] == Reason.UNTRUSTED_CHAIN


def test_the_verify_callbacks_recorded_reason_wins(pki: PKI, audit_events: list[dict]) -> None:
    """s2sgw/tls.py's verify callback leaves its reason on the TLS protocol; the audit uses it."""

    rig = Rig(pki)
    real = pki.options("orders")

    @implementer(IOpenSSLServerConnectionCreator)
    class Creator:
        def serverConnectionForTLS(self, tls_protocol: Any) -> Any:
            tls_protocol.s2sgw_chain_error = Reason.EXPIRED
            tls_protocol.s2sgw_chain_error_detail = "certificate has expired"
            return Connection(real.getContext(), None)

    rig.listener.trust_store.servers["orders"] = Creator()  # type: ignore[attr-defined]
    caller, _ = rig.connect(pki.client_options_without_cert())
    rig.pump()
    event = only(audit_events)
    assert (event["reason"], event["detail"]) == (Reason.EXPIRED, "certificate has expired")


def contexts_from_tls_module(pki: PKI, name: str) -> Any:
    """A server creator made by s2sgw/tls.py, with its fail-closed verify callback."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from s2sgw import tls

    issued = pki.identity(name)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    context = tls.server_context(chain, load_pem_private_key(issued.key_pem, None), [pki.ca.root_cert])
    return tls.ServerConnectionCreator(lambda: context)


@pytest.mark.parametrize(
    ("client", "reason"),
    [("good", Reason.OK), ("expired", Reason.EXPIRED), ("none", Reason.NO_CLIENT_CERT)],
)
def test_refusal_reasons_with_the_gateways_own_tls_contexts(
    pki: PKI, audit_events: list[dict], client: str, reason: str
) -> None:
    import datetime

    if "expired" not in pki.identities:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=3)
        pki.identities["expired"] = pki.ca.issue("expired", hours=1, now=past)
    rig = Rig(pki)
    rig.listener.trust_store.servers["orders"] = contexts_from_tls_module(pki, "orders")  # type: ignore[attr-defined]
    options = pki.client_options_without_cert() if client == "none" else pki.options(client if client != "good" else "users")
    caller, _ = rig.connect(options)
    caller.transport.write(b"hello")
    rig.pump()
    if reason == Reason.OK:
        assert bytes(rig.backend.peers[0].received) == b"hello"
        return
    assert caller.lost is not None and rig.backend.attempts == 0
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("refused", reason)


def test_a_silent_client_is_dropped_at_the_handshake_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    _, wire = rig.connect(caller=Protocol(), tls=False)
    rig.pump()
    rig.clock.advance(TIMEOUTS.handshake - 0.1)
    assert not wire.server.aborted
    rig.clock.advance(0.1)
    rig.pump()
    assert wire.server.aborted
    assert only(audit_events)["reason"] == Reason.HANDSHAKE_TIMEOUT


def test_a_slow_authorization_also_hits_the_handshake_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, authorizer=FakeAuthorizer(hold=True))
    caller, _ = rig.connect()
    rig.pump()
    rig.clock.advance(TIMEOUTS.handshake)
    rig.pump()
    assert caller.lost is not None
    rig.authorizer.release(ALLOWED)  # too late: ignored
    assert rig.backend.attempts == 0
    assert only(audit_events)["reason"] == Reason.HANDSHAKE_TIMEOUT


def test_connections_over_the_cap_are_aborted_at_once(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, backend=WireEndpoint(hold=True), max_connections=1)
    rig.connect()
    rig.pump()  # authorized: holds the one slot while its backend is dialed
    caller, wire = rig.connect()
    assert wire.server.aborted
    rig.pump()
    assert caller.lost is not None and not caller.handshaken
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("refused", Reason.TOO_MANY_CONNECTIONS)
    assert rig.listener.active == 1


def test_connections_that_have_not_authenticated_never_take_an_authorized_callers_slot(
    pki: PKI, audit_events: list[dict]
) -> None:
    """Unauthenticated connections are limited apart (per source and in total), each refusal with
    its reason; an authorized caller still gets one of max_connections."""
    rig = Rig(pki, max_connections=2, max_pending=5, max_pending_per_source=3)
    idle = [rig.connect(tls=False, source="10.0.0.66")[1] for _ in range(4)]  # TCP only, never TLS
    assert [wire.server.aborted for wire in idle] == [False, False, False, True]
    others = [rig.connect(tls=False, source="10.0.0.77")[1] for _ in range(3)]
    assert [wire.server.aborted for wire in others] == [False, False, True]
    reasons = [event["reason"] for event in audit_events]
    assert reasons == [Reason.TOO_MANY_PENDING_FROM_SOURCE, Reason.TOO_MANY_PENDING]
    labels = {"route": "orders-in", "outcome": "refused", "reason": Reason.TOO_MANY_PENDING}
    assert rig.registry.get_sample_value("s2sgw_connections_total", labels) == 1.0
    for wire in idle[:3]:  # the pending slots of one source free up as its connections go
        wire.client.loseConnection()
    rig.pump()
    caller, wire = rig.connect(source="10.0.0.1")
    rig.pump()
    assert caller.handshaken and not wire.server.aborted
    assert rig.listener.gate.admitted == 1 and rig.listener.gate.pending_total == 2


def test_an_unreachable_backend_closes_the_peer(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, backend=WireEndpoint(hold=True))
    caller, _ = rig.connect()
    rig.pump()
    rig.backend.fail(ConnectionRefusedError())
    rig.pump()
    assert caller.lost is not None
    assert only(audit_events)["reason"] == Reason.BACKEND_UNREACHABLE


def test_a_backend_that_does_not_answer_hits_the_connect_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki, backend=WireEndpoint(hold=True))
    caller, _ = rig.connect()
    rig.pump()
    rig.clock.advance(TIMEOUTS.connect)
    rig.pump()
    assert caller.lost is not None
    assert rig.backend.waiting == []  # the dial was cancelled
    event = only(audit_events)
    assert event["reason"] == Reason.BACKEND_UNREACHABLE


def test_a_peer_that_shuts_its_write_side_still_gets_the_whole_answer(pki: PKI) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect()
    rig.pump()
    caller.transport.write(b"upload")
    caller.transport.loseWriteConnection()
    rig.pump()
    backend = rig.backend.peers[0]
    assert backend.eof and bytes(backend.received) == b"upload"
    answer = hashlib.sha256(backend.received).hexdigest().encode() * 5000
    backend.transport.write(answer)
    backend.transport.loseConnection()
    rig.pump()
    assert bytes(caller.received) == answer and caller.lost is not None


def test_drain_aborts_what_is_left_after_the_timeout(pki: PKI, audit_events: list[dict]) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect()
    rig.pump()
    assert rig.listener.active == 1
    fired: list[object] = []
    rig.listener.stop_listening().addCallback(fired.append)
    assert fired == [None]
    rig.listener.drain(5.0).addCallback(fired.append)
    rig.clock.advance(4.9)
    assert fired == [None]
    rig.clock.advance(0.1)
    rig.pump()
    assert fired == [None, None]
    assert caller.lost is not None
    assert only(audit_events)["reason"] == Reason.SHUTDOWN


def test_drain_fires_when_the_last_connection_ends_by_itself(pki: PKI) -> None:
    rig = Rig(pki)
    caller, _ = rig.connect()
    rig.pump()
    fired: list[object] = []
    rig.listener.drain(5.0).addCallback(fired.append)
    caller.transport.loseConnection()
    rig.pump()
    assert fired == [None]
    assert not rig.clock.getDelayedCalls()
    assert rig.listener.drain(5.0).called  # nothing live: at once


# ---------------------------------------------------------------------------------------------
# Real sockets on loopback


@implementer(IHalfCloseableProtocol)
class DigestBackend(protocol.Protocol):
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


@implementer(IHandshakeListener)
class Uploader(HalfCloseCollector):
    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        view = memoryview(self.payload)
        for start in range(0, len(view), 65536):
            self.transport.write(bytes(view[start : start + 65536]))
        self.transport.loseWriteConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


@pytest_twisted.ensureDeferred
async def test_megabytes_cross_real_loopback_sockets_intact(pki: PKI, audit_events: list[dict]) -> None:
    from twisted.internet import reactor

    backend_port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(DigestBackend)
    )
    route = InboundRoute(
        name="orders-in",
        service="orders",
        listen="tcp:0:interface=127.0.0.1",
        backend=f"tcp:127.0.0.1:{backend_port.getHost().port}",
        allow=("users",),
    )
    listener = InboundListener(
        route,
        FakeTrustStore(servers={"orders": pki.options("orders")}),
        FakeAuthorizer(ALLOWED),
        reactor,
        TIMEOUTS,
        metrics=RouteMetrics(),
    )
    port = await listener.listen()
    assert isinstance(port, EagerPort)
    payload = hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32)  # 4 MiB
    uploader = Uploader(payload)
    try:
        client = client_endpoint(reactor, f"tcp:127.0.0.1:{port.getHost().port}")
        tls = await client.connect(TLSFactory(pki.options("users"), True, Factory.forProtocol(lambda: uploader)))
        assert isinstance(tls.transport, EagerClient)
        answer = await uploader.done.addTimeout(20, reactor)
        assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}".encode()
        for _ in range(100):
            if audit_events:
                break
            await deferLater(reactor, 0.01)
        event = only(audit_events)
        assert (event["outcome"], event["bytes_in"]) == ("closed", len(payload))
        assert event["bytes_out"] == len(answer)
    finally:
        await listener.stop_listening()
        await listener.drain(1.0)
        await backend_port.stopListening()


def deferLater(reactor: Any, seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def test_a_handshake_that_verified_no_chain_is_refused_and_nothing_is_authorized(
    pki: PKI, audit_events: list[dict]
) -> None:
    """A server context that asks for no certificate leaves no verified chain: the peer is refused
    as untrusted, and no chain the peer might have sent stands in for it."""
    rig = Rig(pki)
    rig.listener.trust_store.servers["orders"] = pki.options("orders", trust=False)  # type: ignore[attr-defined]
    caller, _ = rig.connect()
    caller.transport.write(b"hello")
    rig.pump()
    assert caller.lost is not None
    assert rig.authorizer.calls == [] and rig.backend.attempts == 0
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("refused", Reason.UNTRUSTED_CHAIN)
    assert event["detail"] == "the handshake left no verified certificate chain"


def test_a_tls_error_on_a_live_connection_is_audited_with_openssls_words(
    pki: PKI, audit_events: list[dict]
) -> None:
    """Bytes that are not TLS records after the splice end the connection as tls_error, with a detail."""
    rig = Rig(pki)
    caller, wire = rig.connect()
    caller.transport.write(b"hello")
    rig.pump()
    assert bytes(rig.backend.peers[0].received) == b"hello"
    wire.server.protocol.dataReceived(b"\x17\x03\x03\x00\x05garbage-not-a-record")
    rig.pump()
    event = only(audit_events)
    assert (event["outcome"], event["reason"]) == ("closed", Reason.TLS_ERROR)
    assert event["detail"], event
