"""Inbound routes: peers -> mTLS -> authorize -> dial the backend -> splice.

A peer's bytes never reach the backend before the authorizer has said yes: reading is paused
once the handshake completes, whatever arrived with the handshake is held by the protocol, and
the backend is dialed only after the decision. Every connection ends in exactly one audit event.

The bookkeeping shared with outbound routes (connection cap, drain, audit, metrics) lives in
:class:`RouteGate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.ops.audit import AuditLog, AuditRecord, Direction
from s2sgw.config import InboundRoute, OutboundRoute, TimeoutsConfig
from s2sgw.identity.policy import InboundIdentity
from s2sgw.interfaces import Decision, IAuthorizer, ITrustStore, Reason
from s2sgw.ops.metrics import INTERNAL_ERROR, Metrics, default_metrics
from s2sgw.relay import Relay, RelaySide, splice
from s2sgw.transport import CurrentServerCreator, TLSFactory, client_endpoint, server_endpoint, set_tcp_nodelay

CHAIN_ERROR = "s2sgw_chain_error"  # set on the TLS protocol by the verify callback (s2sgw/tls.py)
CHAIN_ERROR_DETAIL = "s2sgw_chain_error_detail"

# ---------------------------------------------------------------------------------------------
# TLS facts


def peer_chain(tls: Any) -> list[x509.Certificate]:
    """The peer's chain as OpenSSL verified it, leaf first (empty if there is none)."""
    connection = tls.getHandle()
    chain = connection.get_verified_chain(as_cryptography=True)
    if chain:
        return list(chain)
    leaf = connection.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return []
    rest = connection.get_peer_cert_chain(as_cryptography=True) or []
    return [leaf] + [cert for cert in rest if cert != leaf]


def tls_parameters(tls: Any) -> tuple[str, str]:
    """(protocol version, cipher) of an established TLS connection."""
    connection = tls.getHandle()
    return (connection.get_protocol_version_name() or "-", connection.get_cipher_name() or "-")


def classify_handshake_failure(tls: Any, reason: Failure | None) -> tuple[str, str]:
    """A Reason code and words for a connection that ended before its handshake completed."""
    code = getattr(tls, CHAIN_ERROR, None)
    if code:
        return code, str(getattr(tls, CHAIN_ERROR_DETAIL, "") or code)
    if reason is None or reason.check(ConnectionDone):
        return Reason.TLS_ERROR, "connection closed before the TLS handshake completed"
    text = str(reason.value)
    lowered = text.lower()
    if "peer did not return a certificate" in lowered or "alert certificate required" in lowered:
        return Reason.NO_CLIENT_CERT, "the client sent no certificate"
    if "certificate verify failed" in lowered:
        return Reason.UNTRUSTED_CHAIN, text
    return Reason.TLS_ERROR, text


def dial_error(failure: Failure, timeout: float) -> str:
    """Words for a failed dial. A connect that hit its timeout was cancelled, and the
    cancellation's own message is only the address."""
    if failure.check(ConnectingCancelledError, defer.CancelledError, defer.TimeoutError):
        return f"connect timed out after {timeout:g}s"
    return failure.getErrorMessage() or failure.type.__name__


# ---------------------------------------------------------------------------------------------
# Per-connection bookkeeping


@attrs.define(eq=False)
class Session:
    """What one accepted connection did: the audit record in the making, and its relay."""

    route: str
    direction: Direction
    started: float
    address: str
    peer: str = "-"
    serial: str = "-"
    tls_version: str = "-"
    cipher: str = "-"
    outcome: str | None = None  # "refused" once refused; "closed" when a relay ends
    reason: str | None = None
    detail: str = ""
    relay: Relay | None = None
    ended: bool = False
    abort: Any = None  # callable(reason): drop the connection now (set by the owner)
    chain: tuple[x509.Certificate, ...] = ()  # the peer's verified chain, leaf first (re-validation)

    @property
    def bytes_in(self) -> int:
        return self.relay.bytes_a_to_b if self.relay is not None else 0

    @property
    def bytes_out(self) -> int:
        return self.relay.bytes_b_to_a if self.relay is not None else 0

    def refuse(self, reason: str, detail: str = "") -> None:
        if self.outcome is None:
            self.outcome, self.reason, self.detail = "refused", reason, detail

    def note_decision(self, decision: Decision) -> None:
        if decision.identity:
            self.peer = decision.identity
        if decision.serial is not None:
            self.serial = f"{decision.serial:x}"


