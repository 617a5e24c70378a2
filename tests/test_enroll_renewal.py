"""Renewal inside the gateway, on a Clock: when it runs, how it backs off, what it writes and reloads.

A real TrustStore and ReloadService run synchronously (a thread pool that runs work at once); the
CA is the fake EST server behind StubTreq.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from treq.testing import StubTreq

from s2sgw import pki
from s2sgw.config import load_config
from s2sgw.enroll.renewal import RenewalService
from s2sgw.enroll.schedule import JITTER, renewal_time, retry_delay
from s2sgw.reload import ReloadService
from s2sgw.truststore import TrustStore
from s2sgw.wire import est
from tests.estfake import FakeEST, RecordingHTTP
from tests.pkifactory import TestCA, key_pem, new_key

LIFETIME = 60.0


class FakeReactor(Clock):
    """Time plus callFromThread (what deferToThreadPool needs), starting at the wall clock."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(datetime.datetime.now(datetime.UTC).timestamp())

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class InlinePool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def inline(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


CONFIG = """
trust = "bundle.pem"
[status]
mode = "off"
[enrollment]
url = "https://127.0.0.1:8443"
fingerprint = "{fingerprint}"
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  listen = "tcp:0:interface=127.0.0.1"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users"]
"""


@attrs.define(eq=False)
class Gateway:
    directory: Path
    reactor: FakeReactor
    ca: TestCA
    fake: FakeEST
    stub: StubTreq
    store: TrustStore
    reloader: ReloadService
    renewal: RenewalService
    registry: CollectorRegistry
    spread: list[float]

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.stub.flush()

    def run_until(self, moment: float) -> None:
        self.advance(max(0.0, moment - self.reactor.seconds()))

    @property
    def state(self) -> Any:
        return self.renewal.state("orders")

    def leaf(self) -> Any:
        return self.store.leaf("orders")

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"service": "orders", **labels})

    def stop(self) -> None:
        self.renewal.stopService()
        self.reloader.stopService()


def make_gateway(directory: Path, spread: float = 0.5, lifetime: float = LIFETIME) -> Gateway:
    reactor = FakeReactor()
    ca = TestCA.create()
    fake = FakeEST(ca, reactor.seconds, lifetime=lifetime)
    key = new_key()
    leaf = fake.issue("orders", key.public_key())
    (directory / "orders.pem").write_bytes(est_pem(leaf, ca.intermediate))
    (directory / "orders.key").write_bytes(key_pem(key))
    (directory / "orders.key").chmod(0o600)
    (directory / "bundle.pem").write_bytes(ca.bundle_pem())
    (directory / "gateway.toml").write_text(CONFIG.format(fingerprint=est.fingerprint(ca.root)))
    store = TrustStore.load(load_config(directory / "gateway.toml"), reactor, threadpool=InlinePool())
    reloader = ReloadService(store.reload, reactor, install_signal=False)
    stub = StubTreq(fake)
    registry = CollectorRegistry()
    spreads = [spread]
    renewal = RenewalService(
        store,
        reloader.reload_now,
        reactor,
        ("orders",),
        http=RecordingHTTP(fake, stub),
        in_thread=inline,
        random=lambda: spreads[-1],
        registry=registry,
        timeout=5.0,
    )
    reloader.startService()
    renewal.startService()
    stub.flush()
    return Gateway(directory, reactor, ca, fake, stub, store, reloader, renewal, registry, spreads)


def est_pem(*certificates: Any) -> bytes:
    from s2sgw.enroll.client import certs_pem

    return certs_pem(certificates)


