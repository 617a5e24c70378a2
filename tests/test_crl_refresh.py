"""CRL refresh: fetched CRLs are checked, written atomically and swapped in; bad ones are refused.

Units run over ``treq.testing.StubTreq`` with a ``Clock``; the end-to-end test at the bottom runs a
real ``twistd s2sgw-ca`` serving ``/crl`` and a real gateway pair in mode ``crl``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from treq.testing import StubTreq
from prometheus_client import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from s2sgw import pki
from s2sgw.config import load_config
from s2sgw.status.crl_refresh import CRLRefreshMetrics, CRLRefreshService, reload_following_crl
from s2sgw.files import write_atomically
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.truststore import TrustStore
from tests.doubles import SyncReactor
from tests.pkifactory import TestCA, new_key, now
from tests.reloadkit import CRL_REFRESH_CONFIG

CRL_URL = "http://ca.test/crl"




class CRLResource(Resource):
    """``GET /crl`` answering ``body`` with ``code``; ETag and If-None-Match like the CA's; ``hold``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b""
        self.code = 200
        self.hold = False
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        if self.hold:
            return NOT_DONE_YET
        etag = b'"' + hashlib.sha256(self.body).hexdigest()[:16].encode() + b'"'
        if self.code == 200 and request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        request.setResponseCode(self.code)
        request.setHeader(b"ETag", etag)
        request.setHeader(b"Content-Type", b"application/pkix-crl")
        return self.body




@attrs.define
class Rig:
    directory: Path
    ca: TestCA
    reactor: SyncReactor
    store: TrustStore
    checker: CRLStatusChecker
    resource: CRLResource
    stub: StubTreq
    refresher: CRLRefreshService
    generations: list[int]
    registry: CollectorRegistry

    @property
    def crl_file(self) -> Path:
        return self.directory / "ca.crl"

    def serve(self, crl: x509.CertificateRevocationList) -> None:
        self.resource.body = crl.public_bytes(serialization.Encoding.DER)

    def refresh(self) -> str:
        outcomes: list[Any] = []
        self.refresher.refresh().addBoth(outcomes.append)
        self.stub.flush()
        assert outcomes, "refresh did not finish"
        return outcomes[0]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "orders")
    (tmp_path / "ca.crl").write_bytes(ca.crl(number=5).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "gateway.toml").write_text(CRL_REFRESH_CONFIG.format(url=CRL_URL))
    reactor = SyncReactor()
    store = TrustStore.load(load_config(tmp_path / "gateway.toml"), reactor, threadpool=reactor)
    checker = CRLStatusChecker.from_path(tmp_path / "ca.crl", reactor)
    resource = CRLResource()
    stub = StubTreq(resource)
    reload = reload_following_crl(store, checker)
    generations: list[int] = []
    registry, metrics = CollectorRegistry(), CRLRefreshMetrics()
    registry.register(metrics)  # as the gateway's MetricsService does when it starts
    refresher = CRLRefreshService(
        store, reload, reactor, 60.0, http=stub, timeout=5.0, max_bytes=64 * 1024, on_reloaded=generations.append,
        metrics=metrics,
    )
    return Rig(tmp_path, ca, reactor, store, checker, resource, stub, refresher, generations, registry)


def _number_on_disk(rig: Rig) -> int | None:
    return pki.crl_number(pki.load_crl(rig.crl_file))


def _count(rig: Rig, outcome: str) -> float:
    return rig.registry.get_sample_value("s2sgw_crl_refreshes_total", {"outcome": outcome}) or 0.0


def _status(rig: Rig, leaf: x509.Certificate) -> str:
    results: list[Any] = []
    rig.checker.check(leaf, rig.ca.intermediate).addBoth(results.append)
    return results[0].state


def test_newer_crl_is_written_and_used_by_store_and_checker(rig: Rig) -> None:
    """A CRL listing a peer reaches the file, the trust store and the status checker in one refresh."""
    peer = rig.ca.issue("users").leaf
    assert _status(rig, peer) == "good"
    rig.serve(rig.ca.crl([peer], number=6))
    before = _count(rig, "updated")
    assert rig.refresh() == "updated"
    assert _number_on_disk(rig) == 6
    assert rig.crl_file.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert rig.store.material.crl_number == 6
    assert rig.store.generation == 2
    assert _status(rig, peer) == "revoked"
    assert _count(rig, "updated") == before + 1
    assert rig.generations == [2]
    assert list(rig.directory.glob(".ca.crl.*")) == []  # no temp file left behind


