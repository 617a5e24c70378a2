"""Readiness and lifetimes as Prometheus gauges, computed at scrape time from the monitor's snapshot."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from s2sgw import __version__, pki
from s2sgw.interfaces import IStatusCacheStats, ITrustStore
from s2sgw.wire.est import fingerprint


class MonitorSnapshot(Protocol):
    """What the gauges read of the readiness monitor (:class:`s2sgw.ops.health.Monitor`)."""

    trust_store: ITrustStore
    cache_stats: IStatusCacheStats | None
    probe: Any  # the last ProbeResult, or None

    def now(self) -> datetime.datetime: ...

    def readiness(self) -> Any: ...


class HealthCollector:
    """Gauges computed at scrape time from the monitor's current snapshot (label sets are bounded:
    service names, root fingerprints and fixed words)."""

    def __init__(self, monitor: MonitorSnapshot) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # computed on collect; no duplicate checks against fixed names needed

    def collect(self) -> Iterator[Metric]:
        monitor = self.monitor
        store = monitor.trust_store
        material = store.material
        now = monitor.now()
        certificates = GaugeMetricFamily(
            "s2sgw_certificate_expiry_seconds",
            "Seconds until each service's own certificate expires (negative: expired).",
            labels=["service"],
        )
        certificate_ends = GaugeMetricFamily(
            "s2sgw_certificate_expiry_timestamp_seconds",
            "Unix time at which each service's own certificate expires.",
            labels=["service"],
        )
        for name, service in material.services.items():
            certificates.add_metric([name], (service.leaf.not_valid_after_utc - now).total_seconds())
            certificate_ends.add_metric([name], service.leaf.not_valid_after_utc.timestamp())
        yield certificates
        yield certificate_ends
        roots = GaugeMetricFamily(
            "s2sgw_trust_bundle_expiry_seconds",
            "Seconds until each root certificate of the trust bundle expires.",
            labels=["root", "fingerprint"],
        )
        root_ends = GaugeMetricFamily(
            "s2sgw_trust_bundle_expiry_timestamp_seconds",
            "Unix time at which each root certificate of the trust bundle expires.",
            labels=["root", "fingerprint"],
        )
        for root in material.roots:
            labels = [root.subject.rfc4514_string(), fingerprint(root)]
            roots.add_metric(labels, (root.not_valid_after_utc - now).total_seconds())
            root_ends.add_metric(labels, root.not_valid_after_utc.timestamp())
        yield roots
        yield root_ends
        crl = material.crl
        if crl is not None:
            if crl.next_update_utc is not None:
                yield GaugeMetricFamily(
                    "s2sgw_crl_expiry_seconds",
                    "Seconds until the loaded CRL's nextUpdate (negative: stale).",
                    value=(crl.next_update_utc - now).total_seconds(),
                )
                yield GaugeMetricFamily(
                    "s2sgw_crl_expiry_timestamp_seconds",
                    "Unix time of the loaded CRL's nextUpdate.",
                    value=crl.next_update_utc.timestamp(),
                )
            number = pki.crl_number(crl)
            if number is not None:
                yield GaugeMetricFamily("s2sgw_crl_number", "CRL number of the loaded CRL.", value=number)
        build = GaugeMetricFamily("s2sgw_build_info", "The running s2sgw version (always 1).", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        reloads = CounterMetricFamily(
            "s2sgw_reloads", "Trust reloads by result (ok | failed).", labels=["result"]
        )
        reloads.add_metric(["ok"], max(0, store.generation - 1))
        reloads.add_metric(["failed"], store.reload_failures)
        yield reloads
        yield GaugeMetricFamily(
            "s2sgw_trust_generation", "Generation of the trust material in use (1 at start).", value=store.generation
        )
        yield GaugeMetricFamily(
            "s2sgw_ready", "1 when /readyz would answer 200, else 0.", value=1 if monitor.readiness().ready else 0
        )
        stats = monitor.cache_stats
        if stats is not None:
            yield GaugeMetricFamily(
                "s2sgw_status_cache_entries", "Status answers held in the cache.", value=stats.cache_entries
            )
        probe = monitor.probe
        if probe is not None:
            yield GaugeMetricFamily(
                "s2sgw_status_server_up",
                "1 when the last readiness probe got a verified answer from the CA status server.",
                value=1 if probe.reachable else 0,
            )

