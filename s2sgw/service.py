"""The gateway as twistd services: one per route, the reload service, all under one MultiService."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from s2sgw.authz import Authorizer
from s2sgw.config import GatewayConfig
from s2sgw.connector import OutboundConnector
from s2sgw.crlrefresh import CRLRefreshService, reload_following_crl
from s2sgw.enforce import Enforcer, PushedRevocations
from s2sgw.feed import FeedSubscriber, feed_url, register_metrics
from s2sgw.health import Operations
from s2sgw.listener import GatedRoute, InboundListener
from s2sgw.reload import ReloadService
from s2sgw.stapling import StapleService, inbound_targets, stapling_enabled
from s2sgw.status import make_status_checker
from s2sgw.truststore import TrustStore


@attrs.define(eq=False)
class RouteService(Service):
    """Bind a route's listener at start (before privileges drop); on stop, refuse new
    connections and give live ones ``drain`` seconds to finish."""

    route: GatedRoute
    label: str
    drain: float
    _log = Logger()
    _port: Any = attrs.field(default=None, init=False)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list = []
        self.route.listen().addCallbacks(self._listening, failures.append)
        if failures:
            # Endpoints bind synchronously: surface "address in use" and friends as a start-up error.
            failures[0].raiseException()

    def _listening(self, port: Any) -> None:
        self._port = port
        self._log.info("route {route} listening on {address}", route=self.label, address=_describe(port))

    def stopService(self) -> Deferred:
        super().stopService()
        d = self.route.stop_listening()
        d.addCallback(lambda _: self.route.drain(self.drain))
        d.addErrback(lambda failure: self._log.failure("stopping route {route}", failure, route=self.label))
        return d


def _describe(port: Any) -> str:
    try:
        address = port.getHost()
    except Exception:
        return repr(port)
    host, port_number = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port_number}" if port_number is not None else str(getattr(address, "name", address))


@attrs.define(eq=False)
class Gateway:
    """The parts one gateway process shares across its routes."""

    config: GatewayConfig
    trust_store: TrustStore
    authorizer: Authorizer
    routes: dict[str, InboundListener | OutboundConnector]
    enforcer: Enforcer | None = None
    feed: FeedSubscriber | None = None
    stapler: StapleService | None = None


def build_gateway(config: GatewayConfig, trust_store: TrustStore, reactor: Any) -> tuple[MultiService, Gateway]:
    """Wire the status checker, the authorizer and one service per route."""
    checker = make_status_checker(config.status, reactor, trust_store.material.ca_certificates)
    url = feed_url(config.status)
    # Revocations pushed by the feed are answered by the checker the authorizer asks.
    judging = PushedRevocations(checker, reactor) if url is not None and not hasattr(checker, "revoke") else checker
    authorizer = Authorizer(
        judging, trust_store.trust_domain or "", fail=config.status.fail, current_route=trust_store.route
    )
    top = MultiService()
    routes: dict[str, InboundListener | OutboundConnector] = {}
    for service in config.services:
        for inbound in service.inbound:
            routes[inbound.name] = InboundListener(inbound, trust_store, authorizer, reactor, config.timeouts)
        for outbound in service.outbound:
            routes[outbound.name] = OutboundConnector(outbound, trust_store, authorizer, reactor, config.timeouts)
    for name, route in routes.items():
        RouteService(route, name, config.timeouts.drain).setServiceParent(top)
    # Every reload (SIGHUP, timer, CRL refresh) also hands a new CRL to the status checker.
    reload = reload_following_crl(trust_store, checker)
    operations = Operations.build(config, trust_store, checker, routes, reactor)
    # Live connections: pushed revocations, re-validation at nextUpdate, peers untrusted by a reload.
    enforcer = Enforcer.for_routes(
        routes, judging, reactor, fail=config.status.fail, verify_chain=trust_store.verify_chain
    )
    enforcer.setServiceParent(top)
    stapler = None
    if stapling_enabled(config) and hasattr(checker, "fetch_staple"):
        # Our own OCSP answers for the inbound listeners to staple (the server contexts read this cache).
        stapler = StapleService(
            inbound_targets(trust_store), checker, reactor, trust_store.staples, max_age=config.status.max_cache_age
        )
        operations.monitor.sections["stapling"] = stapler.status
        stapler.setServiceParent(top)

    renewal = None

    def reloaded(generation: int) -> None:
        operations.reloaded(generation)
        enforcer.trust_reloaded(generation)
        if stapler is not None:
            stapler.trust_reloaded(generation)
        if renewal is not None:
            renewal.trust_reloaded(generation)

    reloader = ReloadService(
        operations.reloading(reload), reactor, interval=config.reload_interval, on_reloaded=reloaded
    )
    reloader.setServiceParent(top)
    if config.enrollment is not None:
        # Renewed certificates and CA roots go in force through the same coalesced reload as SIGHUP.
        from s2sgw.enroll.renewal import attach_renewal

        renewal = attach_renewal(config, trust_store, reloader.reload_now, operations.monitor, reactor)
        renewal.setServiceParent(top)
    feed = None
    if url is not None:
        feed = FeedSubscriber(
            url, reactor, issuers=lambda: trust_store.material.ca_certificates, on_revocations=enforcer.revoked
        )
        register_metrics(feed)
        operations.monitor.sections["revocation_feed"] = feed.status
        feed.setServiceParent(top)
    if config.status.mode == "crl" and config.status.crl_url is not None:
        # A CRL-driven reload is a reload: live connections and the summary follow it too.
        refresher = CRLRefreshService(
            trust_store,
            reload,
            reactor,
            config.status.crl_refresh,
            timeout=config.status.timeout,
            on_reloaded=reloaded,
        )
        operations.monitor.sections["crl_refresh"] = refresher.status
        refresher.setServiceParent(top)
    operations.setServiceParent(top)  # last: READY=1 after every bind, STOPPING=1 before draining
    return top, Gateway(config, trust_store, authorizer, routes, enforcer, feed, stapler)

