"""Inbound routes: peers -> mTLS -> authorize -> dial the backend -> splice.

A peer's bytes never reach the backend before the authorizer has said yes: reading is paused
once the handshake completes, whatever arrived with the handshake is held by the protocol, and
the backend is dialed only after the decision. Every connection ends in exactly one audit event.

The bookkeeping shared with outbound routes (connection cap, drain, audit, metrics) lives in
:class:`RouteGate`.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw import handshake, tlsalert
from s2sgw.config import InboundRoute, TimeoutsConfig
from s2sgw.identity.policy import InboundIdentity
from s2sgw.interfaces import Decision, IAuthorizer, IConnectionCreators, Reason
from s2sgw.ops.audit import AuditLog
from s2sgw.ops.metrics import INTERNAL_ERROR, RouteMetrics
from s2sgw.relay import RelaySide, splice
from s2sgw.routes.gate import (
    CappedTLSFactory,
    GatedRoute,
    RouteGate,
    Session,
    dial_error,
)
from s2sgw.tlstransport import CurrentServerCreator, HalfCloseTLSProtocol, TLSFactory
from s2sgw.transport import client_endpoint, dial_factory, set_tcp_nodelay

# ---------------------------------------------------------------------------------------------
# Per-connection bookkeeping


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
            self.session.tls_version, self.session.cipher = handshake.negotiated(self.transport)
            chain = handshake.peer_chain(self.transport)
            self.session.chain = tuple(chain)
        except handshake.NoVerifiedChain as error:
            self._count(False, Reason.UNTRUSTED_CHAIN)
            self._refuse(Reason.UNTRUSTED_CHAIN, str(error))
            return
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
        if not listener.gate.admit(self.session):
            limit = listener.route.max_connections
            self._refuse(Reason.TOO_MANY_CONNECTIONS, f"{limit} authorized connections open")
            return
        self._cancel_timer()
        tlsalert.forget_secret(self.transport)
        dialing = listener.backend.connect(dial_factory(BackendSide))
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
            b_closed=Reason.BACKEND_CLOSED,
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
        """Record the refusal and close; a refused certificate or identity hears why (a TLS alert)."""
        self.session.refuse(reason, detail)
        alert = tlsalert.ALERT_FOR_REASON.get(reason)
        tls = self.transport
        if alert is not None and not self.lost and isinstance(tls, HalfCloseTLSProtocol):
            if tls.refuse_with_alert(alert):
                return
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
                code, detail = handshake.handshake_failure(self.transport, reason)
                self._count(False, code)
                session.refuse(code, detail)
            else:
                session.outcome, session.reason = "closed", Reason.PEER_CLOSED
                session.detail = "the peer left before the relay started"
        self.listener.gate.end(session)


class _InboundFactory(Factory):
    noisy = False  # no "Starting factory" line per listener

    def __init__(self, listener: InboundListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> InboundSide:
        return InboundSide(self.listener, addr)


@attrs.define(eq=False)
class InboundListener(GatedRoute):
    """One inbound route: a TLS server factory, the backend dialer, and the route's gate.

    ``backend`` defaults to the client endpoint for ``route.backend``; ``reactor`` provides the
    clock and the sockets.
    """

    route: InboundRoute
    trust_store: IConnectionCreators
    authorizer: IAuthorizer
    reactor: Any
    timeouts: TimeoutsConfig = TimeoutsConfig()
    metrics: RouteMetrics = attrs.field(factory=RouteMetrics)  # the gateway's, handed over by build_gateway
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
        self.gate = RouteGate(self.route, "inbound", self.reactor, self.metrics, self.audit, limit_pending=True)
        self.factory = CappedTLSFactory(
            self.gate,
            CurrentServerCreator(self.trust_store, self.route.service),
            False,
            _InboundFactory(self),
        )
