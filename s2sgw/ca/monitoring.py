"""Readiness and Prometheus metrics of the CA status server: ``/readyz`` and ``/metrics``.

``/healthz`` (the publisher's own health document) says whether the server keeps up; ``/readyz``
says whether gateways can rely on its answers now, with the reasons in words when not: loaded,
the CA store read recently, the published CRL current, and the certificates that sign answers
(OCSP signer, issuing CA) still valid.

The gauges are computed at scrape time from the publisher, by a :class:`PublisherCollector` that
the ``StoreWatcher`` registers on its injected registry (prometheus' default unless given) when it
starts and unregisters when it stops: the pattern of :mod:`s2sgw.ops.metrics`, written out here
because the CA imports nothing of the gateway. ``/metrics`` serves that registry, so the process'
own metrics come along.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.web import http, resource, server

UTC = datetime.UTC


def _signing_certificates(publisher: Any) -> list[tuple[str, Any]]:
    """(label, certificate) of what answers and CRLs hang on: the CA's root, the responder's
    issuer (the intermediate) and its signing certificate."""
    return [
        ("root", publisher.ca.root_cert),
        ("intermediate", publisher.responder.issuer),
        ("ocsp_signer", publisher.responder.signer_cert),
    ]


def readiness(publisher: Any) -> tuple[bool, list[str]]:
    """Whether gateways can rely on this server's answers now; else the reasons in words."""
    reasons: list[str] = []
    now = publisher.now()
    if not publisher.ready:
        reasons.append("not loaded yet (trust bundle, revocations and a first CRL)")
    elif publisher.last_poll is None or publisher.clock.seconds() - publisher.last_poll > publisher.stale_after:
        age = "never" if publisher.last_poll is None else f"{publisher.clock.seconds() - publisher.last_poll:.1f}s ago"
        reasons.append(f"the CA store was last read {age}: revocations may be missing")
    if publisher.crl_next_update is not None and now >= publisher.crl_next_update:
        reasons.append(f"the published CRL is stale since {publisher.crl_next_update.isoformat()}")
    for label, certificate in _signing_certificates(publisher):
        if now > certificate.not_valid_after_utc:
            reasons.append(
                f"the {label.replace('_', ' ')} certificate expired at {certificate.not_valid_after_utc.isoformat()}: "
                "answers no longer verify"
            )
    return not reasons, reasons


class ReadyzResource(resource.Resource):
    """``GET /readyz``: 200 when answers can be relied on, else 503 with the reasons."""

    isLeaf = True

    def __init__(self, publisher: Any) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        ready, reasons = readiness(self._publisher)
        request.setResponseCode(http.OK if ready else http.SERVICE_UNAVAILABLE)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"ready": ready, "reasons": reasons}, sort_keys=True).encode("utf-8") + b"\n"


def add_endpoints(root: resource.Resource, publisher: Any, registry: CollectorRegistry = REGISTRY) -> None:
    """Add ``/readyz`` and ``/metrics`` (prometheus_client's Twisted resource over ``registry``)."""
    from prometheus_client.twisted import (
        MetricsResource,  # imports the global reactor: late
    )

    root.putChild(b"readyz", ReadyzResource(publisher))
    root.putChild(b"metrics", MetricsResource(registry=registry))


class PublisherCollector:
    """``s2sgw_ca_*``: computed when scraped from the publisher of a running StoreWatcher."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        publisher = self.publisher
        now = publisher.now()
        ready, _ = readiness(publisher)
        yield GaugeMetricFamily("s2sgw_ca_ready", "1 when /readyz would answer 200, else 0.", value=int(ready))
        certificates = GaugeMetricFamily(
            "s2sgw_ca_certificate_expiry_seconds",
            "Seconds until the CA's signing certificates expire.",
            labels=["certificate"],
        )
        for label, certificate in _signing_certificates(publisher):
            certificates.add_metric([label], (certificate.not_valid_after_utc - now).total_seconds())
        yield certificates
        if publisher.crl_next_update is not None:
            yield GaugeMetricFamily(
                "s2sgw_ca_crl_expiry_seconds",
                "Seconds until the published CRL's nextUpdate (it is regenerated at half its life).",
                value=(publisher.crl_next_update - now).total_seconds(),
            )
        if publisher.last_poll is not None:
            yield GaugeMetricFamily(
                "s2sgw_ca_store_poll_age_seconds",
                "Seconds since the CA store was last read successfully.",
                value=publisher.clock.seconds() - publisher.last_poll,
            )
        yield GaugeMetricFamily(
            "s2sgw_ca_revocation_seq", "Sequence number of the newest revocation applied.", value=publisher.last_seq
        )
        yield GaugeMetricFamily(
            "s2sgw_ca_cached_answers", "Pre-signed OCSP answers held.", value=len(publisher.responder)
        )
        yield CounterMetricFamily(
            "s2sgw_ca_ocsp_signatures", "OCSP answers signed.", value=publisher.responder.signatures
        )
