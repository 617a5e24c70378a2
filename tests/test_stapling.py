"""OCSP stapling between gateways: the server staples a cached answer, the client trusts a valid one.

Real OpenSSL handshakes in memory, the CA's own OCSP responder behind StubTreq, a task clock.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource

from s2sgw import tls
from s2sgw.ca.authority import CertificateAuthority, IssuedIdentity
from s2sgw.ca.ocsp import Responder, SerialStatus
from s2sgw.config import OutboundRoute, load_config
from s2sgw.interfaces import Reason
from s2sgw.routes.authz import Authorizer
from s2sgw.routes.outbound import OutboundConnector
from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.status.stapling import (
    Staple,
    StapleCache,
    StapleMetrics,
    StapleService,
    fingerprint,
    inbound_targets,
)
from s2sgw.tlstransport import TLSFactory
from s2sgw.truststore import TrustStore
from s2sgw.wire.ocsp import CertStatus, StatusInvalid
from tests.tlshelpers import HalfCloseCollector, Wire, WireEndpoint, connect, pump_all

DOMAIN = "s2s.test"
VALIDITY = 300.0
URL = "http://ca.test/ocsp"


def _now(clock: Any) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)


class CAResource(Resource):
    """The CA's OCSP responder over HTTP; counts queries, remembers whether they carried a nonce."""

    isLeaf = True

    def __init__(self, ca: CertificateAuthority, clock: Any) -> None:
        super().__init__()
        self.responder = Responder(
            ca.intermediate_cert, ca.ocsp_cert, ca.ocsp_key, validity=datetime.timedelta(seconds=VALIDITY)
        )
        self.ca = ca
        self.clock = clock
        self.queries: list[tuple[int, bool]] = []  # (serial, had a nonce)
        self.down = False

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        parsed = ocsp.load_der_ocsp_request(body)
        try:
            parsed.extensions.get_extension_for_class(x509.OCSPNonce)
            nonce = True
        except x509.ExtensionNotFound:
            nonce = False
        self.queries.append((parsed.serial_number, nonce))
        if self.down:
            request.setResponseCode(503)
            return b"down"
        answer = self.responder.answer(body, _now(self.clock), lambda s: SerialStatus.from_record(self.ca.lookup(s)))
        request.setHeader(b"content-type", b"application/ocsp-response")
        return answer.der


@attrs.frozen
class Party:
    identity: IssuedIdentity

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.identity.chain_pem)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def issuer(self) -> x509.Certificate:
        return self.chain[1]

    @property
    def key(self) -> Any:
        return serialization.load_pem_private_key(self.identity.key_pem, None)


@attrs.define
class World:
    directory: Path
    ca: CertificateAuthority
    users: Party
    orders: Party


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    directory = tmp_path_factory.mktemp("stapling")
    ca = CertificateAuthority.init(directory / "ca", DOMAIN)
    parties = {}
    for name in ("users", "orders"):
        identity = ca.issue(name)
        ca.write_identity(identity, directory / "certs")
        parties[name] = Party(identity)
    return World(directory, ca, parties["users"], parties["orders"])


def wall_clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


@attrs.define
class CA:
    """The responder behind StubTreq, and checkers that ask it."""

    resource: CAResource
    stub: StubTreq

    @classmethod
    def of(cls, world: World, clock: Any) -> CA:
        resource = CAResource(world.ca, clock)
        return cls(resource, StubTreq(resource))

    def checker(self, clock: Any) -> OCSPStatusChecker:
        return OCSPStatusChecker(URL, clock, http=self.stub)

    def staple_for(self, party: Party, clock: Any) -> bytes:
        d = self.checker(clock).fetch_staple(party.leaf, party.issuer)
        self.stub.flush()
        return _result(d)[0]


