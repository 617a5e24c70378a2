"""Doubles for data-path tests: a CA with TLS options, a trust store, an authorizer, and wires.

``Wire`` joins two protocols in memory like a TCP connection that honours what iosim's
``FakeTransport`` ignores: paused reading (data waits, the sender's buffer grows and pauses its
producer), half-close (``loseWriteConnection`` -> ``readConnectionLost`` on the other end) and
abort. Real OpenSSL runs over it when the protocols are ``TLSMemoryBIOProtocol``s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from s2sgw.ca.authority import CertificateAuthority, IssuedIdentity
from s2sgw.interfaces import Decision, IAuthorizer, IConnectionCreators, Reason

# ---------------------------------------------------------------------------------------------
# PKI and TLS options


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@attrs.define(eq=False)
class PKI:
    """A throwaway CA (the project's own CA library) and TLS options built from it."""

    ca: CertificateAuthority
    identities: dict[str, IssuedIdentity] = attrs.Factory(dict)

    @classmethod
    def create(cls, directory: Path, domain: str = "example.test") -> PKI:
        return cls(CertificateAuthority.init(directory, domain))

    def identity(self, name: str) -> IssuedIdentity:
        if name not in self.identities:
            self.identities[name] = self.ca.issue(name)
        return self.identities[name]

    def options(self, name: str, *, trust: bool = True, **kwargs: Any) -> CertificateOptions:
        """Options presenting ``name``'s certificate (+ intermediate), trusting only our root."""
        issued = self.identity(name)
        leaf = PrivateCertificate.loadPEM(issued.record.pem + issued.key_pem)
        extra = [Certificate.loadPEM(_pem(self.ca.intermediate_cert)).original]
        if trust:
            kwargs.setdefault("trustRoot", Certificate.loadPEM(_pem(self.ca.root_cert)))
        return CertificateOptions(
            privateKey=leaf.privateKey.original, certificate=leaf.original, extraCertChain=extra, **kwargs
        )

    def client_options_without_cert(self) -> CertificateOptions:
        return CertificateOptions(trustRoot=Certificate.loadPEM(_pem(self.ca.root_cert)))


@implementer(IConnectionCreators)
@attrs.define(eq=False)
class FakeTrustStore:
    """Hands out fixed options per service; records the host names clients asked for."""

    servers: dict[str, Any] = attrs.Factory(dict)
    clients: dict[str, Any] = attrs.Factory(dict)
    hostnames: list[str] = attrs.Factory(list)

    def server_creator(self, service: str) -> Any:
        return self.servers[service]

    def client_creator(self, service: str, hostname: str) -> Any:
        self.hostnames.append(hostname)
        return self.clients[service]


@implementer(IAuthorizer)
@attrs.define(eq=False)
class FakeAuthorizer:
    """Answers with ``decision`` (or waits when ``hold``); records the chains it was shown.

    Stapled answers are not used (``accept_staple`` records them and returns None), as by an
    authorizer whose status checker does not staple.
    """

    decision: Decision | None = Decision(True, Reason.OK, "spiffe://example.test/caller", 0xABC)
    hold: bool = False
    calls: list[tuple[Any, list[x509.Certificate]]] = attrs.Factory(list)
    pending: list[Deferred[Decision]] = attrs.Factory(list)
    staples: list[bytes] = attrs.Factory(list)

    def authorize(self, route: Any, chain: Sequence[x509.Certificate]) -> Deferred[Decision]:
        self.calls.append((route, list(chain)))
        if self.hold:
            waiting: Deferred[Decision] = Deferred()
            self.pending.append(waiting)
            return waiting
        assert self.decision is not None
        return defer.succeed(self.decision)

    def accept_staple(self, route: Any, chain: Sequence[x509.Certificate], der: bytes) -> None:
        self.staples.append(der)
        return None

    def release(self, decision: Decision) -> None:
        waiting = self.pending.pop(0)
        waiting.callback(decision)


# ---------------------------------------------------------------------------------------------
# In-memory connections


@implementer(ITCPTransport, IConsumer, IPushProducer)
class WireEnd:
    """One end of a :class:`Wire`: a transport for ``protocol``."""

    buffer_limit = 64 * 1024

    def __init__(self, wire: Wire, protocol: IProtocol, host: IPv4Address, peer: IPv4Address) -> None:
        self.wire = wire
        self.protocol = protocol
        self.host, self.peer = host, peer
        self.outgoing: list[bytes] = []
        self.reading_paused = False
        self.producer: Any = None
        self.producer_paused = False
        self.write_shut = False  # loseWriteConnection called
        self.eof_sent = False
        self.disconnecting = False
        self.disconnected = False
        self.aborted = False
        self.nodelay = False
        self.connected = True
        self.pause_count = 0

    # ITransport
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        if self.disconnecting or self.write_shut or self.disconnected:
            return
        self.outgoing.append(data)
        if self.producer is not None and not self.producer_paused and self.pending > self.buffer_limit:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    @property
    def pending(self) -> int:
        return sum(map(len, self.outgoing))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.outgoing.clear()

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return self.host

    # ITCPTransport extras
    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # IPushProducer (reading)
    def pauseProducing(self) -> None:
        self.reading_paused = True
        self.pause_count += 1

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()


class Wire:
    """Two protocols joined in memory; :meth:`pump` moves bytes until nothing moves."""

    def __init__(self, client: IProtocol, server: IProtocol) -> None:
        a, b = IPv4Address("TCP", "10.0.0.1", 40000), IPv4Address("TCP", "10.0.0.2", 443)
        self.client = WireEnd(self, client, a, b)
        self.server = WireEnd(self, server, b, a)
        self.client.other, self.server.other = self.server, self.client  # type: ignore[attr-defined]
        server.makeConnection(self.server)
        client.makeConnection(self.client)

    def _move(self, sender: WireEnd, receiver: WireEnd) -> bool:
        moved = False
        if sender.disconnected:
            return False
        if sender.aborted:
            self._disconnect(sender, receiver, ConnectionAborted(), ConnectionLost())
            return True
        if sender.outgoing and not receiver.reading_paused and not receiver.disconnected:
            data = b"".join(sender.outgoing)
            sender.outgoing.clear()
            receiver.protocol.dataReceived(data)
            moved = True
        if not sender.outgoing:
            if sender.producer is not None and sender.producer_paused:
                sender.producer_paused = False
                sender.producer.resumeProducing()
                moved = True
            if receiver.reading_paused:
                return moved
            if sender.disconnecting and not sender.disconnected:
                self._disconnect(sender, receiver, ConnectionDone(), ConnectionDone())
                return True
            if sender.write_shut and not sender.eof_sent:
                sender.eof_sent = True
                half = IHalfCloseableProtocol(receiver.protocol, None)
                if half is None:
                    self._disconnect(sender, receiver, ConnectionDone(), ConnectionDone())
                else:
                    half.readConnectionLost()
                    sender_half = IHalfCloseableProtocol(sender.protocol, None)
                    if sender_half is not None:
                        sender_half.writeConnectionLost()
                return True
        return moved

    def _disconnect(self, sender: WireEnd, receiver: WireEnd, mine: Exception, theirs: Exception) -> None:
        for end in (sender, receiver):
            end.disconnected = True
            end.disconnecting = True
            end.connected = False
        for end, why in ((sender, mine), (receiver, theirs)):
            producer, end.producer = end.producer, None
            if producer is not None:
                producer.stopProducing()
            end.protocol.connectionLost(Failure(why))

    def step(self) -> bool:
        moved = self._move(self.client, self.server)
        return self._move(self.server, self.client) or moved

    def pump(self) -> None:
        pump_all(self)


def pump_all(*wires: Wire, rounds: int = 10000) -> None:
    """Move bytes on all ``wires`` (a relay joins two) until nothing moves."""
    for _ in range(rounds):
        if not any([wire.step() for wire in wires]):
            return
    raise AssertionError("the wires never went quiet")


class Collector(Protocol):
    """A peer that keeps everything it receives and notes how its connection ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseCollector(Collector):
    """A Collector that supports half-close (like a TCP peer that reads after shutdown(WR))."""

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass


@implementer(IStreamClientEndpoint)
@attrs.define(eq=False)
class WireEndpoint:
    """A client endpoint whose connections are wires to protocols from ``peer_factory``.

    With ``hold``, ``connect`` waits until the test calls :meth:`complete` or :meth:`fail`.
    """

    peer_factory: Any = HalfCloseCollector
    hold: bool = False
    wires: list[Wire] = attrs.Factory(list)
    peers: list[Any] = attrs.Factory(list)
    waiting: list[tuple[Any, Deferred[Any]]] = attrs.Factory(list)
    attempts: int = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        dialing: Deferred[Any] = Deferred(lambda d: self._cancelled(factory))
        self.waiting.append((factory, dialing))
        if not self.hold:
            self.complete()
        return dialing

    def _cancelled(self, factory: Any) -> None:
        self.waiting = [(f, d) for f, d in self.waiting if f is not factory]

    def complete(self) -> Wire:
        factory, dialing = self.waiting.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 8080))
        peer = self.peer_factory()
        wire = Wire(protocol, peer)
        self.wires.append(wire)
        self.peers.append(peer)
        dialing.callback(protocol)
        return wire

    def fail(self, reason: Exception) -> None:
        _factory, dialing = self.waiting.pop(0)
        dialing.errback(reason)


def connect(server_creator, client_creator) -> Pair:
    """Run a TLS handshake between the two creators to completion, in memory."""
    server_app, client_app = Recorder(), Recorder()
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        server_creator, False, Factory.forProtocol(lambda: server_app), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_creator, True, Factory.forProtocol(lambda: client_app), clock=clock
    )
    client_tls, server_tls, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
    )
    # connectedServerAndClient names them backwards: it returns (client, server, pump) of the
    # protocols built by ClientClass and ServerClass respectively.
    assert isinstance(client_tls, TLSMemoryBIOProtocol)
    pump.flush()
    return Pair(server_tls, client_tls, server_app, client_app, pump, clock)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Remembers whether the handshake completed and why the connection ended."""

    def __init__(self) -> None:
        self.completed = False
        self.lost: Failure | None = None
        self.received = b""

    def handshakeCompleted(self) -> None:
        self.completed = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


@attrs.define
class Pair:
    server_tls: TLSMemoryBIOProtocol
    client_tls: TLSMemoryBIOProtocol
    server: Recorder
    client: Recorder
    pump: iosim.IOPump
    clock: Clock

    def flush(self) -> None:
        """Deliver everything written so far (the TLS layer may hold small writes for a tick)."""
        self.clock.advance(0)
        self.pump.flush()