@pytest.fixture
def logged_events():
    """Every log line while the test runs, formatted."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[str] = []

    def observe(event: dict) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def refresh(gateway: Gateway) -> str:
    outcome: list[str] = []
    gateway.renewal.refresh_bundle().addBoth(outcome.append)
    gateway.stub.flush()
    return outcome[0]


@pytest.fixture
def gateway(tmp_path: Path):
    gw = make_gateway(tmp_path)
    yield gw
    gw.stop()


def seconds(moment: datetime.datetime) -> float:
    return moment.timestamp()


# -- the schedule, as arithmetic ----------------------------------------------------------------


def test_renewal_time_is_two_thirds_of_the_lifetime_give_or_take_the_jitter() -> None:
    assert renewal_time(1000.0, 1090.0, 2 / 3, 0.0) == pytest.approx(1060.0)
    assert renewal_time(1000.0, 1090.0, 2 / 3, -1.0) == pytest.approx(1060.0 - JITTER * 90)
    assert renewal_time(1000.0, 1090.0, 2 / 3, 1.0) == pytest.approx(1060.0 + JITTER * 90)


def test_renewal_time_counts_from_issuance_when_not_before_is_backdated() -> None:
    assert renewal_time(1000.0 - 6, 1060.0, 0.5, 0.0, issued_at=1000.0) == pytest.approx(1030.0)


def test_renewal_time_never_reaches_expiry() -> None:
    for renew_at in (0.9, 0.97, 0.999):
        assert renewal_time(0.0, 100.0, renew_at, 1.0) <= 98.0
    assert renewal_time(0.0, 100.0, 0.01, -1.0) == 0.0  # not before issuance


def test_retry_delay_doubles_from_one_second_to_five_minutes() -> None:
    far = 10**9
    assert [retry_delay(n, far) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert retry_delay(1000, far) == 300


def test_retry_delay_lands_before_expiry() -> None:
    assert retry_delay(9, 40.0) == 20.0  # 256 s would be after expiry: half of what is left
    assert retry_delay(9, 1.0) == 1.0  # never a busy loop
    assert retry_delay(9, -5.0) == 256.0  # expired: only the cap applies


# -- the service ----------------------------------------------------------------------------------


def test_first_renewal_is_scheduled_at_two_thirds_within_jitter_bounds(tmp_path: Path) -> None:
    for spread, sign in ((0.0, -1), (1.0, 1), (0.5, 0)):
        directory = tmp_path / str(spread)
        directory.mkdir()
        gw = make_gateway(directory, spread)
        leaf = gw.leaf()
        start, end = seconds(leaf.not_valid_before_utc), seconds(leaf.not_valid_after_utc)
        lifetime = end - start
        expected = start + (2 / 3 + sign * JITTER) * lifetime
        assert gw.state.next_at == pytest.approx(expected, abs=0.01)
        assert gw.metric("s2sgw_certificate_next_renewal_timestamp_seconds") == pytest.approx(expected, abs=0.01)
        gw.stop()


def test_a_renewal_writes_a_new_key_and_certificate_and_puts_them_in_force(gateway: Gateway) -> None:
    old_leaf = gateway.leaf()
    old_key = (gateway.directory / "orders.key").read_bytes()
    gateway.advance(gateway.state.next_at - gateway.reactor.seconds() - 0.1)
    assert not any(s.operation == "simplereenroll" for s in gateway.fake.seen)
    generation = gateway.store.generation
    gateway.advance(0.1)
    new_leaf = gateway.leaf()
    assert new_leaf.serial_number != old_leaf.serial_number
    assert new_leaf.public_key() != old_leaf.public_key()
    assert (gateway.directory / "orders.key").read_bytes() != old_key
    assert pki.load_certificates(gateway.directory / "orders.pem")[0] == new_leaf
    assert gateway.store.generation == generation + 1
    renewal = [s for s in gateway.fake.seen if s.operation == "simplereenroll"]
    assert [(s.policy, s.client) for s in renewal] == [("PinnedTLS", "spiffe://example.org/orders")]
    assert gateway.state.failures == 0 and gateway.state.last_result == "ok"
    assert gateway.metric("s2sgw_certificate_renewals_total", result="ok") == 1
    # The next renewal counts from the new certificate's issuance.
    issued = gateway.reactor.seconds()
    assert gateway.state.next_at == pytest.approx(issued + (2 / 3) * (seconds(new_leaf.not_valid_after_utc) - issued), abs=0.01)


def test_renewal_logs_old_and_new_serial(gateway: Gateway, logged_events) -> None:
    old = pki.serial_hex(gateway.leaf())
    gateway.run_until(gateway.state.next_at)
    new = pki.serial_hex(gateway.leaf())
    lines = [e for e in logged_events if "renewed" in e]
    assert len(lines) == 1 and f"serial {old} -> {new}" in lines[0] and "orders" in lines[0]


def test_several_renewals_in_a_row_each_bring_a_new_serial(gateway: Gateway) -> None:
    serials = {gateway.leaf().serial_number}
    for _ in range(5):
        gateway.run_until(gateway.state.next_at)
        serials.add(gateway.leaf().serial_number)
    assert len(serials) == 6
    assert gateway.metric("s2sgw_certificate_renewals_total", result="ok") == 5


def test_failures_back_off_exponentially_then_recover(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, lifetime=3600.0)
    gateway.fake.fail_with = [503] * 4
    first = gateway.state.next_at
    gateway.run_until(first)
    attempts = [first]
    for _ in range(4):
        attempts.append(gateway.state.next_at)
        gateway.run_until(gateway.state.next_at)
    gaps = [round(b - a, 3) for a, b in zip(attempts, attempts[1:])]
    assert gaps == [1.0, 2.0, 4.0, 8.0]
    assert gateway.state.last_result == "ok" and gateway.state.failures == 0
    assert gateway.metric("s2sgw_certificate_renewals_total", result="refused") == 4
    assert gateway.metric("s2sgw_certificate_renewals_total", result="ok") == 1
    gateway.stop()


def test_retries_never_wait_past_expiry(gateway: Gateway) -> None:
    """The CA keeps failing: every attempt is planned before the certificate expires."""
    gateway.fake.fail_with = [503] * 1000
    not_after = seconds(gateway.leaf().not_valid_after_utc)
    planned = []
    for _ in range(200):
        at = gateway.state.next_at
        if at >= not_after:
            break
        planned.append(at)
        gateway.run_until(at)
    assert len(planned) >= 6
    assert all(at < not_after for at in planned)
    assert gateway.reactor.seconds() >= not_after - 1.0  # it kept trying until the very end


def test_a_rate_limited_renewal_waits_as_long_as_the_ca_asks(gateway: Gateway) -> None:
    gateway.fake.fail_with = [429]
    gateway.run_until(gateway.state.next_at)
    assert gateway.state.next_at - gateway.reactor.seconds() == pytest.approx(7.0)


def test_unready_with_a_warning_in_the_last_tenth_while_renewal_fails(gateway: Gateway, logged_events) -> None:
    gateway.fake.fail_with = [503] * 1000
    leaf = gateway.leaf()
    start, end = seconds(leaf.not_valid_before_utc), seconds(leaf.not_valid_after_utc)
    gateway.run_until(gateway.state.next_at)
    assert gateway.renewal.readiness_problems() == []  # failing, but far from expiry
    while gateway.reactor.seconds() < end - 0.1 * (end - start):
        gateway.run_until(gateway.state.next_at)
    problems = gateway.renewal.readiness_problems()
    assert len(problems) == 1 and "last tenth" in problems[0] and "renewal keeps failing" in problems[0]
    assert sum("last tenth" in e for e in logged_events) == 1
    gateway.fake.fail_with = []
    gateway.run_until(gateway.state.next_at)
    assert gateway.renewal.readiness_problems() == []


def test_status_fields(gateway: Gateway) -> None:
    gateway.fake.fail_with = [500]
    gateway.run_until(gateway.state.next_at)
    status = gateway.renewal.service_status("orders")
    assert status is not None
    assert status["last_result"] == "refused" and status["failures_in_row"] == 1
    assert "HTTP 500" in status["last_error"]
    assert status["next_renewal"] == datetime.datetime.fromtimestamp(gateway.state.next_at, datetime.UTC).isoformat()
    assert gateway.renewal.service_status("billing") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_renewed_files_keep_owner_group_and_mode(gateway: Gateway) -> None:
    key, cert = gateway.directory / "orders.key", gateway.directory / "orders.pem"
    os.chown(key, 4321, 8765)
    os.chown(cert, 4321, 8765)
    key.chmod(0o640)
    cert.chmod(0o640)
    serial = gateway.leaf().serial_number
    gateway.run_until(gateway.state.next_at)
    assert gateway.leaf().serial_number != serial
    for path in (key, cert):
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4321, 8765, 0o640)


def test_a_certificate_for_another_identity_is_not_installed(gateway: Gateway) -> None:
    original = gateway.fake.issue

    def wrong_name(name: str, public_key: Any) -> Any:
        return original("billing", public_key)

    gateway.fake.issue = wrong_name  # type: ignore[method-assign]
    serial = gateway.leaf().serial_number
    gateway.run_until(gateway.state.next_at)
    assert gateway.leaf().serial_number == serial
    assert "spiffe://example.org/billing" in gateway.state.last_error


def test_stopping_during_a_renewal_logs_no_error(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path)
    hanging = defer.Deferred()
    gw.renewal.http = lambda policy: type("Hang", (), {"request": lambda self, *a, **k: hanging})()
    gw.run_until(gw.state.next_at)
    assert gw.state.running is not None
    gw.stop()
    assert gw.state.running is None


# -- the trust bundle -----------------------------------------------------------------------------


def test_a_new_root_published_by_the_ca_reaches_the_bundle_and_a_retired_one_leaves(gateway: Gateway) -> None:
    new = TestCA.create(cn="Next Root")
    gateway.fake.roots.append(new.root)
    assert refresh(gateway) == "updated"
    assert pki.load_certificates(gateway.directory / "bundle.pem") == [gateway.ca.root, new.root]
    assert gateway.store.roots == (gateway.ca.root, new.root)
    gateway.fake.roots.remove(new.root)
    assert refresh(gateway) == "updated"
    assert gateway.store.roots == (gateway.ca.root,)


def test_an_unchanged_answer_does_not_rewrite_the_bundle(gateway: Gateway) -> None:
    before = os.stat(gateway.directory / "bundle.pem").st_ino
    generation = gateway.store.generation
    assert refresh(gateway) == "unchanged"
    assert os.stat(gateway.directory / "bundle.pem").st_ino == before
    assert gateway.store.generation == generation


def test_cacerts_without_the_pinned_root_is_refused_and_logged(gateway: Gateway, logged_events) -> None:
    stranger = TestCA.create(cn="Stranger")
    gateway.fake.roots[:] = [stranger.root]
    before = (gateway.directory / "bundle.pem").read_bytes()
    assert refresh(gateway) == "refused"
    assert (gateway.directory / "bundle.pem").read_bytes() == before
    assert any("CA certificates refused" in e and "pinned root" in e for e in logged_events)
    assert gateway.renewal.bundle_status["last_result"] == "refused"


def test_the_monitor_reports_renewal_in_status_and_readiness(gateway: Gateway) -> None:
    from s2sgw.enroll.renewal import attach_renewal
    from s2sgw.ops.health import Monitor
    from s2sgw.ops.status_page import status_document

    monitor = Monitor(gateway.store, {}, None, gateway.reactor, probe_interval=None, registry=CollectorRegistry())
    attached = attach_renewal(gateway.store.config, gateway.store, gateway.reloader.reload_now, monitor, gateway.reactor)
    gateway.renewal.stopService()
    gateway.renewal = attached
    attached.http, attached.in_thread = RecordingHTTP(gateway.fake, gateway.stub), inline
    attached.registry = CollectorRegistry()
    attached.startService()
    gateway.stub.flush()
    document = status_document(monitor)
    assert document["services"]["orders"]["renewal"]["failures_in_row"] == 0
    assert document["enrollment"]["urls"] == ["https://127.0.0.1:8443"]
    assert document["enrollment"]["trust_bundle"]["last_result"] == "unchanged"
    gateway.fake.fail_with = [503] * 1000
    leaf = gateway.leaf()
    start, end = seconds(leaf.not_valid_before_utc), seconds(leaf.not_valid_after_utc)
    while gateway.reactor.seconds() < end - 0.1 * (end - start):
        gateway.run_until(attached.state("orders").next_at)
    readiness = monitor.readiness()
    assert not readiness.ready and any("renewal keeps failing" in r for r in readiness.reasons)


def test_a_gateway_whose_bundle_lacks_the_pinned_root_does_not_start(tmp_path: Path) -> None:
    from s2sgw.config import ConfigError

    gw = make_gateway(tmp_path)
    gw.stop()
    config = tmp_path / "gateway.toml"
    config.write_text(config.read_text().replace(est.fingerprint(gw.ca.root), "ab" * 32))
    with pytest.raises(ConfigError, match=r"enrollment\.fingerprint: no root in .*bundle\.pem has this fingerprint"):
        TrustStore.load(load_config(config), gw.reactor, threadpool=InlinePool())


def test_a_certificate_replaced_from_outside_gets_a_fresh_schedule(gateway: Gateway) -> None:
    """After an outage: a new token, `s2sgw enroll`, SIGHUP. Renewal starts over from that certificate."""
    gateway.fake.fail_with = [403] * 3
    for _ in range(3):
        gateway.run_until(gateway.state.next_at)
    assert gateway.state.failures == 3
    key = new_key()
    leaf = gateway.fake.issue("orders", key.public_key())
    (gateway.directory / "orders.pem").write_bytes(est_pem(leaf, gateway.ca.intermediate))
    (gateway.directory / "orders.key").write_bytes(key_pem(key))
    generation: list[int] = []
    gateway.reloader.on_reloaded = gateway.renewal.trust_reloaded
    gateway.reloader.reload_now().addCallback(generation.append)
    assert generation and gateway.leaf() == leaf
    assert gateway.state.failures == 0
    start, end = seconds(leaf.not_valid_before_utc), seconds(leaf.not_valid_after_utc)
    assert gateway.state.next_at == pytest.approx(start + (2 / 3) * (end - start), abs=0.01)
    # Our own renewals do not count as replacements from outside.
    gateway.run_until(gateway.state.next_at)
    assert gateway.state.last_result == "ok" and gateway.metric("s2sgw_certificate_renewals_total", result="ok") == 1
