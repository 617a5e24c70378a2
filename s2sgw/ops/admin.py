"""The admin endpoint: ``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` over HTTP.

Off unless ``[admin] listen`` is set, and loopback or a unix socket unless ``allow_remote``:
it shows identities, serials and traffic counters. Answers come from the :class:`Monitor`; the
metrics are prometheus_client's Twisted resource over the gateway's registry (prometheus' default
unless one is given; see :mod:`s2sgw.ops.metrics`). Requests are not access-logged (scrapers would
drown the audit trail).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import http, resource, server

from s2sgw.errors import StartupError, listen_problem
from s2sgw.ops.health import Monitor
from s2sgw.ops.metrics import WithoutCreated
from s2sgw.ops.status_page import status_document

JSON = b"application/json"


def _json(request: server.Request, document: object, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON)
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"


class HealthzResource(resource.Resource):
    """``GET /healthz``: 200 while the process answers at all (liveness)."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, {"status": "ok"})


class ReadyzResource(resource.Resource):
    """``GET /readyz``: 200 when fit for traffic, else 503 with the reasons in words."""

    isLeaf = True

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        self._monitor = monitor

    def render_GET(self, request: server.Request) -> bytes:
        state = self._monitor.readiness()
        code = http.OK if state.ready else http.SERVICE_UNAVAILABLE
        return _json(request, {"ready": state.ready, "reasons": list(state.reasons)}, code)


class StatusResource(resource.Resource):
    """``GET /status``: certificates, trust, CRL, status checks, reloads and routes as JSON."""

    isLeaf = True

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        self._monitor = monitor

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, status_document(self._monitor))


class MetricsResource(resource.Resource):
    """``GET /metrics``: the registry in the format the scraper accepts, encoded in the reactor's
    thread pool. Not prometheus_client's Twisted resource: that one is WSGI, which fails for a
    peer on a unix socket (it has no host), and the admin endpoint may listen on one."""

    isLeaf = True
    _log = Logger()

    def __init__(self, registry: CollectorRegistry, reactor: Any = None) -> None:
        super().__init__()
        self._registry = registry
        self._reactor = reactor

    def render_GET(self, request: server.Request) -> int:
        from prometheus_client.exposition import choose_encoder
        from twisted.internet.threads import deferToThreadPool

        reactor = self._reactor
        if reactor is None:
            # Late, as for every part of the gateway.
            from twisted.internet import reactor
        encoder, content_type = choose_encoder((request.getHeader(b"accept") or b"").decode("latin-1"))
        d = deferToThreadPool(reactor, reactor.getThreadPool(), encoder, self._registry)

        def answer(body: bytes) -> None:
            if not request._disconnected:
                request.setHeader(b"Content-Type", content_type.encode("ascii"))
                request.write(body)
                request.finish()

        def failed(failure: Any) -> None:
            self._log.failure("rendering /metrics", failure)
            if not request._disconnected:
                request.setResponseCode(http.INTERNAL_SERVER_ERROR)
                request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


def metrics_resource(registry: CollectorRegistry = REGISTRY) -> resource.Resource:
    """The registry at ``GET /metrics``, without ``_created`` series."""
    return MetricsResource(WithoutCreated(registry))


def build_admin_root(monitor: Monitor, registry: CollectorRegistry = REGISTRY) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"healthz", HealthzResource())
    root.putChild(b"readyz", ReadyzResource(monitor))
    root.putChild(b"status", StatusResource(monitor))
    root.putChild(b"metrics", metrics_resource(registry))
    return root


class AdminSite(server.Site):
    """A Site without access logging."""

    noisy = False

    def log(self, request: server.Request) -> None:
        pass


@attrs.define(eq=False)
class AdminService(Service):
    """Bind the admin endpoint with the routes (before privileges drop); stop listening on stop."""

    listen: str
    monitor: Monitor
    reactor: Any
    registry: CollectorRegistry = REGISTRY
    # Fires once the routes have drained: the endpoint answers (/readyz: 503 "stopping") until then.
    drained: Callable[[], Deferred[Any]] = attrs.field(default=lambda: succeed(None))
    port: Any = attrs.field(default=None, init=False)
    _log = Logger()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        site = AdminSite(build_admin_root(self.monitor, self.registry))
        failures: list = []
        serverFromString(self.reactor, self.listen).listen(site).addCallbacks(self._listening, failures.append)
        if failures:  # "address in use" is a start-up error, as for routes
            error = StartupError(listen_problem("the admin endpoint", "[admin] listen", self.listen, failures[0].getErrorMessage()))
            raise error

    def _listening(self, port: Any) -> None:
        self.port = port
        self._log.info("admin endpoint listening on {address}", address=str(port.getHost()))

    def stopService(self) -> Deferred[None]:
        super().stopService()

        def close(_: object) -> Deferred[None]:
            port, self.port = self.port, None
            if port is None:
                return succeed(None)
            return maybeDeferred(port.stopListening)

        return maybeDeferred(self.drained).addBoth(close)
