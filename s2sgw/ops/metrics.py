"""Prometheus metrics for the data path, with bounded label values.

Labels are route names (from the configuration), reason codes (from :class:`Reason`, anything
else becomes ``other``) and fixed words. Relayed bytes are not counted per read: a collector sums
the counters of live connections when scraped, so the relay's hot path does no metric work.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from s2sgw.interfaces import Reason

KNOWN_REASONS = frozenset(value for key, value in vars(Reason).items() if key.isupper())
INTERNAL_ERROR = "internal_error"

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, float("inf"))


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

    def collect(self) -> Iterator[Metric]:
        totals = dict(self.finished)
        for source in list(self.live):
            for direction, count in (("in", source.bytes_in), ("out", source.bytes_out)):
                key = (source.route, direction)
                totals[key] = totals.get(key, 0) + count
        family = CounterMetricFamily(
            "s2sgw_relay_bytes",
            "Bytes relayed; in = read from the accepted connection, out = written to it.",
            labels=["route", "direction"],
        )
        for (route, direction), count in sorted(totals.items()):
            family.add_metric([route, direction], count)
        yield family


class Metrics:
    """The data path's metrics, registered in ``registry`` (tests use their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.handshakes = Counter(
            "s2sgw_handshakes",
            "TLS handshakes with authorization, by result (ok | refused) and reason.",
            ["route", "result", "reason"],
            registry=registry,
        )
        self.connections = Counter(
            "s2sgw_connections",
            "Connections ended, by outcome (closed | refused) and reason.",
            ["route", "outcome", "reason"],
            registry=registry,
        )
        self.active = Gauge("s2sgw_active_connections", "Connections open now.", ["route"], registry=registry)
        self.duration = Histogram(
            "s2sgw_connection_duration_seconds",
            "Lifetime of relayed connections.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._bytes = _RelayBytes()
        registry.register(self._bytes)

    def handshake(self, route: str, allowed: bool, reason: str) -> None:
        self.handshakes.labels(route, "ok" if allowed else "refused", bounded_reason(reason)).inc()

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


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics in prometheus_client's default registry (created once)."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default
