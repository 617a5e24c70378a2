"""Outbound routes: a local plaintext client -> mTLS to the peer's gateway -> authorize -> splice.

The local client's bytes are not read until the remote gateway has completed the handshake and
the authorizer has accepted it as ``route.peer`` with a good status: a client never talks to an
impostor, not even one request.
"""

from __future__ import annotations

from typing import Any

import attrs
from OpenSSL import SSL
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
from s2sgw.config import OutboundRoute, TimeoutsConfig
from s2sgw.identity.policy import OutboundIdentity
from s2sgw.interfaces import Decision, IAuthorizer, ITrustStore, Reason
from s2sgw.ops.audit import AuditLog
from s2sgw.ops.metrics import INTERNAL_ERROR, RouteMetrics
from s2sgw.relay import RelaySide, splice
from s2sgw.routes.gate import (
    GatedRoute,
    RefusedProtocol,
    RouteGate,
    Session,
    dial_error,
)
from s2sgw.tls import received_staple
from s2sgw.tlstransport import CurrentClientCreator, TLSFactory
from s2sgw.transport import (
    client_endpoint,
    dial_factory,
    endpoint_host,
    set_tcp_nodelay,
)


class LocalSide(RelaySide):
    """The local service's plaintext connection; paused until the remote is proven."""

    _log = Logger()

    session: Session
    remote: RemoteSide | None = None
    _dialing: Deferred[Any] | None = None

    def __init__(self, connector: OutboundConnector, addr: Any) -> None:
        super().__init__()
        self.connector = connector
        self.addr = addr

    def connectionMade(self) -> None:
        set_tcp_nodelay(self.transport)
        self.transport.pauseProducing()
        connector = self.connector
        self.session = connector.gate.open(self.addr)
        self.session.abort = self._abort
        dialing = connector.remote.connect(connector.tls_factory_for(self))
        dialing.addTimeout(connector.timeouts.connect, connector.clock)
        self._dialing = dialing
        dialing.addCallbacks(self._connected, self._unreachable)

    def _connected(self, tls_protocol: Any) -> None:
        self._dialing = None
        if self.lost:
            tls_protocol.abortConnection()

    def _unreachable(self, failure: Failure) -> None:
        self._dialing = None
        if self.lost:
            return
        error = dial_error(failure, self.connector.timeouts.connect)
        self._log.warn(
            "route {route}: remote {remote} unreachable: {error}",
            route=self.connector.route.name,
            remote=self.connector.route.remote,
            error=error,
        )
        self.refuse(Reason.REMOTE_UNREACHABLE, error)

    def refuse(self, reason: str, detail: str = "") -> None:
        """Give up on this connection: record why and close the local client."""
        self.session.refuse(reason, detail)
        if not self.lost and self.transport is not None:
            self.transport.loseConnection()
        remote = self.remote
        if remote is not None and not remote.lost and remote.transport is not None:
            remote.transport.abortConnection()

    def _abort(self, reason: str) -> None:
        self.session.refuse(reason)
        for side in (self, self.remote):
            if side is not None and not side.lost and side.transport is not None:
                side.transport.abortConnection()

    def lost_before_splice(self, reason: Failure) -> None:
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        remote = self.remote
        if remote is not None and not remote.lost and remote.transport is not None:
            remote.transport.abortConnection()
        if self.session.outcome is None:
            self.session.outcome, self.session.reason = "closed", Reason.PEER_CLOSED
            self.session.detail = "the local client left before the relay started"
        # The audit waits for the remote connection to end too, if there is one.
        if remote is None or remote.lost:
            self.connector.gate.end(self.session)