def _result(d: defer.Deferred) -> Any:
    results: list = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def warnings() -> Any:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") == LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def creators(
    world: World, staple: Any = None, *, request: bool = True, keep: bool = True
) -> tuple[tls.ServerConnectionCreator, tls.ClientConnectionCreator]:
    roots = [world.ca.root_cert]
    server = tls.server_context(world.users.chain, world.users.key, roots, staple=staple)
    client = tls.client_context(world.orders.chain, world.orders.key, roots, staples=keep)
    return (
        tls.ServerConnectionCreator(lambda: server),
        tls.ClientConnectionCreator(lambda: client, "users", request_staple=request),
    )


# ---------------------------------------------------------------------------------------------
# the TLS layer


def test_a_server_staples_the_cached_answer_to_a_client_that_asks(world: World) -> None:
    """The DER the server's cache returns arrives on the client's TLS protocol, byte for byte."""
    der = CA.of(world, wall_clock()).staple_for(world.users, wall_clock())
    pair = connect(*creators(world, lambda: der))
    assert pair.client.completed and pair.server.completed
    assert tls.received_staple(pair.client_tls) == der


def test_no_fresh_answer_means_no_staple_and_a_normal_handshake(world: World) -> None:
    """An empty cache staples nothing; the handshake completes all the same."""
    cache = StapleCache(clock=wall_clock())
    pair = connect(*creators(world, cache.callback_for(world.users.leaf)))
    assert pair.client.completed and pair.server.completed
    assert tls.received_staple(pair.client_tls) is None
    assert (cache.missing, cache.served) == (1, 0)


def test_a_failing_staple_lookup_never_fails_the_handshake(world: World, warnings: list[dict]) -> None:
    """A lookup that raises (or returns something odd) is logged and the handshake goes on unstapled."""

    def broken() -> bytes:
        raise RuntimeError("cache on fire")

    for staple in (broken, lambda: "not bytes"):
        pair = connect(*creators(world, staple))
        assert pair.client.completed and pair.server.completed
        assert tls.received_staple(pair.client_tls) is None
    assert any("cache on fire" in repr(e.get("error")) for e in warnings)


def test_a_client_that_does_not_ask_is_not_stapled_to(world: World) -> None:
    """Without status_request the server's callback is not consulted at all."""
    cache = StapleCache(clock=wall_clock())
    pair = connect(*creators(world, cache.callback_for(world.users.leaf), request=False))
    assert pair.client.completed
    assert (cache.missing, cache.served) == (0, 0)
    assert tls.received_staple(pair.client_tls) is None


def test_an_unusable_staple_does_not_fail_the_handshake(world: World) -> None:
    """The client callback only stores what it got; judging it is the authorizer's job, later.

    (OpenSSL itself drops bytes that are not DER, so the test staples a well-formed tryLater.)
    """
    try_later = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(
        serialization.Encoding.DER
    )
    for payload, kept in ((try_later, try_later), (b"\x30\x03garbage", None)):
        pair = connect(*creators(world, lambda: payload))
        assert pair.client.completed and pair.server.completed
        assert tls.received_staple(pair.client_tls) == kept


# ---------------------------------------------------------------------------------------------
# the status checker


def test_fetch_staple_asks_without_a_nonce_and_returns_the_verified_der(world: World) -> None:
    """Staples are shared with every peer, so the query carries no nonce; the peer-check counters stay."""
    clock = wall_clock()
    ca = CA.of(world, clock)
    checker = ca.checker(clock)
    d = checker.fetch_staple(world.users.leaf, world.users.issuer)
    ca.stub.flush()
    der, status = _result(d)
    assert ca.resource.queries == [(world.users.leaf.serial_number, False)]
    assert status.state == "good" and status.next_update is not None
    response = ocsp.load_der_ocsp_response(der)
    assert response.serial_number == world.users.leaf.serial_number
    assert (checker.queries, checker.misses) == (0, 0)


def test_a_valid_staple_answers_the_next_check_without_a_query(world: World) -> None:
    clock = wall_clock()
    ca = CA.of(world, clock)
    der = ca.staple_for(world.users, clock)
    checker = ca.checker(clock)
    status = checker.accept_staple(world.users.leaf, world.users.issuer, der)
    assert status.state == "good"
    d = checker.check(world.users.leaf, world.users.issuer)
    assert _result(d).state == "good"
    assert checker.queries == 0 and len(ca.resource.queries) == 1  # only the staple's own fetch


