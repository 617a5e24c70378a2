"""Renewal as Prometheus metrics, computed at scrape time: renewals by outcome, the next renewal."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from s2sgw.enroll.schedule import RESULTS, ServiceRenewal


class RenewalCollector:
    """``s2sgw_certificate_renewals_total`` and ``s2sgw_certificate_next_renewal_timestamp_seconds``,
    computed when scraped (labels: configured service names and fixed results)."""

    def __init__(self, states: Mapping[str, ServiceRenewal]) -> None:
        self.states = states  # the renewal service's own, read at each scrape

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        renewals = CounterMetricFamily(
            "s2sgw_certificate_renewals",
            "Certificate renewals over EST by result (ok | refused: the CA said no | failed).",
            labels=["service", "result"],
        )
        next_renewal = GaugeMetricFamily(
            "s2sgw_certificate_next_renewal_timestamp_seconds",
            "Unix time of the next renewal attempt of each service's certificate.",
            labels=["service"],
        )
        for name, state in self.states.items():
            for result in RESULTS:
                renewals.add_metric([name, result], state.counts[result])
            next_renewal.add_metric([name], math.nan if state.next_at is None else state.next_at)
        yield renewals
        yield next_renewal
