"""Eager TCP writes, TLS without aggregation, half-close over TLS, endpoint helpers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import main
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import TLSVersion
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer, providedBy
from zope.interface.verify import verifyObject

from s2sgw.tlstransport import HalfCloseTLSProtocol, TLSFactory
from s2sgw.transport import (
    EagerServer,
    _EagerTCPReactor,
    client_endpoint,
    endpoint_host,
    server_endpoint,
)
from tests.tlshelpers import PKI, Collector, HalfCloseCollector, Wire

# ---------------------------------------------------------------------------------------------
# Eager writes over a real socket pair (MemoryReactor records writability registrations)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@pytest.fixture
def eager() -> Any:
    reactor = MemoryReactorClock()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    protocol = Recorder()
    transport = EagerServer(ours, protocol, ("127.0.0.1", 40000), None, 1, reactor)
    protocol.makeConnection(transport)
    yield reactor, transport, theirs, protocol
    theirs.close()
    if hasattr(transport, "socket"):
        transport.socket.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def drain(reactor: MemoryReactorClock, transport: EagerServer, theirs: socket.socket) -> bytes:
    """Play the reactor: read the peer, call doWrite while registered for writability."""
    received = []
    for _ in range(100000):
        received.append(read_all(theirs))
        if transport not in reactor.getWriters():
            break
        assert transport.doWrite() is None
    received.append(read_all(theirs))
    return b"".join(received)


def test_a_write_with_nothing_queued_is_sent_at_once(eager: Any) -> None:
    """No writability registration and no reactor pass: the bytes are on the socket already."""
    reactor, transport, theirs, _ = eager
    transport.write(b"hello")
    assert read_all(theirs) == b"hello"
    assert transport not in reactor.getWriters()
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""


def test_a_partial_send_queues_the_rest_and_later_writes_keep_their_order(eager: Any) -> None:
    reactor, transport, theirs, _ = eager
    big = bytes(range(256)) * 4096  # 1 MiB, far beyond the socket buffers
    transport.write(big)
    assert transport in reactor.getWriters()
    queued = transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    assert 0 < queued < len(big)
    transport.write(b"tail-1")
    transport.writeSequence([b"tail-2", b"tail-3"])
    assert drain(reactor, transport, theirs) == big + b"tail-1tail-2tail-3"
    assert transport not in reactor.getWriters()
    transport.write(b"again")  # the fast path is back once the queue is empty
    assert read_all(theirs) == b"again"


def test_a_full_buffer_pauses_the_producer_and_draining_resumes_it(eager: Any) -> None:
    reactor, transport, theirs, _ = eager
    producer = Producer()
    transport.registerProducer(producer, True)
    transport.write(b"x" * (transport.bufferSize * 4))
    assert producer.events == ["pause"]
    drain(reactor, transport, theirs)
    assert producer.events == ["pause", "resume"]


def test_a_send_error_is_reported_through_the_normal_path_not_inside_write(eager: Any) -> None:
    reactor, transport, theirs, protocol = eager
    theirs.close()
    transport.write(b"into the void")  # EPIPE: must not raise, must not re-enter the protocol
    assert protocol.lost == []
    assert transport in reactor.getWriters()
    assert transport.doWrite() is main.CONNECTION_LOST


def test_writes_after_lose_connection_use_the_normal_path_and_are_flushed(eager: Any) -> None:
    reactor, transport, theirs, _ = eager
    transport.write(b"a")
    transport.loseConnection()
    transport.write(b"b")
    assert transport in reactor.getWriters()
    assert read_all(theirs) == b"a"
    assert transport.doWrite() is main.CONNECTION_DONE
    assert read_all(theirs) == b"b"


# ---------------------------------------------------------------------------------------------
# TLS over an in-memory wire with real OpenSSL


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("ca") / "ca")


@implementer(IHandshakeListener)
class HandshakeCollector(HalfCloseCollector):
    handshaken = False

    def handshakeCompleted(self) -> None:
        self.handshaken = True


def tls_pair(pki: PKI, client: Protocol, server: Protocol, **options: Any) -> tuple[Wire, Any, Any]:
    server_factory = TLSFactory(pki.options("server", **options), False, Factory.forProtocol(lambda: server))
    client_factory = TLSFactory(pki.options("client", **options), True, Factory.forProtocol(lambda: client))
    client_tls = client_factory.buildProtocol(None)
    server_tls = server_factory.buildProtocol(None)
    wire = Wire(client_tls, server_tls)
    wire.pump()
    return wire, client_tls, server_tls


def test_tls_factory_uses_the_plain_protocol_and_sets_tcp_nodelay(pki: PKI) -> None:
    client, server = HandshakeCollector(), HandshakeCollector()
    wire, client_tls, server_tls = tls_pair(pki, client, server)
    assert type(client_tls) is HalfCloseTLSProtocol
    assert client.handshaken and server.handshaken
    assert wire.client.nodelay and wire.server.nodelay


def test_a_tls_write_goes_out_without_waiting_for_a_reactor_pass(pki: PKI) -> None:
    client, server = HandshakeCollector(), HandshakeCollector()
    wire, _, _ = tls_pair(pki, client, server)
    client.transport.write(b"ping")
    assert wire.client.outgoing  # encrypted and handed to TCP inside write()
    wire.pump()
    assert bytes(server.received) == b"ping"


@pytest.mark.parametrize("version", [TLSVersion.TLSv1_3, TLSVersion.TLSv1_2])
def test_half_close_over_tls_lets_the_closing_side_read_the_whole_answer(pki: PKI, version: TLSVersion) -> None:
    client, server = HandshakeCollector(), HandshakeCollector()
    wire, client_tls, _ = tls_pair(pki, client, server, lowerMaximumSecurityTo=version)
    assert client_tls.getHandle().get_protocol_version_name() == version.name.replace("_", ".")
    client.transport.write(b"question")
    client.transport.loseWriteConnection()
    wire.pump()
    assert bytes(server.received) == b"question"
    assert server.eof and server.lost is None and client.lost is None
    answer = b"answer " * 10000
    server.transport.write(answer)
    wire.pump()
    assert bytes(client.received) == answer
    assert client.lost is None
    server.transport.loseWriteConnection()
    wire.pump()
    assert client.eof is False  # both sides shut: a full, clean close
    assert client.lost is not None and server.lost is not None
    assert client.lost.check(main.CONNECTION_DONE.__class__)


def test_close_notify_closes_fully_when_the_protocol_cannot_half_close(pki: PKI) -> None:
    client, server = HandshakeCollector(), Collector()
    wire, _, _ = tls_pair(pki, client, server)
    client.transport.loseWriteConnection()
    wire.pump()
    assert server.lost is not None


def test_a_tcp_eof_without_close_notify_is_a_full_close(pki: PKI) -> None:
    client, server = HandshakeCollector(), HandshakeCollector()
    wire, client_tls, _ = tls_pair(pki, client, server)
    client_tls.transport.loseConnection()  # underneath TLS: truncation, not a half-close
    wire.pump()
    assert server.lost is not None and not server.eof


def test_lose_connection_does_not_wait_for_the_peers_close_notify(pki: PKI) -> None:
    client, server = HandshakeCollector(), HandshakeCollector()
    wire, _, _ = tls_pair(pki, client, server)
    client.transport.loseConnection()
    assert wire.client.disconnecting


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_endpoint_host_reads_tcp_strings() -> None:
    assert endpoint_host("tcp:users.example:8443") == "users.example"
    assert endpoint_host("tcp:host=10.1.2.3:port=8443") == "10.1.2.3"
    assert endpoint_host("tcp6:port=8443:host=\\:\\:1") == "::1"
    assert endpoint_host("unix:/run/x.sock") is None


def test_tcp_endpoints_get_the_reactors_tcp_and_nothing_else() -> None:
    """``tcp:`` endpoints ask their reactor for IReactorTCP only; the eager one provides exactly that."""
    from twisted.internet import reactor

    eager = _EagerTCPReactor(reactor)
    assert list(providedBy(eager)) == [IReactorTCP]
    assert verifyObject(IReactorTCP, eager)


def test_endpoints_fall_back_to_twisteds_own_without_a_posix_reactor(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    assert isinstance(client_endpoint(reactor, "tcp:127.0.0.1:1"), TCP4ClientEndpoint)
    assert isinstance(client_endpoint(reactor, f"unix:{tmp_path}/s"), UNIXClientEndpoint)
    server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
    assert reactor.tcpServers[0][2] == 511  # Twisted's own listenTCP, with our default backlog
    server_endpoint(reactor, "tcp:0:interface=127.0.0.1:backlog=64").listen(Factory())
    assert reactor.tcpServers[1][2] == 64  # a backlog= of the operator's stays
