"""Readiness, expiry warnings, operational gauges, systemd notify messages and admin config checks.

Real trust stores and route objects on a MemoryReactorClock set to the wall clock, so time can
be moved past a certificate's expiry; real AF_UNIX datagram sockets for notifications.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from s2sgw.config import ConfigError, load_config, parse_config
from s2sgw.ops.health import Monitor
from s2sgw.routes.inbound import InboundListener
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.ops.notify import Notifier, NotifyService, format_message, socket_address
from s2sgw.routes.authz import Authorizer
from s2sgw.truststore import TrustStore
from tests.doubles import FakeStatusChecker
from tests.e2e import Pki, gateway_config, service_block


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("health"), None, ())


@pytest.fixture()
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def _monitor(world: Pki, tmp_path: Path, *, hours: float = 24.0, extra: str = "") -> tuple[Monitor, MemoryReactorClock, InboundListener]:
    world.ca.write_identity(world.ca.issue("users", hours=hours), tmp_path)
    users = service_block(
        world,
        "users",
        """
        [[service.inbound]]
        name = "users-in"
        listen = "tcp:0:interface=127.0.0.1"
        backend = "tcp:127.0.0.1:9"
        allow = ["orders"]
        """,
    ).replace(str(world.certs), str(tmp_path))
    path = tmp_path / "gw.toml"
    path.write_text(gateway_config(world, None, users, mode="off", extra=extra))
    config = load_config(path)
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    store = TrustStore.load(config, reactor, reread_config=False)
    checker = FakeStatusChecker(reactor)
    route = InboundListener(
        config.services[0].inbound[0], store, Authorizer(checker, "e2e.s2sgw.test"), reactor,
        metrics=RouteMetrics(),
    )
    monitor = Monitor(store, {"users-in": route}, None, reactor, probe_interval=None, registry=CollectorRegistry())
    return monitor, reactor, route


def _warnings(events: list[dict]) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    expiry_formats = ("of its lifetime left", "expired {ago} ago")
    return [
        formatEvent(e)
        for e in events
        if e.get("log_level") == LogLevel.warn and any(f in e.get("log_format", "") for f in expiry_formats)
    ]


def test_ready_once_listening_with_valid_identities(world: Pki, tmp_path: Path) -> None:
    monitor, reactor, route = _monitor(world, tmp_path)
    assert monitor.readiness().reasons == ("route users-in is not listening",)
    route.listen()
    assert monitor.readiness().ready
    assert monitor.summary().startswith("ready; 1/1 routes listening, 0 live connections, trust generation 1")


def test_expired_certificate_makes_the_gateway_unready_and_is_logged_once(world: Pki, tmp_path: Path, events) -> None:
    monitor, reactor, route = _monitor(world, tmp_path, hours=1.0)
    route.listen()
    monitor.startService()
    try:
        assert monitor.readiness().ready
        reactor.advance(2 * 3600)
        state = monitor.readiness()
        assert not state.ready
        assert state.reasons[0].startswith("certificate of service users expired at ")
        assert [w for w in _warnings(events) if "expired" in w and "certificate of service users" in w]
        count = len(_warnings(events))
        reactor.advance(300)
        assert len(_warnings(events)) == count  # each stage is logged once, not every minute
    finally:
        monitor.stopService()


def test_expiry_is_announced_when_a_fifth_of_the_lifetime_is_left(world: Pki, tmp_path: Path, events) -> None:
    # lifetime 65 min (issued 5 min back-dated): 13 min left is the default threshold
    monitor, reactor, route = _monitor(world, tmp_path, hours=1.0)
    monitor.startService()
    try:
        assert not [w for w in _warnings(events) if "certificate of service users" in w]
        reactor.advance(50 * 60)
        warned = [w for w in _warnings(events) if "certificate of service users" in w]
        assert len(warned) == 1 and "expires in" in warned[0] and "% of its lifetime left" in warned[0]
    finally:
        monitor.stopService()


def test_expiry_threshold_is_configurable(world: Pki, tmp_path: Path, events) -> None:
    monitor, reactor, route = _monitor(world, tmp_path, hours=1.0, extra="expiry_warning = 0.9")
    monitor.startService()
    try:
        reactor.advance(5 * 60)  # 10 of 65 min gone (5 back-dated): 85% left, below 90%
        assert [w for w in _warnings(events) if "certificate of service users" in w and "expires in" in w]
    finally:
        monitor.stopService()


def test_gauges_show_seconds_until_expiry_and_reload_counts(world: Pki, tmp_path: Path) -> None:
    monitor, reactor, route = _monitor(world, tmp_path, hours=1.0)
    monitor.startService()
    try:
        text = generate_latest(monitor.registry).decode()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert 3500 < found[("s2sgw_certificate_expiry_seconds", (("service", "users"),))] <= 3600
        assert found[("s2sgw_reloads_total", (("result", "ok"),))] == 0
        assert found[("s2sgw_reloads_total", (("result", "failed"),))] == 0
        assert found[("s2sgw_ready", ())] == 0  # not listening in this test
        assert any(name == "s2sgw_trust_bundle_expiry_seconds" for name, _ in found)
    finally:
        monitor.stopService()
    assert generate_latest(monitor.registry) == b""  # unregistered on stop


# -- systemd notify -------------------------------------------------------------------------


def test_notifier_sends_key_value_lines_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert notifier is not None
        assert notifier.send(READY=1, STATUS="line one\nline two")
        assert sock.recv(4096) == b"READY=1\nSTATUS=line one line two"
        notifier.close()


def test_abstract_namespace_addresses_start_with_a_nul_byte() -> None:
    assert socket_address("@s2sgw/notify") == b"\0s2sgw/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert format_message({"RELOADING": 1, "MONOTONIC_USEC": 42}) == b"RELOADING=1\nMONOTONIC_USEC=42"


def test_no_notifier_without_notify_socket() -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_unreachable_socket_is_logged_once_and_never_raises(tmp_path: Path, events) -> None:
    notifier = Notifier(str(tmp_path / "nobody.sock"))
    assert notifier.send(READY=1) is False
    assert notifier.send(READY=1) is False
    assert len([e for e in events if "systemd notification" in e.get("log_format", "")]) == 1


def test_reload_is_framed_by_reloading_and_ready_even_when_it_fails(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        service = NotifyService(Notifier(str(path)), lambda: "summary", monotonic=lambda: 1234)
        service.startService()
        assert sock.recv(4096) == b"READY=1\nSTATUS=summary"
        failing: Deferred[int] = Deferred()
        results: list = []
        service.reloading(lambda: failing)().addErrback(results.append)
        assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=1234\nSTATUS=reloading trust material"
        failing.errback(ConfigError("bad key"))
        assert sock.recv(4096) == b"READY=1\nSTATUS=summary"
        assert results and results[0].check(ConfigError)
        service.reloading(lambda: succeed(2))()
        sock.recv(4096), sock.recv(4096)
        service.stopService()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping: draining connections"


# -- admin configuration ----------------------------------------------------------------------


def _admin(world: Pki, table: dict):
    data = {"trust": str(world.bundle), "status": {"mode": "off"}, "admin": table,
            "service": [{"name": "x", "cert": str(world.bundle), "key": str(world.bundle)}]}
    return parse_config(data, world.directory / "gw.toml").admin


@pytest.mark.parametrize(
    "listen",
    ["tcp:9900:interface=127.0.0.1", "tcp:9900:interface=\\:\\:1", "tcp:9900:interface=localhost", "unix:/run/s2sgw/admin.sock"],
)
def test_admin_listens_on_loopback_or_unix_sockets(world: Pki, listen: str) -> None:
    admin = _admin(world, {"listen": listen})
    assert admin.listen == listen and admin.allow_remote is False and admin.probe_interval == 5.0


@pytest.mark.parametrize("listen", ["tcp:9900", "tcp:9900:interface=0.0.0.0", "tcp:9900:interface=10.1.2.3"])
def test_admin_refuses_other_addresses_unless_allowed_explicitly(world: Pki, listen: str) -> None:
    with pytest.raises(ConfigError, match="admin.listen: .* is not a loopback address or unix socket"):
        _admin(world, {"listen": listen})
    assert _admin(world, {"listen": listen, "allow_remote": True}).allow_remote is True


def test_admin_config_rejects_bad_values(world: Pki) -> None:
    with pytest.raises(ConfigError, match="admin.allow_remote: expected true or false"):
        _admin(world, {"listen": "tcp:9900:interface=127.0.0.1", "allow_remote": "yes"})
    with pytest.raises(ConfigError, match="admin.probe_interval: must be a positive number"):
        _admin(world, {"listen": "tcp:9900:interface=127.0.0.1", "probe_interval": 0})
    data = {"trust": str(world.bundle), "status": {"mode": "off"}, "expiry_warning": 1.5,
            "service": [{"name": "x", "cert": str(world.bundle), "key": str(world.bundle)}]}
    with pytest.raises(ConfigError, match="expiry_warning: must be between 0 and 1"):
        parse_config(data, world.directory / "gw.toml")


def test_a_stale_roots_crl_held_beside_the_intermediates_makes_the_gateway_not_ready(tmp_path: Path) -> None:
    """Held in ``status.crl``, the root's CRL judges every peer's intermediate: once stale it
    refuses them all, so readiness says so, like for the intermediate's CRL."""
    import datetime

    from cryptography.hazmat.primitives import serialization

    from tests.pkifactory import now
    from tests.reloadkit import make_setup

    setup = make_setup(tmp_path, mode="crl")
    ca = setup.ca
    soon = now() + datetime.timedelta(minutes=10)
    crls = (ca.crl(number=5, next_update=now() + datetime.timedelta(hours=2)), ca.crl(root=True, next_update=soon))
    (tmp_path / "ca.crl").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    store = setup.store()
    clock = MemoryReactorClock()
    clock.advance(now().timestamp())
    monitor = Monitor(store, {}, None, clock, probe_interval=None, registry=CollectorRegistry())
    assert not monitor.readiness().reasons
    assert [item.what for item in monitor.expiring() if item.kind == "crl"][1].startswith("CRL of CN=Test Root ")
    clock.advance(20 * 60)
    assert [r for r in monitor.readiness().reasons if "CRL" in r] == [
        f"the CRL of CN=Test Root is stale (nextUpdate {crls[1].next_update_utc}): peers are refused"
    ]
