"""The gateway as twistd services: one per route, the reload service, all under one MultiService."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from s2sgw.routes.authz import Authorizer
from s2sgw.config import GatewayConfig, InboundRoute
from s2sgw.errors import StartupError, listen_problem
from s2sgw.interfaces import IStapleSource, IStatusCache, IStatusCacheStats, IStatusProbe
from s2sgw.routes.outbound import OutboundConnector
from s2sgw.status.crl_refresh import CRLRefreshMetrics, CRLRefreshService, reload_following_crl
from s2sgw.status.enforce import Enforcer, LiveCloseMetrics, PushedRevocations
from s2sgw.status.feeds import FeedFollowers
from s2sgw.status.responders import feed_urls
from s2sgw.status.settings import StatusSettings
from s2sgw.ops.descriptors import DescriptorLimitService
from s2sgw.ops.metrics import MetricsService, RouteMetrics
from s2sgw.ops.operations import Operations
from s2sgw.routes.inbound import InboundListener
from s2sgw.routes.gate import GatedRoute
from s2sgw.reload import ReloadService
from s2sgw.status.stapling import StapleMetrics, StapleService, inbound_targets, stapling_enabled
from s2sgw.status.checker import make_status_checker
from s2sgw.status.ocsp import OCSPStatusChecker, StatusMetrics
from s2sgw.status.root_crl import IntermediateCheck, RootCRLFollowers
from s2sgw.truststore import TrustStore


@attrs.define(eq=False)
class RouteService(Service):
    """Bind a route's listener at start (before privileges drop); on stop, refuse new
    connections and give live ones ``drain`` seconds to finish."""

    route: GatedRoute
    label: str
    drain: float
    # on_no_descriptors -> IStreamServerEndpoint; None: the route's own listen address
    endpoint_for: Callable[[Any], Any] | None = None
    _log = Logger()
    _port: Any = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    _stop_waiters: list[Deferred[None]] = attrs.field(factory=list, init=False)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list = []
        endpoint = None if self.endpoint_for is None else self.endpoint_for(self.route.gate.no_descriptors)
        self.route.listen(endpoint).addCallbacks(self._listening, failures.append)
        if failures:
            # Endpoints bind synchronously: "address in use" and friends stop the start, in one line.
            route = self.route.route
            key = f"[[service.{'inbound' if isinstance(route, InboundRoute) else 'outbound'}]] listen"
            error = StartupError(listen_problem(f"route {self.label} of service {route.service}", key, route.listen,
                                 failures[0].getErrorMessage()))
            raise error

    def _listening(self, port: Any) -> None:
        self._port = port
        self._log.info("route {route} listening on {address}", route=self.label, address=_describe(port))

    def stopService(self) -> Deferred:
        super().stopService()
        d = self.route.stop_listening()
        d.addCallback(lambda _: self.route.drain(self.drain))
        d.addErrback(lambda failure: self._log.failure("stopping route {route}", failure, route=self.label))
        d.addCallback(self._finished)
        return d

    def _finished(self, _: object) -> None:
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def wait_stopped(self) -> Deferred[None]:
        """Fires once this route has stopped and drained (at once if it has)."""
        if self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter


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
    feed: FeedFollowers | None = None
    stapler: StapleService | None = None


def build_gateway(
    config: GatewayConfig,
    trust_store: TrustStore,
    reactor: Any,
    registry: CollectorRegistry = REGISTRY,
    listen_endpoints: Mapping[str, Any] | None = None,
) -> tuple[MultiService, Gateway]:
    """Wire the status checker, the authorizer and one service per route.

    ``listen_endpoints`` (route name -> a callable from the route's out-of-descriptors hook to
    a server endpoint) replaces routes' listen addresses: a worker process accepts on sockets
    its parent made (:mod:`s2sgw.workers`).

    Metrics go to ``registry`` while the gateway runs (see :mod:`s2sgw.ops.metrics`): the counted
    ones are built here and handed to the parts that count; services add their own gauges.
    Each part is handed what it uses of the status checker here, or None: its cache (re-validation
    and pushed revocations), stapling, the readiness probe and the cache counters. Only the OCSP
    checker offers them; the others only ``check``.
    """
    route_metrics, status_metrics, staple_metrics = RouteMetrics(), StatusMetrics(), StapleMetrics()
    crl_metrics, close_metrics = CRLRefreshMetrics(), LiveCloseMetrics()
    checker = make_status_checker(
        config.status, reactor, trust_store.material.ca_certificates, status_metrics, roots=lambda: trust_store.roots
    )
    # Feeds follow the responders in force: a reload may add the first one (not in mode off).
    follows_feeds = config.status.mode != "off"
    feeds_at_start = any(feed_urls(r, config.status.mode) for r in config.status.responders)
    staples = IStapleSource(checker, None)
    # Revocations pushed by the feed are answered by the checker the authorizer asks: one with a
    # cache keeps them itself, the others get PushedRevocations in front.
    judging, cache = checker, IStatusCache(checker, None)
    if cache is None and feeds_at_start:
        judging = cache = PushedRevocations(checker, reactor)
    # The root's CRL, fetched beside the CA's status URLs: a revoked issuing CA refuses its leaves.
    root_crls, intermediates = None, None
    if config.status.mode in ("ocsp", "crl"):
        root_crls = RootCRLFollowers(
            reactor, lambda: trust_store.material.ca_certificates, config.status.crl_refresh, config.status.timeout
        )
        root_crls.configure(config.status)
        judging = intermediates = IntermediateCheck(judging, root_crls.active, reactor)
    authorizer = Authorizer(
        judging,
        trust_store.trust_domain or "",
        fail=config.status.fail,
        current_route=trust_store.route,
        staples=staples,
        metrics=staple_metrics,
    )
    top = MultiService()
    # Before the listeners bind: room for every connection the routes may hold.
    descriptors = DescriptorLimitService(config)
    descriptors.setServiceParent(top)
    # First: registered before any part starts, unregistered after every part has stopped.
    counted = (route_metrics, status_metrics, staple_metrics, crl_metrics, close_metrics)
    MetricsService(counted, registry).setServiceParent(top)
    routes: dict[str, InboundListener | OutboundConnector] = {}
    for service in config.services:
        for inbound in service.inbound:
            routes[inbound.name] = InboundListener(
                inbound, trust_store, authorizer, reactor, config.timeouts, metrics=route_metrics
            )
        for outbound in service.outbound:
            routes[outbound.name] = OutboundConnector(
                outbound, trust_store, authorizer, reactor, config.timeouts, metrics=route_metrics
            )
    route_services = [
        RouteService(route, name, config.timeouts.drain, (listen_endpoints or {}).get(name))
        for name, route in routes.items()
    ]
    for route_service in route_services:
        route_service.setServiceParent(top)
    # Every reload (SIGHUP, timer, CRL refresh) also hands a new CRL to the status checker.
    reload = reload_following_crl(trust_store, checker)
    operations = Operations.build(
        config,
        trust_store,
        routes,
        reactor,
        registry=registry,
        cache_stats=IStatusCacheStats(checker, None),
        prober=IStatusProbe(checker, None),
    )
    if operations.admin is not None:  # the admin endpoint outlives the drain
        operations.admin.drained = lambda: DeferredList([rs.wait_stopped() for rs in route_services])
    # Live connections: pushed revocations, re-validation at nextUpdate, peers untrusted by a reload.
    enforcer = Enforcer.for_routes(
        routes, judging, reactor, fail=config.status.fail, verify_chain=trust_store.verify_chain, cache=cache,
        metrics=close_metrics,
    )
    enforcer.setServiceParent(top)
    if root_crls is not None and intermediates is not None:  # a newer root CRL also closes live connections
        judge = intermediates.issuer_status
        root_crls.on_change.append(lambda: enforcer.issuers_revoked(judge))
    stapler = None
    if stapling_enabled(config) and staples is not None:
        # Our own OCSP answers for the inbound listeners to staple (the server contexts read this cache).
        stapler = StapleService(
            inbound_targets(trust_store), staples, reactor, trust_store.staples, max_age=config.status.max_cache_age,
            metrics=staple_metrics,
        )
        operations.monitor.sections["stapling"] = stapler.status
        stapler.setServiceParent(top)

    renewal = None
    # Every [status] setting a reload brings goes to the parts that use it (or was refused by name).
    settings = StatusSettings(lambda: trust_store.config.status)
    settings.parts.append(lambda status: setattr(authorizer, "fail", status.fail))
    settings.parts.append(lambda status: setattr(enforcer, "fail", status.fail))
    responders = None
    if isinstance(checker, OCSPStatusChecker):
        settings.parts.append(checker.configure)
        responders = checker.responders
        if responders is not None:
            operations.monitor.sections["status_servers"] = responders.status
    if stapler is not None:
        settings.parts.append(lambda status: setattr(stapler, "max_age", status.max_cache_age))

    def reloaded(generation: int) -> None:
        if responders is not None:
            responders.forget_roots()
        settings.reloaded(generation)
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

        renewal = attach_renewal(config, trust_store, reloader.reload_now, operations.monitor, reactor, registry)
        renewal.setServiceParent(top)
    feed = None
    if follows_feeds:
        feed = FeedFollowers(
            reactor, issuers=lambda: trust_store.material.ca_certificates, on_revocations=enforcer.revoked,
            registry=registry,
        )
        feed.configure(config.status)
        settings.parts.append(feed.configure)
        operations.monitor.sections["revocation_feed"] = feed.status
        feed.setServiceParent(top)
    if config.status.mode == "crl" and any(r.crl_urls for r in config.status.responders):
        # A CRL-driven reload is a reload: live connections and the summary follow it too.
        refresher = CRLRefreshService(
            trust_store,
            reload,
            reactor,
            config.status.crl_refresh,
            timeout=config.status.timeout,
            on_reloaded=reloaded,
            metrics=crl_metrics,
        )
        operations.monitor.sections["crl_refresh"] = refresher.status
        refresher.setServiceParent(top)
    if root_crls is not None:
        operations.monitor.sections["root_crl"] = root_crls.status
        settings.parts.append(root_crls.configure)
        root_crls.setServiceParent(top)
    operations.monitor.sections["descriptors"] = descriptors.status
    operations.setServiceParent(top)  # last: READY=1 after every bind, STOPPING=1 before draining
    return top, Gateway(config, trust_store, authorizer, routes, enforcer, feed, stapler)