def _address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(addr, "name", None)
    return str(name) if name else str(addr)


@attrs.define(eq=False)
class RouteGate:
    """Connection cap, live connections, drain, audit and metrics for one route."""

    _log = Logger()

    route: InboundRoute | OutboundRoute
    direction: Direction
    clock: IReactorTime
    metrics: Metrics
    audit: AuditLog
    live: set[Session] = attrs.Factory(set)
    port: IListeningPort | None = None
    draining: bool = False
    _drain_waiters: list[Deferred[None]] = attrs.Factory(list)

    @property
    def full(self) -> bool:
        return self.draining or len(self.live) >= self.route.max_connections

    def open(self, addr: Any) -> Session:
        session = Session(self.route.name, self.direction, self.clock.seconds(), _address(addr))
        self.live.add(session)
        self.metrics.opened(self.route.name)
        return session

    def spliced(self, session: Session, relay: Relay) -> None:
        session.relay = relay
        self.metrics.track(session)

    def end(self, session: Session) -> None:
        """Record the end of a connection: exactly one audit event and metrics update."""
        if session.ended:
            return
        session.ended = True
        self.live.discard(session)
        relay = session.relay
        if session.outcome is None:
            session.outcome = "closed"
            session.reason = (relay.reason if relay is not None else None) or Reason.PEER_CLOSED
        reason = session.reason or Reason.PEER_CLOSED
        duration = self.clock.seconds() - session.started
        self.metrics.untrack(session)
        self.metrics.closed(self.route.name, session.outcome, reason, duration, relay is not None)
        self.audit.connection(
            AuditRecord(
                route=self.route.name,
                direction=self.direction,
                outcome=session.outcome,  # type: ignore[arg-type]
                reason=reason,
                peer=session.peer,
                serial=session.serial,
                address=session.address,
                tls_version=session.tls_version,
                cipher=session.cipher,
                bytes_in=session.bytes_in,
                bytes_out=session.bytes_out,
                duration=duration,
                detail=session.detail,
            )
        )
        if not self.live:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def refuse_excess(self, addr: Any) -> None:
        session = self.open(addr)
        if self.draining:
            session.refuse(Reason.SHUTDOWN, "the gateway is stopping")
        else:
            session.refuse(Reason.TOO_MANY_CONNECTIONS, f"{self.route.max_connections} connections open")
        self.end(session)

    def listen_on(self, endpoint: IStreamServerEndpoint, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return endpoint.listen(factory).addCallback(listening)

    def stop_listening(self) -> Deferred[None]:
        """Stop accepting; live connections carry on (see :meth:`drain`)."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def drain(self, timeout: float, clock: IReactorTime | None = None) -> Deferred[None]:
        """Fire once every live connection has ended; abort those left after ``timeout`` seconds.

        New connections arriving meanwhile (if still listening) are refused.
        """
        self.draining = True
        if not self.live:
            return defer.succeed(None)
        clock = clock if clock is not None else self.clock
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        deadline = clock.callLater(timeout, self.abort_all, Reason.SHUTDOWN)

        def done(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            return result

        return waiter.addBoth(done)

    def close_peers(self, predicate: Callable[[Session], bool], reason: str, detail: str = "") -> int:
        """Drop the live connections ``predicate`` picks (e.g. a revoked peer), recording ``reason``."""
        count = 0
        for session in list(self.live):
            if session.ended or not predicate(session):
                continue
            if detail:
                session.detail = detail
            if session.relay is not None:
                session.relay.abort(reason)
            elif session.abort is not None:
                session.abort(reason)
            else:
                continue
            count += 1
        return count

    def abort_all(self, reason: str) -> None:
        """Drop every live connection now, recording ``reason``."""
        for session in list(self.live):
            if session.relay is not None:
                session.relay.abort(reason)
            elif session.abort is not None:
                session.abort(reason)


class _Refused(Protocol):
    """Stands in for a connection over the cap: aborted at once, no TLS work at all."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


# ---------------------------------------------------------------------------------------------
# Inbound


class BackendSide(RelaySide):
    """Our connection to a service's backend (or, outbound, nothing: see connector.py)."""

    def connectionMade(self) -> None:
        set_tcp_nodelay(self.transport)
        self.transport.pauseProducing()  # until spliced


@implementer(IHandshakeListener)
class InboundSide(RelaySide):
    """A peer gateway's mTLS connection: handshake -> authorize -> dial backend -> splice."""

    _log = Logger()

    handshake_done = False
    counted = False
    session: Session
    _timer: IDelayedCall | None = None
    _dialing: Deferred[Any] | None = None

    def __init__(self, listener: InboundListener, addr: Any) -> None:
        super().__init__()
        self.listener = listener
        self.addr = addr

    def connectionMade(self) -> None:
        listener = self.listener
        self.session = listener.gate.open(self.addr)
        self.session.abort = self._abort
        self._timer = listener.clock.callLater(listener.timeouts.handshake, self._timed_out)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if self.lost or self.session.outcome is not None:
            return
        self.transport.pauseProducing()
        listener = self.listener
        try:
            self.session.tls_version, self.session.cipher = tls_parameters(self.transport)
            chain = peer_chain(self.transport)
            self.session.chain = tuple(chain)
        except Exception:
            self._log.failure("reading the peer chain on route {route}", route=listener.route.name)
            self._refuse(INTERNAL_ERROR, "could not read the peer chain")
            return
        deciding = defer.maybeDeferred(listener.authorizer.authorize, listener.route, chain)
        deciding.addCallbacks(self._decided, self._decision_failed)

    def _decided(self, decision: Decision) -> None:
        if self.lost:
            return
        listener = self.listener
        self.session.note_decision(decision)
        self._count(decision.allowed, decision.reason)
        if not decision.allowed:
            self._refuse(decision.reason, decision.detail)
            return
        self._cancel_timer()
        dialing = listener.backend.connect(Factory.forProtocol(BackendSide))
        dialing.addTimeout(listener.timeouts.connect, listener.clock)
        self._dialing = dialing
        dialing.addCallbacks(self._backend_connected, self._backend_failed)

    def _decision_failed(self, failure: Failure) -> None:
        self._log.failure("authorizer failed on route {route}", failure, route=self.listener.route.name)
        if not self.lost:
            self._count(False, INTERNAL_ERROR)
            self._refuse(INTERNAL_ERROR, "the authorizer failed")

    def _backend_connected(self, backend: BackendSide) -> None:
        self._dialing = None
        if self.lost:
            backend.transport.loseConnection()
            return
        listener = self.listener
        a_sink = None
        if listener.identity is not None:  # only routes with identity != "none"
            try:
                a_sink = listener.identity.attach(self, backend)
            except Exception:
                self._log.failure("identity layer on route {route}", route=listener.route.name)
                backend.transport.abortConnection()
                self._refuse(INTERNAL_ERROR, "the identity layer failed")
                return
        relay = splice(
            self,
            backend,
            clock=listener.clock,
            idle_timeout=listener.timeouts.idle,
            on_close=lambda relay: listener.gate.end(self.session),
            a_sink=a_sink,
        )
        listener.gate.spliced(self.session, relay)

    def _backend_failed(self, failure: Failure) -> None:
        self._dialing = None
        if self.lost:
            return
        error = dial_error(failure, self.listener.timeouts.connect)
        self._log.warn(
            "route {route}: backend {backend} unreachable: {error}",
            route=self.listener.route.name,
            backend=self.listener.route.backend,
            error=error,
        )
        self._refuse(Reason.BACKEND_UNREACHABLE, error)

    def _count(self, allowed: bool, reason: str) -> None:
        if not self.counted:
            self.counted = True
            self.listener.metrics.handshake(self.listener.route.name, allowed, reason)

    def _timed_out(self) -> None:
        self._timer = None
        self._count(False, Reason.HANDSHAKE_TIMEOUT)
        self._refuse(Reason.HANDSHAKE_TIMEOUT, f"not done after {self.listener.timeouts.handshake:g}s")

    def _refuse(self, reason: str, detail: str) -> None:
        self.session.refuse(reason, detail)
        self._abort(reason)

    def _abort(self, reason: str) -> None:
        self.session.refuse(reason)
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def lost_before_splice(self, reason: Failure) -> None:
        self._cancel_timer()
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        session = self.session
        if session.outcome is None:
            if not self.handshake_done:
                code, detail = classify_handshake_failure(self.transport, reason)
                self._count(False, code)
                session.refuse(code, detail)
            else:
                session.outcome, session.reason = "closed", Reason.PEER_CLOSED
                session.detail = "the peer left before the relay started"
        self.listener.gate.end(session)


class _InboundFactory(Factory):
    def __init__(self, listener: InboundListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> InboundSide:
        return InboundSide(self.listener, addr)


class _CappedTLSFactory(TLSFactory):
    """Refuses connections over the route's cap before any TLS work."""

    def __init__(self, gate: RouteGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Any:
        if self.gate.full:
            self.gate.refuse_excess(addr)
            return _Refused()
        return super().buildProtocol(addr)


class GatedRoute:
    """What a route's listener does with its gate, inbound and outbound alike.

    Subclasses provide ``route``, ``reactor``, ``gate`` and the accepting ``factory``.
    """

    __slots__ = ()
    route: Any
    reactor: Any
    gate: RouteGate
    factory: Any

    @property
    def clock(self) -> IReactorTime:
        return self.reactor

    def listen(self, endpoint: IStreamServerEndpoint | None = None) -> Deferred[IListeningPort]:
        """Start accepting on ``endpoint`` (default: ``route.listen``); fires with the port."""
        if endpoint is None:
            endpoint = server_endpoint(self.reactor, self.route.listen)
        return self.gate.listen_on(endpoint, self.factory)

    def stop_listening(self) -> Deferred[None]:
        return self.gate.stop_listening()

    def drain(self, timeout: float, clock: IReactorTime | None = None) -> Deferred[None]:
        return self.gate.drain(timeout, clock)

    @property
    def active(self) -> int:
        return len(self.gate.live)


@attrs.define(eq=False)
class InboundListener(GatedRoute):
    """One inbound route: a TLS server factory, the backend dialer, and the route's gate.

    ``backend`` defaults to the client endpoint for ``route.backend``; ``reactor`` provides the
    clock and the sockets.
    """

    route: InboundRoute
    trust_store: ITrustStore
    authorizer: IAuthorizer
    reactor: Any
    timeouts: TimeoutsConfig = TimeoutsConfig()
    metrics: Metrics = attrs.field(factory=default_metrics)
    audit: AuditLog = attrs.field(factory=AuditLog)
    backend: IStreamClientEndpoint = attrs.field(default=None)
    identity: InboundIdentity | None = attrs.field(default=None)  # built when route.identity != "none"
    gate: RouteGate = attrs.field(init=False)
    factory: TLSFactory = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.backend is None:
            self.backend = client_endpoint(self.reactor, self.route.backend)
        if self.identity is None and self.route.identity != "none":
            self.identity = InboundIdentity(self.route, self.reactor)
        self.gate = RouteGate(self.route, "inbound", self.reactor, self.metrics, self.audit)
        self.factory = _CappedTLSFactory(
            self.gate,
            CurrentServerCreator(self.trust_store, self.route.service),
            False,
            _InboundFactory(self),
        )
