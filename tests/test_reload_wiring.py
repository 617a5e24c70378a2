"""Reload wiring without sockets: the authorizer follows reloaded routes, the gateway wires CRL refresh."""

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
from s2sgw.status.crl_refresh import CRLRefreshService
from s2sgw.truststore import TrustStore
from tests.doubles import FakeStatusChecker, SyncReactor
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
    checker = gateway.authorizer.status_checker
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
