"""What inbound and outbound routes share: per-connection sessions, the connection cap, listening,
draining and closing peers, so that both directions count, audit and stop the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.config import InboundRoute, OutboundRoute
from s2sgw.interfaces import Decision, Reason
from s2sgw.ops.audit import AuditLog, AuditRecord, Direction
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.relay import Relay
from s2sgw.serials import serial_text
from s2sgw.tlstransport import TLSFactory
from s2sgw.transport import server_endpoint


def dial_error(failure: Failure, timeout: float) -> str:
    """Words for a failed dial. A connect that hit its timeout was cancelled, and the
    cancellation's own message is only the address."""
    if failure.check(ConnectingCancelledError, defer.CancelledError, defer.TimeoutError):
        return f"connect timed out after {timeout:g}s"
    return failure.getErrorMessage() or failure.type.__name__



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
    alert: str = "-"  # the TLS alert a remote gateway refused us with (outbound)
    relay: Relay | None = None
    ended: bool = False
    abort: Any = None  # callable(reason): drop the connection now (set by the owner)
    chain: tuple[x509.Certificate, ...] = ()  # the peer's verified chain, leaf first (re-validation)
    source: str = "-"  # the peer's address without the port: pre-authorization limits count per source
    pending: bool = False  # accepted, not yet through TLS and authorization (inbound)
    admitted: bool = False  # authorized: holds one of max_connections (inbound)

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
            self.serial = serial_text(decision.serial)



def _source(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return str(host) if host is not None else _address(addr)


def _address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(addr, "name", None)
    return str(name) if name else str(addr)



@attrs.define(eq=False)
class RouteGate:
    """Connection cap, live connections, drain, audit and metrics for one route.

    With ``limit_pending`` (inbound routes), connections not yet through TLS and authorization
    are limited apart from the authorized ones (``max_pending`` in total and
    ``max_pending_per_source`` per address), and ``max_connections`` counts authorized ones only:
    connections that never authenticate cannot take an authorized caller's slot.
    """

    _log = Logger()

    route: InboundRoute | OutboundRoute
    direction: Direction
    clock: IReactorTime
    metrics: RouteMetrics
    audit: AuditLog
    live: set[Session] = attrs.Factory(set)
    port: IListeningPort | None = None
    draining: bool = False
    limit_pending: bool = False
    admitted: int = 0
    pending: dict[str, int] = attrs.Factory(dict)  # source address -> connections not yet authorized
    pending_total: int = 0
    _drain_waiters: list[Deferred[None]] = attrs.Factory(list)

    @property
    def full(self) -> bool:
        return self.draining or len(self.live) >= self.route.max_connections

    def refusal(self, addr: Any) -> tuple[str, str] | None:
        """Why a connection from ``addr`` is refused at accept, before any TLS work (or None)."""
        if self.draining:
            return Reason.SHUTDOWN, "the gateway is stopping"
        route = self.route
        if not self.limit_pending:
            if len(self.live) >= route.max_connections:
                return Reason.TOO_MANY_CONNECTIONS, f"{route.max_connections} connections open"
            return None
        if self.admitted >= route.max_connections:
            return Reason.TOO_MANY_CONNECTIONS, f"{route.max_connections} authorized connections open"
        if self.pending_total >= route.max_pending:
            return Reason.TOO_MANY_PENDING, f"{route.max_pending} connections not yet authorized"
        source = _source(addr)
        if self.pending.get(source, 0) >= route.max_pending_per_source:
            return (
                Reason.TOO_MANY_PENDING_FROM_SOURCE,
                f"{route.max_pending_per_source} connections from {source} not yet authorized",
            )
        return None

    def open(self, addr: Any) -> Session:
        session = Session(self.route.name, self.direction, self.clock.seconds(), _address(addr), source=_source(addr))
        self.live.add(session)
        self.metrics.opened(self.route.name)
        if self.limit_pending:
            session.pending = True
            self.pending[session.source] = self.pending.get(session.source, 0) + 1
            self.pending_total += 1
        return session

    def admit(self, session: Session) -> bool:
        """An authorized connection takes one of ``max_connections``; False if none is free."""
        if not self.limit_pending:
            return True
        self._settle_pending(session)
        if session.admitted:
            return True
        if self.admitted >= self.route.max_connections:
            return False
        session.admitted = True
        self.admitted += 1
        return True

    def _settle_pending(self, session: Session) -> None:
        if not session.pending:
            return
        session.pending = False
        self.pending_total -= 1
        left = self.pending[session.source] - 1
        if left:
            self.pending[session.source] = left
        else:
            del self.pending[session.source]

    def spliced(self, session: Session, relay: Relay) -> None:
        session.relay = relay
        self.metrics.track(session)

    def end(self, session: Session) -> None:
        """Record the end of a connection: exactly one audit event and metrics update."""
        if session.ended:
            return
        session.ended = True
        self.live.discard(session)
        self._settle_pending(session)
        if session.admitted:
            session.admitted = False
            self.admitted -= 1
        relay = session.relay
        if session.outcome is None:
            session.outcome = "closed"
            session.reason = (relay.reason if relay is not None else None) or Reason.PEER_CLOSED
            if not session.detail and relay is not None:
                session.detail = relay.detail
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
                alert=session.alert,
            )
        )
        if not self.live:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def refuse_excess(self, addr: Any, refusal: tuple[str, str] | None = None) -> None:
        """Audit and count a connection refused at accept (``refusal``: reason and detail)."""
        if refusal is None:
            refusal = self.refusal(addr) or (Reason.TOO_MANY_CONNECTIONS, f"{self.route.max_connections} connections open")
        session = Session(self.route.name, self.direction, self.clock.seconds(), _address(addr), source=_source(addr))
        self.live.add(session)
        self.metrics.opened(self.route.name)
        session.refuse(*refusal)
        self.end(session)

    def no_descriptors(self, addr: Any) -> None:
        """A connection closed at accept (or left unaccepted) because descriptors ran out."""
        detail = "out of file descriptors at accept (raise LimitNOFILE)"
        if addr is None:
            self._log.warn("route {route}: could not accept a connection: {detail}", route=self.route.name, detail=detail)
            self.metrics.connections.labels(self.route.name, "refused", Reason.NO_DESCRIPTORS).inc()
            return
        self.refuse_excess(addr, (Reason.NO_DESCRIPTORS, detail))

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



class RefusedProtocol(Protocol):
    """Stands in for a connection over the cap: aborted at once, no TLS work at all."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()



class CappedTLSFactory(TLSFactory):
    """Refuses connections over the route's cap before any TLS work."""

    def __init__(self, gate: RouteGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Any:
        refusal = self.gate.refusal(addr)
        if refusal is not None:
            self.gate.refuse_excess(addr, refusal)
            return RefusedProtocol()
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
            endpoint = server_endpoint(self.reactor, self.route.listen, on_no_descriptors=self.gate.no_descriptors)
        return self.gate.listen_on(endpoint, self.factory)

    def stop_listening(self) -> Deferred[None]:
        return self.gate.stop_listening()

    def drain(self, timeout: float, clock: IReactorTime | None = None) -> Deferred[None]:
        return self.gate.drain(timeout, clock)

    @property
    def active(self) -> int:
        return len(self.gate.live)