@implementer(IHandshakeListener)
class RemoteSide(RelaySide):
    """The mTLS connection to the peer's gateway: handshake -> authorize -> splice."""

    _log = Logger()

    handshake_done = False
    counted = False
    _timer: IDelayedCall | None = None

    def __init__(self, local: LocalSide) -> None:
        super().__init__()
        self.local = local
        self.connector = local.connector

    def connectionMade(self) -> None:
        self.local.remote = self
        if self.local.lost:
            self.transport.abortConnection()
            return
        self._timer = self.connector.clock.callLater(self.connector.timeouts.handshake, self._timed_out)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if self.lost or self.local.lost:
            return
        self.transport.pauseProducing()
        connector = self.connector
        session = self.local.session
        try:
            session.tls_version, session.cipher = handshake.negotiated(self.transport)
            chain = handshake.peer_chain(self.transport)
            session.chain = tuple(chain)
        except handshake.NoVerifiedChain as error:
            self._count(False, Reason.UNTRUSTED_CHAIN)
            self.local.refuse(Reason.UNTRUSTED_CHAIN, str(error))
            return
        except Exception:
            self._log.failure("reading the remote chain on route {route}", route=connector.route.name)
            self._count(False, INTERNAL_ERROR)
            self.local.refuse(INTERNAL_ERROR, "could not read the remote chain")
            return
        staple = received_staple(self.transport)
        if staple is not None:  # a valid one answers the status check below
            connector.authorizer.accept_staple(connector.route, chain, staple)
        deciding = defer.maybeDeferred(connector.authorizer.authorize, connector.route, chain)
        deciding.addCallbacks(self._decided, self._decision_failed)

    def _decided(self, decision: Decision) -> None:
        if self.lost or self.local.lost:
            return
        connector = self.connector
        self.local.session.note_decision(decision)
        if not decision.allowed:
            self._count(False, decision.reason)
            self.local.refuse(decision.reason, decision.detail)
            return
        # Counted once the remote's first byte arrives or the connection ends: under TLS 1.3 the
        # remote judges our certificate after our handshake, and may still refuse.
        self._cancel_timer()
        local = self.local
        a_sink = None
        if connector.identity is not None:  # only routes with identity = "jwt"
            try:
                a_sink = connector.identity.attach(local, self, decision.identity or connector.route.peer)
            except Exception:
                self._log.failure("identity layer on route {route}", route=connector.route.name)
                self.local.refuse(INTERNAL_ERROR, "the identity layer failed")
                return
        relay = splice(
            local,
            self,
            clock=connector.clock,
            idle_timeout=connector.timeouts.idle,
            on_close=self._relay_closed,
            a_sink=a_sink,
        )
        connector.gate.spliced(local.session, relay)

    def dataReceived(self, data: bytes) -> None:
        if not self.counted and self.relay is not None:
            self._count(True, Reason.OK)
        super().dataReceived(data)

    def _refused_by_remote(self, reason: Failure | None) -> bool:
        """Record a refusal alert from the remote gateway, if ``reason`` is one; True if so."""
        if reason is None or self.bytes_received:
            return False
        alert = tlsalert.received_alert(handshake.failure_words(reason)) if reason.check(SSL.Error) else None
        if alert not in tlsalert.REFUSAL_ALERTS:
            return False
        self._count(False, Reason.REMOTE_REFUSED)
        self.connector.metrics.remote_refused(self.connector.route.name, alert)
        self.local.session.alert = alert
        self.local.refuse(Reason.REMOTE_REFUSED, f"the remote gateway refused us: TLS alert {alert}")
        return True

    def _relay_closed(self, relay: Any) -> None:
        if not self._refused_by_remote(self.lost_reason):
            self._count(True, Reason.OK)
        self.connector.gate.end(self.local.session)

    def _decision_failed(self, failure: Failure) -> None:
        self._log.failure("authorizer failed on route {route}", failure, route=self.connector.route.name)
        if not self.lost and not self.local.lost:
            self._count(False, INTERNAL_ERROR)
            self.local.refuse(INTERNAL_ERROR, "the authorizer failed")

    def _count(self, allowed: bool, reason: str) -> None:
        if not self.counted:
            self.counted = True
            self.connector.metrics.handshake(self.connector.route.name, allowed, reason)

    def _timed_out(self) -> None:
        self._timer = None
        self._count(False, Reason.HANDSHAKE_TIMEOUT)
        self.local.refuse(Reason.HANDSHAKE_TIMEOUT, f"not done after {self.connector.timeouts.handshake:g}s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def lost_before_splice(self, reason: Failure) -> None:
        self._cancel_timer()
        local = self.local
        if local.session.outcome is None:
            if not self.handshake_done or handshake.chain_error(self.transport):
                code, detail = handshake.handshake_failure(self.transport, reason)
            elif self._refused_by_remote(reason):
                code = None
            else:
                code, detail = Reason.PEER_CLOSED, "the remote gateway closed before the relay started"
                text = reason.getErrorMessage()
                if "alert" in text.lower():
                    code, detail = Reason.TLS_ERROR, handshake.failure_words(reason)
            if code is not None:
                self._count(False, code)
                local.refuse(code, detail)
        if local.lost:
            self.connector.gate.end(local.session)


class _LocalFactory(Factory):
    noisy = False  # no "Starting factory" line per listener

    def __init__(self, connector: OutboundConnector) -> None:
        self.connector = connector

    def buildProtocol(self, addr: Any) -> Any:
        gate = self.connector.gate
        if gate.full:
            gate.refuse_excess(addr)
            return RefusedProtocol()
        return LocalSide(self.connector, addr)


@attrs.define(eq=False)
class OutboundConnector(GatedRoute):
    """One outbound route: a plaintext listener whose connections are relayed over mTLS.

    ``remote`` defaults to the client endpoint for ``route.remote``; the TLS client presents
    ``route.service``'s certificate and sends the remote's host name as SNI.
    """

    route: OutboundRoute
    trust_store: ITrustStore
    authorizer: IAuthorizer
    reactor: Any
    timeouts: TimeoutsConfig = TimeoutsConfig()
    metrics: RouteMetrics = attrs.field(factory=RouteMetrics)  # the gateway's, handed over by build_gateway
    audit: AuditLog = attrs.field(factory=AuditLog)
    remote: IStreamClientEndpoint = attrs.field(default=None)
    identity: OutboundIdentity | None = attrs.field(default=None)  # built when route.identity = "jwt"
    gate: RouteGate = attrs.field(init=False)
    factory: Factory = attrs.field(init=False)
    creator: CurrentClientCreator = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.remote is None:
            self.remote = client_endpoint(self.reactor, self.route.remote)
        if self.identity is None and self.route.identity != "none":
            self.identity = OutboundIdentity.from_trust_store(self.route, self.reactor, self.trust_store)
        self.gate = RouteGate(self.route, "outbound", self.reactor, self.metrics, self.audit)
        self.factory = _LocalFactory(self)
        hostname = endpoint_host(self.route.remote) or self.route.peer
        self.creator = CurrentClientCreator(self.trust_store, self.route.service, hostname)

    def tls_factory_for(self, local: LocalSide) -> TLSFactory:
        """A TLS client factory whose one connection belongs to ``local``."""
        return TLSFactory(self.creator, True, dial_factory(lambda: RemoteSide(local)))