def test_a_staple_about_another_certificate_is_invalid_and_not_remembered(world: World) -> None:
    clock = wall_clock()
    ca = CA.of(world, clock)
    der = ca.staple_for(world.orders, clock)
    checker = ca.checker(clock)
    with pytest.raises(StatusInvalid, match="no status for serial"):
        checker.accept_staple(world.users.leaf, world.users.issuer, der)
    assert checker.lookup(world.users.leaf, world.users.issuer) is None


def test_a_stale_staple_is_invalid(world: World) -> None:
    """An answer past nextUpdate (plus leeway) proves nothing about now."""
    clock = wall_clock()
    ca = CA.of(world, clock)
    der = ca.staple_for(world.users, clock)
    clock.advance(VALIDITY + 120)
    with pytest.raises(StatusInvalid, match="stale"):
        ca.checker(clock).accept_staple(world.users.leaf, world.users.issuer, der)


def test_a_staple_never_overrides_a_newer_or_revoked_answer(world: World, tmp_path: Path) -> None:
    """A revoked server replaying an older, still valid "good" staple does not undo what the
    checker learnt since: a cached revocation (or any newer answer) stays."""
    ca_dir = CertificateAuthority.init(tmp_path / "ca", DOMAIN)
    party = Party(ca_dir.issue("users"))
    clock = wall_clock()
    local = CA(CAResource(ca_dir, clock), None)  # type: ignore[arg-type]
    local.stub = StubTreq(local.resource)
    old_good = local.staple_for(party, clock)
    ca_dir.revoke(name="users", reason="keyCompromise")
    clock.advance(VALIDITY / 2 + 1)  # the CA re-signs now
    checker = local.checker(clock)
    d = checker.check(party.leaf, party.issuer)
    local.stub.flush()
    assert _result(d).state == "revoked"
    assert checker.accept_staple(party.leaf, party.issuer, old_good).state == "good"  # it does verify...
    assert checker.lookup(party.leaf, party.issuer).state == "revoked"  # ...but changes nothing
    fresh = Party(ca_dir.issue("users"))
    newer = local.staple_for(fresh, clock)
    checker.remember(fresh.leaf, fresh.issuer, CertStatus("good", _now(clock), None))
    checker.accept_staple(fresh.leaf, fresh.issuer, newer)  # same time: the entry is kept, not replaced
    assert checker.lookup(fresh.leaf, fresh.issuer).next_update is None


def test_a_revoked_staple_refuses_without_a_query(world: World, tmp_path: Path) -> None:
    """A server that staples its own revocation is refused at once (remembered as revoked)."""
    ca_dir = CertificateAuthority.init(tmp_path / "ca", DOMAIN)
    party = Party(ca_dir.issue("users"))
    ca_dir.revoke(name="users", reason="keyCompromise")
    clock = wall_clock()
    local = CA(CAResource(ca_dir, clock), None)  # type: ignore[arg-type]
    local.stub = StubTreq(local.resource)
    der = local.staple_for(party, clock)
    checker = local.checker(clock)
    authorizer = Authorizer(checker, DOMAIN, staples=checker)
    route = OutboundRoute(name="r", service="orders", listen="tcp:1", remote="tcp:users:1", peer="users")
    assert authorizer.accept_staple(route, party.chain, der).state == "revoked"
    decision = _result(authorizer.authorize(route, party.chain))
    assert (decision.allowed, decision.reason) == (False, Reason.REVOKED)
    assert checker.queries == 0


# ---------------------------------------------------------------------------------------------
# the refreshing service


def service_for(world: World, clock: Any, ca: CA, party: Party | None = None) -> tuple[StapleService, list]:
    targets = [("users", (party or world.users).leaf, (party or world.users).issuer)]
    service = StapleService(lambda: list(targets), ca.checker(clock), clock, StapleCache())
    return service, targets


