"""Prometheus metrics: the one way the gateway makes them, and the data path's own.

Nothing is registered at import time. Every part's metrics are one Prometheus collector, built
unregistered, and registered on an injected ``CollectorRegistry`` when a service starts and
unregistered when it stops:

- *Counted* metrics (counters, gauges and histograms updated as things happen) are a
  :class:`MetricSet` beside the code that counts: :class:`RouteMetrics` here,
  ``StatusMetrics`` (``s2sgw/status/ocsp.py``), ``StapleMetrics`` (``s2sgw/status/stapling.py``),
  ``CRLRefreshMetrics`` (``s2sgw/status/crl_refresh.py``), ``LiveCloseMetrics``
  (``s2sgw/status/enforce.py``). :func:`s2sgw.service.build_gateway` builds one of each, hands it
  to the parts that count into it (routes, status checker, authorizer, stapler, CRL refresher,
  enforcer) and to the gateway's :class:`MetricsService`, which registers them all when it starts.
  Their families are on ``/metrics`` in every status mode, whether or not the part that counts
  runs. A part built without one (a unit test) counts into a set of its own that nobody scrapes.
- *Observed* metrics (gauges computed at scrape time from a running service's state) are a
  collector the service builds over itself in ``startService`` and registers there, and
  unregisters in ``stopService``: the :class:`~s2sgw.ops.health.Monitor`'s health gauges, the
  :class:`~s2sgw.status.feed.FeedSubscriber`'s freshness gauges and, in the CA (which imports
  nothing of the gateway), the ``StoreWatcher``'s publisher gauges.

The registry is injected: ``build_gateway`` (and the CA's ``makeService``) take one, prometheus'
default ``REGISTRY`` unless given, and pass it to the services that register (MetricsService,
Monitor, FeedSubscriber; StoreWatcher in the CA) and to the ``/metrics`` resource that serves it.
Tests give a fresh ``CollectorRegistry``, so no count leaks from one test into the next, and a
gateway stopped and built again in one process registers again without "Duplicated timeseries".

A new metric goes into its part's MetricSet (counted) or its service's collector (observed), never
into a module-level object: ``tests/test_metrics.py`` checks that importing s2sgw registers nothing
and that a gateway exposes the same families as before.

The data path's labels are bounded: route names (from the configuration), reason codes (from
:class:`Reason`, anything else becomes ``other``) and fixed words. Relayed bytes are not counted per
read: a collector sums the counters of live connections when scraped, so the relay's hot path does
no metric work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import attrs
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service

from s2sgw.interfaces import Reason

KNOWN_REASONS = frozenset(value for key, value in vars(Reason).items() if key.isupper())
INTERNAL_ERROR = "internal_error"

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, float("inf"))


class MetricSet:
    """Counted metrics of one part, as one collector: subclasses create theirs unregistered
    (``registry=None``) in ``__init__`` and list them in ``members``."""

    members: Sequence[Collector] = ()

    def describe(self) -> Iterator[Metric]:
        for member in self.members:
            yield from member.describe()  # type: ignore[attr-defined]

    def collect(self) -> Iterator[Metric]:
        for member in self.members:
            yield from member.collect()


@attrs.define(eq=False)
class MetricsService(Service):
    """Keeps the gateway's counted metrics registered on ``registry`` while it runs.

    Added first to the gateway's MultiService: registered before any other part starts,
    unregistered after every other part has stopped.
    """

    collectors: Sequence[Collector]
    registry: CollectorRegistry = REGISTRY
    _registered: list[Collector] = attrs.field(factory=list, init=False)

    def startService(self) -> None:
        super().startService()
        try:
            for collector in self.collectors:
                self.registry.register(collector)
                self._registered.append(collector)
        except Exception:
            self._unregister()  # all or nothing: a failed start leaves the registry as it was
            raise

    def stopService(self) -> None:
        super().stopService()
        self._unregister()

    def _unregister(self) -> None:
        while self._registered:
            self.registry.unregister(self._registered.pop())


class WithoutCreated:
    """A registry's families without the ``_created`` samples prometheus_client adds to counters
    and histograms (a start time per label set, which nobody graphs), leaving its process-wide
    switch alone."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.type in ("counter", "histogram", "summary", "gaugehistogram"):
                family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family

    def restricted_registry(self, names: Iterable[str]) -> WithoutCreated:
        return WithoutCreated(self.registry.restricted_registry(names))


def bounded_reason(reason: str) -> str:
    return reason if reason in KNOWN_REASONS or reason == INTERNAL_ERROR else "other"


class ByteSource(Protocol):
    """A live connection whose relayed bytes are counted at scrape time."""

    route: str

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...


class _RelayBytes:
    """Collector: bytes of finished connections plus the live counters of open ones."""

    def __init__(self) -> None:
        self.finished: dict[tuple[str, str], int] = {}
        self.live: set[ByteSource] = set()

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "s2sgw_relay_bytes",
            "Bytes relayed; in = read from the accepted connection, out = written to it.",
            labels=["route", "direction"],
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        totals = dict(self.finished)
        for source in list(self.live):
            for direction, count in (("in", source.bytes_in), ("out", source.bytes_out)):
                key = (source.route, direction)
                totals[key] = totals.get(key, 0) + count
        family = self._family()
        for (route, direction), count in sorted(totals.items()):
            family.add_metric([route, direction], count)
        yield family


class RouteMetrics(MetricSet):
    """The data path's metrics, shared by every route of a gateway."""

    def __init__(self) -> None:
        self.handshakes = Counter(
            "s2sgw_handshakes",
            "TLS handshakes with authorization, by result (ok | refused) and reason.",
            ["route", "result", "reason"],
            registry=None,
        )
        self.connections = Counter(
            "s2sgw_connections",
            "Connections ended, by outcome (closed | refused) and reason.",
            ["route", "outcome", "reason"],
            registry=None,
        )
        self.remote_refusals = Counter(
            "s2sgw_remote_refusals",
            "Outbound connections the remote gateway refused, by the TLS alert it sent.",
            ["route", "alert"],
            registry=None,
        )
        self.active = Gauge("s2sgw_active_connections", "Connections open now.", ["route"], registry=None)
        self.duration = Histogram(
            "s2sgw_connection_duration_seconds",
            "Lifetime of relayed connections.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self._bytes = _RelayBytes()
        self.members = (
            self.handshakes, self.connections, self.remote_refusals, self.active, self.duration, self._bytes
        )

    def handshake(self, route: str, allowed: bool, reason: str) -> None:
        # An admitted handshake has no reason to give: reason="" (an empty label is no label).
        self.handshakes.labels(route, "ok" if allowed else "refused", "" if allowed else bounded_reason(reason)).inc()

    def remote_refused(self, route: str, alert: str) -> None:
        self.remote_refusals.labels(route, alert).inc()

    def opened(self, route: str) -> None:
        self.active.labels(route).inc()

    def closed(self, route: str, outcome: str, reason: str, duration: float, relayed: bool) -> None:
        self.active.labels(route).dec()
        self.connections.labels(route, outcome, bounded_reason(reason)).inc()
        if relayed:
            self.duration.labels(route).observe(duration)

    def track(self, source: ByteSource) -> None:
        self._bytes.live.add(source)

    def untrack(self, source: ByteSource) -> None:
        if source in self._bytes.live:
            self._bytes.live.discard(source)
            finished = self._bytes.finished
            for direction, count in (("in", source.bytes_in), ("out", source.bytes_out)):
                key = (source.route, direction)
                finished[key] = finished.get(key, 0) + count
