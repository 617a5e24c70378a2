"""The CA status server's /readyz and /metrics: in-process on a Clock, and a real `twistd s2sgw-ca`."""

from __future__ import annotations

import datetime
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.web import resource

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.monitoring import ReadyzResource, readiness
from tests.doubles import Inline, make_harness
from tests.e2e import Processes, free_port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", "example.org")


def _readyz(publisher) -> tuple[int, dict]:
    root = resource.Resource()
    root.putChild(b"readyz", ReadyzResource(publisher))
    stub = StubTreq(root)
    responses: list = []
    stub.get("http://ca.test/readyz").addCallback(responses.append)
    stub.flush()
    bodies: list = []
    stub.content(responses[0]).addCallback(bodies.append)
    stub.flush()
    return responses[0].code, json.loads(bodies[0])


def test_ready_once_loaded_and_polling(ca: CertificateAuthority) -> None:
    harness = make_harness(ca)
    try:
        assert _readyz(harness.publisher) == (200, {"ready": True, "reasons": []})
    finally:
        harness.watcher.stopService()


def test_not_ready_while_the_store_cannot_be_read(ca: CertificateAuthority, logged_errors) -> None:
    logged_errors.expect("reading the CA store failed")
    broken = Inline(fail=lambda name: name == "_read_changes")
    harness = make_harness(ca, inline=broken)
    try:
        assert readiness(harness.publisher)[0]
        harness.clock.advance(10)  # polls keep failing past stale_after (5 s)
        code, document = _readyz(harness.publisher)
        assert code == 503
        assert document["reasons"][0].startswith("the CA store was last read ")
    finally:
        harness.watcher.stopService()


def test_not_ready_when_the_ocsp_signer_has_expired(ca: CertificateAuthority) -> None:
    harness = make_harness(ca)
    try:
        signer_end = ca.ocsp_cert.not_valid_after_utc.timestamp()
        harness.watcher.stopService()
        harness.clock.advance(signer_end - harness.clock.seconds() + 60)
        ready, reasons = readiness(harness.publisher)
        assert not ready
        assert any(r.startswith("the ocsp signer certificate expired at") for r in reasons)
    finally:
        if harness.watcher.running:
            harness.watcher.stopService()


def test_metrics_add_expiry_and_answer_gauges_to_the_process_metrics(ca: CertificateAuthority) -> None:
    registry = CollectorRegistry()
    Counter("process_wide_example", "A metric of the process.", registry=registry).inc()
    harness = make_harness(ca, registry=registry)  # the watcher adds the publisher's gauges when it starts
    try:
        found = _samples(generate_latest(registry).decode())
        assert found[("process_wide_example_total", ())] == 1
        assert found[("s2sgw_ca_ready", ())] == 1
        assert found[("s2sgw_ca_crl_expiry_seconds", ())] > 23 * 3600
        assert found[("s2sgw_ca_certificate_expiry_seconds", (("certificate", "ocsp_signer"),))] > 0
        assert found[("s2sgw_ca_certificate_expiry_seconds", (("certificate", "root"),))] > 0
        assert ("s2sgw_ca_ocsp_signatures_total", ()) in found
    finally:
        harness.watcher.stopService()


def test_the_gauges_are_registered_while_the_store_watcher_runs(ca: CertificateAuthority) -> None:
    """Started: the publisher's gauges are in the registry; stopped: gone. A second status server built
    in the same process afterwards registers them again (no "Duplicated timeseries")."""
    registry = CollectorRegistry()
    for _ in range(2):
        harness = make_harness(ca, registry=registry)
        try:
            assert ("s2sgw_ca_ready", ()) in _samples(generate_latest(registry).decode())
        finally:
            harness.watcher.stopService()
        assert generate_latest(registry) == b""


@pytest.mark.e2e
def test_real_status_server_serves_readyz_and_metrics(ca: CertificateAuthority, tmp_path: Path) -> None:
    port = free_port()
    procs = Processes(tmp_path)
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(ca.directory), "--listen", f"tcp:{port}:interface=127.0.0.1")
        procs.wait_port(port)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=10)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    assert json.loads(response.read()) == {"ready": True, "reasons": []}
                    break
            except urllib.error.HTTPError:
                assert datetime.datetime.now() < deadline, "the status server never became ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            found = _samples(response.read().decode())
        assert found[("s2sgw_ca_ready", ())] == 1
        assert found[("s2sgw_ca_store_poll_age_seconds", ())] < 5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        procs.stop_all()