def test_the_service_fetches_at_start_and_again_at_half_the_validity(world: World) -> None:
    clock = wall_clock()
    ca = CA.of(world, clock)
    service, _ = service_for(world, clock, ca)
    key = fingerprint(world.users.leaf)
    service.startService()
    ca.stub.flush()
    first = service.cache.current(key)
    assert first and len(ca.resource.queries) == 1
    clock.advance(VALIDITY / 2 - 1)
    ca.stub.flush()
    assert len(ca.resource.queries) == 1
    clock.advance(2)  # the CA re-signs at half its validity too
    ca.stub.flush()
    assert len(ca.resource.queries) == 2
    second = service.cache.get(key)
    assert second is not None and second.der != first
    assert second.status.this_update > ocsp.load_der_ocsp_response(first).this_update_utc
    assert service.status()["services"]["users"]["refreshes"] == 2
    service.stopService()


def test_an_unreachable_ca_keeps_the_staple_until_next_update_then_staples_nothing(
    world: World, warnings: list[dict]
) -> None:
    """Failures retry with back-off; an answer past nextUpdate is never served; recovery restaples."""
    clock = wall_clock()
    ca = CA.of(world, clock)
    service, _ = service_for(world, clock, ca)
    key = fingerprint(world.users.leaf)
    service.startService()
    ca.stub.flush()
    ca.resource.down = True
    clock.advance(VALIDITY / 2 + 1)
    ca.stub.flush()
    assert service.cache.current(key)  # still fresh
    for _ in range(20):
        clock.advance(10)
        ca.stub.flush()
    assert service.cache.current(key) == b""  # past nextUpdate
    status = service.status()["services"]["users"]
    assert status["stapling"] is False and status["failures"] >= 4 and "503" in status["last_error"]
    assert sum("not fetched" in e["log_format"] for e in warnings) == 1  # one warning per outage
    ca.resource.down = False
    clock.advance(service.retry_max)
    ca.stub.flush()
    assert service.cache.current(key)
    assert service.status()["services"]["users"]["failures"] == 0
    service.stopService()
    assert not clock.getDelayedCalls()


def test_a_rotated_certificate_gets_its_own_staple_after_a_reload(world: World) -> None:
    """After a reload the old leaf's staple is dropped and the new leaf's is fetched at once."""
    clock = wall_clock()
    ca = CA.of(world, clock)
    service, targets = service_for(world, clock, ca)
    service.startService()
    ca.stub.flush()
    rotated = Party(world.ca.issue("users"))
    targets[:] = [("users", rotated.leaf, rotated.issuer)]
    service.trust_reloaded(2)
    ca.stub.flush()
    assert service.cache.get(fingerprint(world.users.leaf)) is None
    staple = service.cache.get(fingerprint(rotated.leaf))
    assert staple is not None
    assert ocsp.load_der_ocsp_response(staple.der).serial_number == rotated.leaf.serial_number
    assert [serial for serial, _ in ca.resource.queries] == [world.users.leaf.serial_number, rotated.leaf.serial_number]
    service.stopService()


def test_an_unknown_answer_is_not_stapled(world: World, tmp_path: Path, warnings: list[dict]) -> None:
    """A certificate the CA does not know (another CA's, same names) gets no staple."""
    other = CertificateAuthority.init(tmp_path / "other", DOMAIN)
    stranger = Party(other.issue("users"))
    clock = wall_clock()
    ca = CA.of(world, clock)
    service, _ = service_for(world, clock, ca, stranger)
    service.startService()
    ca.stub.flush()
    assert service.cache.get(fingerprint(stranger.leaf)) is None
    service.stopService()


def test_cache_entries_expire_with_the_clock() -> None:
    clock = Clock()
    cache = StapleCache(clock=clock)
    now = datetime.datetime.fromtimestamp(0, datetime.UTC)
    cache.put(b"k", Staple(b"der", CertStatus("good", now, None), expires=10.0))
    assert cache.current(b"k") == b"der"
    clock.advance(10)
    assert cache.current(b"k") == b""
    cache.put(b"k", Staple(b"der", CertStatus("good", now, None), expires=100.0))
    cache.retain([b"other"])
    assert cache.get(b"k") is None


