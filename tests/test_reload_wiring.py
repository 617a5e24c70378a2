"""Wiring without sockets: the authorizer follows reloaded routes, the gateway wires CRL refresh and
hands each part what the status checker offers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

from s2sgw.config import InboundRoute, load_config
from s2sgw.interfaces import Reason
from s2sgw.reload import ReloadService
from s2sgw.routes.authz import Authorizer
from s2sgw.service import build_gateway
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.status.root_crl import IntermediateCheck
from s2sgw.status.crl_refresh import CRLRefreshService
from tests.doubles import FakeStatusChecker
from s2sgw.ops.operations import Operations
from s2sgw.status.enforce import PushedRevocations
from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.truststore import TrustStore
from tests.doubles import SyncReactor
from tests.pkifactory import TestCA
from tests.reloadkit import CRL_REFRESH_CONFIG


def _decide(authorizer: Authorizer, route: InboundRoute, chain) -> Any:
    results: list[Any] = []
    authorizer.authorize(route, chain).addBoth(results.append)
    return results[0]


def test_authorizer_judges_the_current_allow_list_not_the_one_it_started_with() -> None:
    ca = TestCA.create()
    billing = ca.issue("billing").chain
    started = InboundRoute("users-in", "users", "tcp:0", "tcp:127.0.0.1:1", allow=("orders",))
    current = {"users-in": started}
    authorizer = Authorizer(FakeStatusChecker(Clock()), "example.org", current_route=current.get)
    assert _decide(authorizer, started, billing).reason == Reason.IDENTITY_NOT_ALLOWED
    current["users-in"] = InboundRoute("users-in", "users", "tcp:0", "tcp:127.0.0.1:1", allow=("orders", "billing"))
    assert _decide(authorizer, started, billing).allowed
    # A route the lookup does not know is judged as given.
    other = InboundRoute("other-in", "users", "tcp:0", "tcp:127.0.0.1:1", allow=())
    assert _decide(authorizer, other, billing).reason == Reason.IDENTITY_NOT_ALLOWED


def test_gateway_in_mode_crl_with_a_url_runs_a_crl_refresh_and_the_checker_follows_reloads(tmp_path: Path) -> None:
    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "orders")
    (tmp_path / "ca.crl").write_bytes(ca.crl(number=5).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "gateway.toml").write_text(CRL_REFRESH_CONFIG.format(url="http://127.0.0.1:1/crl"))
    reactor = SyncReactor()
    config = load_config(tmp_path / "gateway.toml")
    store = TrustStore.load(config, reactor, threadpool=reactor)
    top, gateway = build_gateway(config, store, reactor)
    refreshers = [s for s in top if isinstance(s, CRLRefreshService)]
    assert len(refreshers) == 1 and refreshers[0].interval == 60.0
    judging = gateway.authorizer.status_checker
    assert isinstance(judging, IntermediateCheck)  # the root CRL beside crl_url is asked first
    checker = judging.inner
    assert isinstance(checker, CRLStatusChecker)
    assert refreshers[0].on_reloaded is not None

    peer = ca.issue("users")
    (tmp_path / "ca.crl").write_bytes(ca.crl([peer.leaf], number=6).public_bytes(serialization.Encoding.PEM))
    (reloader,) = [s for s in top if isinstance(s, ReloadService)]
    reloader.request_reload()  # what SIGHUP schedules
    assert store.generation == 2
    results: list[Any] = []
    checker.check(peer.leaf, ca.intermediate).addBoth(results.append)
    assert results[0].state == "revoked"


STATUS_CONFIG = """
trust = "bundle.pem"
[status]
{status}
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  listen = "tcp:0:interface=127.0.0.1"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users"]
"""


def _wired(tmp_path: Path, status: str) -> tuple[Any, Any, Operations]:
    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "orders")
    (tmp_path / "ca.crl").write_bytes(ca.crl(number=5).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "gateway.toml").write_text(STATUS_CONFIG.format(status=status))
    reactor = SyncReactor()
    config = load_config(tmp_path / "gateway.toml")
    top, gateway = build_gateway(config, TrustStore.load(config, reactor, threadpool=reactor), reactor)
    (operations,) = [s for s in top if isinstance(s, Operations)]
    return top, gateway, operations


def test_the_ocsp_checker_is_handed_to_the_parts_using_its_cache_stapling_probe_and_counters(tmp_path: Path) -> None:
    _, gateway, operations = _wired(tmp_path, 'mode = "ocsp"\nurl = "http://127.0.0.1:1/ocsp"')
    judging = gateway.authorizer.status_checker
    # The root CRL beside status.url is asked about the intermediate first, then the OCSP checker.
    assert isinstance(judging, IntermediateCheck)
    checker = judging.inner
    assert isinstance(checker, OCSPStatusChecker)
    assert [follower.url for follower in judging.followers] == ["http://127.0.0.1:1/root.crl"]
    assert gateway.authorizer.staples is checker
    assert gateway.enforcer.checker is judging and gateway.enforcer.cache is checker
    assert gateway.stapler is not None and gateway.stapler.source is checker
    assert operations.monitor.prober is checker and operations.monitor.cache_stats is checker


def test_a_crl_checker_following_the_feed_gets_pushed_revocations_in_front(tmp_path: Path) -> None:
    status = 'mode = "crl"\ncrl = "ca.crl"\nfeed = "http://127.0.0.1:1/revocations"'
    _, gateway, operations = _wired(tmp_path, status)
    intermediates = gateway.authorizer.status_checker
    # Root CRLs are asked first; with a CRL file kept by hand none is followed until a reload adds a crl_url.
    assert isinstance(intermediates, IntermediateCheck) and list(intermediates.followers) == []
    judging = intermediates.inner
    assert isinstance(judging, PushedRevocations) and isinstance(judging.inner, CRLStatusChecker)
    assert gateway.enforcer.checker is intermediates and gateway.enforcer.cache is judging
    assert gateway.authorizer.staples is None and gateway.stapler is None
    assert operations.monitor.prober is None and operations.monitor.cache_stats is None


def test_a_crl_checker_without_the_feed_is_asked_directly_and_keeps_no_cache(tmp_path: Path) -> None:
    _, gateway, operations = _wired(tmp_path, 'mode = "crl"\ncrl = "ca.crl"')
    intermediates = gateway.authorizer.status_checker
    assert isinstance(intermediates, IntermediateCheck) and isinstance(intermediates.inner, CRLStatusChecker)
    assert gateway.enforcer.checker is intermediates and gateway.enforcer.cache is None
    assert gateway.feed is not None and gateway.feed.subscribers == {} and gateway.stapler is None
    assert operations.monitor.prober is None and operations.monitor.cache_stats is None
