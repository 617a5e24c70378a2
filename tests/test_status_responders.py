"""A responder per trust root, URL lists, and ``[status]`` on SIGHUP: applied, or refused by name.

Wiring without sockets (SyncReactor): what the running parts use and what ``/status`` shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from twisted.logger import formatEvent, globalLogPublisher

from s2sgw.config import ConfigError, ResponderConfig, StatusConfig, _Parser, load_config
from s2sgw.ops.operations import Operations
from s2sgw.ops.status_page import status_document
from s2sgw.reload import ReloadService
from s2sgw.service import build_gateway
from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.status.root_crl import IntermediateCheck
from s2sgw.status.responders import Responders
from s2sgw.truststore import TrustStore
from tests.doubles import SyncReactor
from tests.pkifactory import TestCA, cert_pem

OLD = "http://old-ca:8080/ocsp"
NEW = ("http://ca-1:8080/ocsp", "http://ca-2:8080/ocsp")


def _colons(fingerprint: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in fingerprint)


def _status(table: dict[str, Any]) -> StatusConfig:
    return _Parser(Path("/etc/s2sgw/gateway.toml")).status(table)


def _error(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        _status(table)
    return str(info.value).split(": ", 1)[1]


def test_status_urls_and_a_responder_per_root_parse_into_one_shape() -> None:
    root = bytes(range(32))
    status = _status(
        {
            "url": list(NEW),
            "responder": [{"fingerprint": _colons(root), "url": OLD, "feed": ["http://old-ca:8080/revocations"]}],
        }
    )
    assert status.responders == (
        ResponderConfig(fingerprint=None, urls=NEW, feed=True),
        ResponderConfig(fingerprint=root, urls=(OLD,), feed=("http://old-ca:8080/revocations",)),
    )
    assert status.url == NEW[0] and status.default is status.responders[0]
    crl = _status({"mode": "crl", "crl": "ca.crl", "crl_url": ["http://a/crl", "http://b/crl"], "feed": False})
    assert crl.default.crl_urls == ("http://a/crl", "http://b/crl")


def test_bad_responders_are_refused_naming_the_key() -> None:
    fingerprint = _colons(bytes(32))
    assert _error({"url": OLD, "responder": [{"url": OLD}]}).startswith("status.responder[0].fingerprint: missing")
    assert _error({"url": OLD, "responder": [{"fingerprint": "abc", "url": OLD}]}).startswith(
        "status.responder[0].fingerprint: a SHA-256 fingerprint"
    )
    assert _error({"url": OLD, "responder": [{"fingerprint": fingerprint}]}).startswith("status.responder[0].url: required")
    twice = [{"fingerprint": fingerprint, "url": OLD}, {"fingerprint": fingerprint.lower(), "url": OLD}]
    assert _error({"url": OLD, "responder": twice}).startswith("status.responder[1].fingerprint: duplicate")
    assert _error({"url": OLD, "responder": [{"fingerprint": fingerprint, "url": OLD, "port": 1}]}).startswith(
        "status.responder[0].port: unknown key"
    )
    assert _error({"url": []}).startswith("status.url: must list at least one URL")


def test_a_peer_is_asked_about_at_the_responder_of_the_root_its_chain_ends_at() -> None:
    old, new = TestCA.create(cn="Old Root"), TestCA.create(cn="New Root")
    config = StatusConfig(
        responders=(
            ResponderConfig(urls=NEW),
            ResponderConfig(fingerprint=old.root.fingerprint(hashes.SHA256()), urls=(OLD,)),
        )
    )
    responders = Responders(config, SyncReactor(), lambda: (old.root, new.root))
    assert responders.for_issuer(old.intermediate).current == OLD
    assert responders.for_issuer(old.root).current == OLD
    assert responders.for_issuer(new.intermediate).current == NEW[0]
    stranger = TestCA.create(cn="Old Root")  # same name, another key: not the old root's
    assert responders.for_issuer(stranger.intermediate).current == NEW[0]


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


class Rig:
    def __init__(self, tmp_path: Path, status: str) -> None:
        self.path = tmp_path
        self.old, self.new = TestCA.create(cn="Old Root"), TestCA.create(cn="New Root")
        (tmp_path / "bundle.pem").write_bytes(cert_pem(self.old.root, self.new.root))
        self.old.issue("orders").write(tmp_path, "orders")
        self.write(status)
        reactor = SyncReactor()
        config = load_config(tmp_path / "gateway.toml")
        self.store = TrustStore.load(config, reactor, threadpool=reactor)
        self.top, self.gateway = build_gateway(config, self.store, reactor)
        (self.operations,) = [s for s in self.top if isinstance(s, Operations)]
        (self.reloader,) = [s for s in self.top if isinstance(s, ReloadService)]
        judging = self.gateway.authorizer.status_checker
        assert isinstance(judging, IntermediateCheck)  # the root CRLs are asked first
        self.checker = judging.inner
        assert isinstance(self.checker, OCSPStatusChecker)

    def write(self, status: str) -> None:
        (self.path / "gateway.toml").write_text(STATUS_CONFIG.format(status=status))

    def reload(self, status: str) -> list[str]:
        self.write(status)
        lines: list[str] = []

        def observe(event: dict) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        try:
            self.reloader.request_reload()  # what SIGHUP schedules
        finally:
            globalLogPublisher.removeObserver(observe)
        return lines

    def asked_for(self, ca: TestCA) -> str:
        return self.checker.servers_for(ca.intermediate).current

    def shown(self) -> dict[str, Any]:
        return status_document(self.operations.monitor)

    def gateway_root_crls(self) -> list[Any]:
        """The root CRL followers the gateway asks, as IntermediateCheck sees them."""
        return list(self.gateway.authorizer.status_checker.followers)


def test_a_reload_applies_new_status_urls_and_settings_and_status_shows_what_is_in_force(tmp_path: Path) -> None:
    rig = Rig(tmp_path, f'url = "{OLD}"\nfeed = false')
    assert rig.asked_for(rig.old) == rig.asked_for(rig.new) == OLD
    assert [entry["urls"] for entry in rig.shown()["root_crl"]] == [["http://old-ca:8080/root.crl"]]
    (held,) = rig.gateway_root_crls()
    fingerprint = _colons(rig.old.root.fingerprint(hashes.SHA256()))
    rig.reload(
        f'url = {list(NEW)!r}\nfail = "open"\ntimeout = 0.5\nmax_cache_age = 30\nfeed = false\n'
        f'[[status.responder]]\nfingerprint = "{fingerprint}"\nurl = "{OLD}"\nfeed = false'.replace("'", '"')
    )
    assert rig.store.generation == 2
    assert rig.asked_for(rig.old) == OLD and rig.asked_for(rig.new) == NEW[0]
    assert rig.gateway.authorizer.fail == rig.gateway.enforcer.fail == "open"
    assert (rig.checker.timeout, rig.checker.max_cache_age) == (0.5, 30.0)
    shown = rig.shown()
    assert shown["status_checks"]["url"] == NEW[0] and shown["status_checks"]["fail"] == "open"
    assert [(entry["root"], entry["in_use"]) for entry in shown["status_servers"]] == [
        (None, NEW[0]),
        (rig.old.root.fingerprint(hashes.SHA256()).hex(), OLD),
    ]
    # The root CRLs follow: one follower per CA, its replicas in order; the old CA's is kept as it was.
    assert [entry["urls"] for entry in shown["root_crl"]] == [
        ["http://ca-1:8080/root.crl", "http://ca-2:8080/root.crl"],
        ["http://old-ca:8080/root.crl"],
    ]
    assert rig.gateway_root_crls()[1] is held


def test_a_reload_refuses_a_status_mode_change_naming_the_key_and_keeps_the_running_settings(tmp_path: Path) -> None:
    rig = Rig(tmp_path, f'url = "{OLD}"\nfeed = false')
    (tmp_path / "ca.crl").write_bytes(rig.old.crl(number=1).public_bytes(serialization.Encoding.PEM))
    lines = rig.reload('mode = "crl"\ncrl = "ca.crl"\nfeed = false\nfail = "open"')
    assert any("status.mode changed to 'crl': needs a restart; keeping 'ocsp'" in line for line in lines), lines
    assert rig.store.config.status.mode == "ocsp" and rig.store.config.status.url == OLD
    assert rig.asked_for(rig.old) == OLD
    assert rig.gateway.authorizer.fail == "open"  # what can apply does
    assert rig.shown()["status_checks"]["mode"] == "ocsp"


def test_a_reload_that_adds_a_feed_follows_it_and_one_that_removes_it_stops(tmp_path: Path) -> None:
    rig = Rig(tmp_path, f'url = "{OLD}"\nfeed = false')
    assert rig.gateway.feed.subscribers == {}
    rig.reload(f'url = "{OLD}"')
    (subscriber,) = rig.gateway.feed.subscribers.values()
    assert subscriber.servers.urls == ("http://old-ca:8080/revocations",)
    rig.reload(f'url = "{OLD}"\nfeed = false')
    assert rig.gateway.feed.subscribers == {}