# ---------------------------------------------------------------------------------------------
# the authorizer and two gateways' trust stores, in memory


def test_an_invalid_staple_is_ignored_with_a_warning_and_the_ca_is_asked(
    world: World, warnings: list[dict]
) -> None:
    clock = wall_clock()
    ca = CA.of(world, clock)
    wrong = ca.staple_for(world.orders, clock)
    checker = ca.checker(clock)
    registry, metrics = CollectorRegistry(), StapleMetrics()
    registry.register(metrics)  # as the gateway's MetricsService does when it starts
    authorizer = Authorizer(checker, DOMAIN, staples=checker, metrics=metrics)
    route = OutboundRoute(name="r", service="orders", listen="tcp:1", remote="tcp:users:1", peer="users")
    before = registry.get_sample_value("s2sgw_staples_received_total", {"result": "invalid"}) or 0.0
    assert authorizer.accept_staple(route, world.users.chain, wrong) is None
    assert registry.get_sample_value("s2sgw_staples_received_total", {"result": "invalid"}) == before + 1
    assert any("ignoring the OCSP staple" in e["log_format"] for e in warnings)
    d = authorizer.authorize(route, world.users.chain)
    ca.stub.flush()
    assert _result(d).allowed and checker.queries == 1


def gateway_config(world: World, name: str, routes: str, staple: bool) -> Path:
    certs = world.directory / "certs"
    path = world.directory / f"{name}-{staple}.toml"
    path.write_text(
        f'trust = "{world.directory / "ca" / "bundle.pem"}"\n'
        f'[status]\nmode = "ocsp"\nurl = "{URL}"\nfeed = false\nstaple = {str(staple).lower()}\n'
        f'[[service]]\nname = "{name}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n'
        + routes
    )
    return path


INBOUND = '[[service.inbound]]\nname = "users-in"\nlisten = "tcp:8443"\nbackend = "tcp:127.0.0.1:8080"\nallow = ["orders"]\n'
OUTBOUND = '[[service.outbound]]\nname = "orders-to-users"\nlisten = "tcp:9001:interface=127.0.0.1"\nremote = "tcp:users:8443"\npeer = "users"\n'


@pytest.mark.parametrize("staple", [True, False])
def test_two_gateways_relay_with_no_status_query_on_the_outbound_side_when_stapling(
    world: World, staple: bool
) -> None:
    """users' trust store staples (refreshed by StapleService); orders' connector asks for the staple,
    verifies it and relays without asking the CA; with staple = false it asks the CA once."""
    clock = MemoryReactorClock()
    clock.advance(time.time())
    ca = CA.of(world, clock)
    users = TrustStore.load(load_config(gateway_config(world, "users", INBOUND, staple)), clock)
    orders = TrustStore.load(load_config(gateway_config(world, "orders", OUTBOUND, staple)), clock)
    stapler = StapleService(inbound_targets(users), ca.checker(clock), clock, users.staples)
    stapler.startService()
    ca.stub.flush()
    fetches = len(ca.resource.queries)
    assert fetches == 1  # the service runs here either way; the contexts staple only when configured

    services: list[HalfCloseCollector] = []

    def remote_gateway() -> Any:
        service = HalfCloseCollector()
        services.append(service)
        return TLSFactory(users.server_creator("users"), False, Factory.forProtocol(lambda: service)).buildProtocol(None)

    remote = WireEndpoint(peer_factory=remote_gateway)
    checker = ca.checker(clock)
    route = orders.config.services[0].outbound[0]
    connector = OutboundConnector(route, orders, Authorizer(checker, DOMAIN, staples=checker), clock, remote=remote)
    client = HalfCloseCollector()
    wires = [Wire(client, connector.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000)))]
    client.transport.write(b"PING")
    for _ in range(5):
        pump_all(*wires, *remote.wires)
        ca.stub.flush()
    assert bytes(services[0].received) == b"PING"
    assert checker.queries == (0 if staple else 1)
    assert len(ca.resource.queries) == fetches + (0 if staple else 1)
    assert users.staples.served == (1 if staple else 0)
    stapler.stopService()