def test_replayed_older_crl_is_refused_and_logged(rig: Rig, caplog_events) -> None:
    """A CRL whose number is lower than the current one never replaces it."""
    rig.serve(rig.ca.crl(number=4))
    before = _count(rig, "refused")
    assert rig.refresh() == "refused"
    assert _number_on_disk(rig) == 5
    assert rig.store.material.crl_number == 5 and rig.store.generation == 1
    assert rig.generations == []
    assert rig.refresher.refused == 1
    assert "lower than the current 5" in (rig.refresher.last_error or "")
    assert any("CRL from http://ca.test/crl refused" in text and "lower than" in text for text in caplog_events)
    assert _count(rig, "refused") == before + 1


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda ca: ca.crl(number=9, signer_key=new_key()), "signature does not verify"),
        (
            lambda ca: ca.crl(
                number=9,
                last_update=now() - datetime.timedelta(hours=3),
                next_update=now() - datetime.timedelta(hours=1),
            ),
            "stale",
        ),
        (lambda ca: TestCA.create(cn="Other Root").crl(number=9), "signature does not verify"),
    ],
    ids=["forged", "stale", "foreign"],
)
def test_bad_crl_is_refused_and_the_file_is_untouched(rig: Rig, make, words: str) -> None:
    original = rig.crl_file.read_bytes()
    rig.serve(make(rig.ca))
    assert rig.refresh() == "refused"
    assert words in (rig.refresher.last_error or "")
    assert rig.crl_file.read_bytes() == original
    assert rig.store.generation == 1


def test_garbage_is_refused(rig: Rig) -> None:
    rig.resource.body = b"<html>proxy error</html>"
    assert rig.refresh() == "refused"
    assert "malformed CRL" in (rig.refresher.last_error or "")


def test_http_error_keeps_the_current_crl(rig: Rig) -> None:
    rig.serve(rig.ca.crl(number=6))
    rig.resource.code = 503
    assert rig.refresh() == "failed"
    assert rig.refresher.last_error == "HTTP 503"
    assert rig.store.material.crl_number == 5 and _number_on_disk(rig) == 5


def test_oversized_answer_is_cut_off(rig: Rig) -> None:
    rig.resource.body = b"x" * (65 * 1024)
    assert rig.refresh() == "failed"
    assert "larger than 65536 bytes" in (rig.refresher.last_error or "")
    assert _number_on_disk(rig) == 5


def test_unanswered_fetch_times_out(rig: Rig) -> None:
    rig.resource.hold = True
    outcomes: list[Any] = []
    rig.refresher.refresh().addBoth(outcomes.append)
    rig.stub.flush()
    assert outcomes == []
    rig.reactor.advance(5.0)
    assert outcomes == ["failed"]
    assert "timed out after 5.0 s" in (rig.refresher.last_error or "")


def test_status_summary_reports_the_crl_in_use_and_the_last_problem(rig: Rig) -> None:
    rig.serve(rig.ca.crl(number=6))
    assert rig.refresh() == "updated"
    rig.serve(rig.ca.crl(number=3))
    rig.reactor.advance(60)
    assert rig.refresh() == "refused"
    status = rig.refresher.status()
    assert status["url"] == CRL_URL and status["crl_number"] == 6
    assert (status["updates"], status["refused"], status["failures"]) == (1, 1, 0)
    assert status["seconds_since_success"] == 60.0
    assert "lower than the current 6" in status["last_error"]


def test_unchanged_crl_costs_no_reload(rig: Rig) -> None:
    """The same CRL again (then a 304 for its ETag) leaves the generation alone."""
    rig.serve(rig.ca.crl(number=6))
    assert rig.refresh() == "updated"
    assert rig.refresh() == "unchanged"
    assert rig.resource.requests == 2
    assert rig.store.generation == 2


def test_refresh_runs_at_start_and_on_the_interval_until_stopped(rig: Rig) -> None:
    rig.serve(rig.ca.crl(number=6))
    rig.refresher.startService()
    rig.stub.flush()
    assert rig.resource.requests == 1 and rig.store.material.crl_number == 6
    rig.serve(rig.ca.crl(number=7))
    rig.reactor.advance(60)
    rig.stub.flush()
    assert rig.resource.requests == 2 and rig.store.material.crl_number == 7
    rig.refresher.stopService()
    rig.reactor.advance(600)
    rig.stub.flush()
    assert rig.resource.requests == 2


def test_a_failed_reload_after_the_write_is_reported_as_failed(rig: Rig) -> None:
    """A good CRL with a broken certificate file beside it: the CRL is written, the reload fails."""
    (rig.directory / "orders.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")
    rig.serve(rig.ca.crl(number=6))
    assert rig.refresh() == "failed"
    assert "reload failed" in (rig.refresher.last_error or "")
    assert rig.store.material.crl_number == 5 and rig.store.reload_failures == 1


def test_sighup_reload_hands_a_new_crl_to_the_checker(rig: Rig) -> None:
    """An operator-written CRL picked up by a plain reload also reaches the status checker."""
    peer = rig.ca.issue("users").leaf
    reload = reload_following_crl(rig.store, rig.checker)
    rig.crl_file.write_bytes(rig.ca.crl([peer], number=8).public_bytes(serialization.Encoding.PEM))
    results: list[Any] = []
    reload().addBoth(results.append)
    assert results == [2]
    assert _status(rig, peer) == "revoked"


def test_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "ca.crl"
    target.write_bytes(b"old")
    write_atomically(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["ca.crl"]


@pytest.fixture
def caplog_events():
    """Formatted texts of log events emitted during the test."""
    from twisted.logger import formatEvent, globalLogPublisher

    texts: list[str] = []

    def observe(event: dict) -> None:
        texts.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield texts
    globalLogPublisher.removeObserver(observe)


# -- end to end: twistd s2sgw-ca serving /crl, gateways in mode crl ----------------------------------


@pytest.mark.e2e
def test_revoked_peer_is_refused_after_the_next_crl_refresh(tmp_path: Path) -> None:
    """Both gateways in mode crl fetch /crl from the real CA status server every 0.5 s; after
    `s2sgw ca revoke orders`, orders is refused with reason revoked, and the CRL file on disk
    carries the new number."""
    from tests.e2e import TRUST_DOMAIN, Pki, Processes, free_port
    from tests.reloadkit import (
        ANSWER,
        config_text,
        get,
        inbound,
        outbound,
        wait_log_count,
    )

    ports = {name: free_port() for name in ("ca", "users_gw", "backend", "orders", "admin")}
    pki = Pki.create(tmp_path, f"http://127.0.0.1:{ports['ca']}", ("users", "orders"))
    crl_file = tmp_path / "ca.crl"
    crl_file.write_bytes(pki.ca.make_crl(hours=1).public_bytes(serialization.Encoding.PEM))
    first_number = _number_of(crl_file)
    www = tmp_path / "www"
    (www / "api" / "users").mkdir(parents=True)
    (www / "api" / "users" / "1").write_bytes(ANSWER)
    status = (
        f'mode = "crl"\ncrl = "{crl_file}"\ncrl_url = "http://127.0.0.1:{ports["ca"]}/crl"\ncrl_refresh = 0.5\n'
    )
    (tmp_path / "users-gw.toml").write_text(
        config_text(
            pki.bundle, pki.certs, {"users": inbound("users-in", ports["users_gw"], ports["backend"], ["orders"])},
            status=status,
        )
        + f'\n[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\n'
    )
    (tmp_path / "callers-gw.toml").write_text(
        config_text(
            pki.bundle, pki.certs, {"orders": outbound("orders-to-users", ports["orders"], ports["users_gw"], "users")},
            status=status,
        )
    )
    procs = Processes(tmp_path)
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")
        procs.start(
            "backend",
            [sys.executable, "-m", "http.server", str(ports["backend"]), "--bind", "127.0.0.1", "--directory", str(www)],
        )
        procs.wait_port(ports["ca"])
        procs.wait_port(ports["backend"])
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(tmp_path / "callers-gw.toml"))
        procs.wait_port(ports["users_gw"])
        procs.wait_port(ports["orders"])
        # The CA published a newer CRL at start; both gateways fetched and use it.
        assert get(ports["orders"]) == (200, ANSWER)
        wait_log_count(procs, "users-gw", " in use (trust generation 2)", 1)
        fetched_number = _number_of(crl_file)
        assert fetched_number > first_number

        subprocess.run(
            [str(Path(sys.executable).parent / "s2sgw"), "ca", "revoke", "--dir", str(pki.directory / "ca"), "orders"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                status_code, _ = get(ports["orders"], timeout=5)
            except Exception:
                status_code = 0
            if status_code != 200:
                break
            time.sleep(0.2)
        else:
            pytest.fail("orders was still admitted 15 s after its revocation")
        line = procs.wait_audit("users-gw", "users-in", "reason=revoked ")
        assert f"peer=spiffe://{TRUST_DOMAIN}/orders " in line
        assert _number_of(crl_file) > fetched_number
        assert "refused, keeping the current one" not in procs.log("users-gw")
        summary = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/status", timeout=10).read())
        assert summary["crl_refresh"]["crl_number"] == _number_of(crl_file)
        assert summary["crl_refresh"]["failures"] == 0 and summary["crl_refresh"]["refused"] == 0
    finally:
        procs.stop_all()


def _number_of(path: Path) -> int | None:
    return pki.crl_number(pki.load_crl(path))
