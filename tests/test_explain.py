"""`s2sgw explain` gives the gateway's verdict and the reason in words.

In-process: the explain pipeline with the status checker double. End to end: the real command
against a real `twistd s2sgw-ca` for an allowed, a revoked, a not-allowed and a foreign-CA
certificate, and the documented exit codes.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from s2sgw import pki
from s2sgw.config import load_config
from s2sgw.interfaces import Reason
from s2sgw.ops.explain import (
    EXIT_ALLOWED,
    EXIT_ERROR,
    EXIT_REFUSED,
    explain,
    find_route,
)
from s2sgw.wire.ocsp import StatusUnavailable
from tests.doubles import FakeStatusChecker
from tests.e2e import BIN, Pki, Processes, free_port, gateway_config, service_block

UTC = datetime.UTC


def _config_text(world: Pki, ca_port: int | None, *, fail: str = "closed") -> str:
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
    )
    orders = service_block(
        world,
        "orders",
        """
        [[service.outbound]]
        name = "orders-to-users"
        listen = "tcp:0:interface=127.0.0.1"
        remote = "tcp:127.0.0.1:9"
        peer = "users"
        """,
    )
    return gateway_config(world, ca_port or 1, users + orders, fail=fail)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("explain")
    world = Pki.create(root, None, ("users", "orders", "billing", "reports"))
    world.ca.revoke(name="reports", reason="keyCompromise")
    foreign = Pki.create(root / "foreign", None, ("orders",))
    (root / "foreign-orders.pem").write_bytes((foreign.certs / "orders.pem").read_bytes())
    return world


def _decide(world: Pki, route_name: str, peer: Path, checker: FakeStatusChecker, *, fail: str = "closed"):
    path = world.directory / f"gateway-{fail}.toml"
    path.write_text(_config_text(world, None, fail=fail))
    config = load_config(path)
    roots = pki.load_certificates(config.trust)
    chain = pki.load_certificates(peer)
    results: list = []
    now = datetime.datetime.now(UTC)
    explain(config, roots, "e2e.s2sgw.test", find_route(config, route_name), chain, checker, now).addBoth(results.append)
    assert len(results) == 1
    return results[0]


def test_allowed_peer_is_admitted_with_its_identity_and_serial(world: Pki) -> None:
    verdict = _decide(world, "users-in", world.certs / "orders.pem", FakeStatusChecker(Clock()))
    assert verdict.allowed and verdict.reason == Reason.OK
    assert "spiffe://e2e.s2sgw.test/orders is on the allow-list of route users-in" in verdict.words
    assert "is good" in verdict.words
    assert "ALLOWED" in verdict.render()


def test_peer_not_on_the_allow_list_is_refused_naming_who_is_allowed(world: Pki) -> None:
    checker = FakeStatusChecker(Clock())
    verdict = _decide(world, "users-in", world.certs / "billing.pem", checker)
    assert not verdict.allowed and verdict.reason == Reason.IDENTITY_NOT_ALLOWED
    assert verdict.words == (
        "spiffe://e2e.s2sgw.test/billing is not on the allow-list of route users-in (it allows: orders)."
    )
    assert checker.calls == []  # the CA is not asked about a peer refused anyway


def test_revoked_peer_is_refused_with_the_revocation_reason(world: Pki) -> None:
    checker = FakeStatusChecker(Clock())
    leaf = pki.load_certificates(world.certs / "orders.pem")[0]
    checker.set(leaf.serial_number, "revoked")
    verdict = _decide(world, "users-in", world.certs / "orders.pem", checker)
    assert not verdict.allowed and verdict.reason == Reason.REVOKED
    assert "the CA revoked it" in verdict.words and pki.serial_hex(leaf) in verdict.words


def test_foreign_ca_certificate_is_refused_as_untrusted_before_any_status_query(world: Pki) -> None:
    checker = FakeStatusChecker(Clock())
    verdict = _decide(world, "users-in", world.directory / "foreign-orders.pem", checker)
    assert not verdict.allowed and verdict.reason == Reason.UNTRUSTED_CHAIN
    assert "does not chain to the trust bundle" in verdict.words
    assert "issued by a CA this gateway does not trust" in verdict.words
    assert checker.calls == []


def test_outbound_route_refuses_a_remote_that_is_not_the_expected_peer(world: Pki) -> None:
    verdict = _decide(world, "orders-to-users", world.certs / "billing.pem", FakeStatusChecker(Clock()))
    assert verdict.reason == Reason.IDENTITY_MISMATCH
    assert "expects users" in verdict.words


def test_unreachable_ca_refuses_under_fail_closed_and_admits_under_fail_open(world: Pki) -> None:
    down = FakeStatusChecker(Clock(), default=StatusUnavailable("connection refused"))
    closed = _decide(world, "users-in", world.certs / "orders.pem", down)
    assert closed.reason == Reason.CA_UNREACHABLE and "fail = closed" in closed.words
    opened = _decide(world, "users-in", world.certs / "orders.pem", down, fail="open")
    assert opened.allowed and "only because fail = open" in opened.words


def test_expired_peer_certificate_is_refused_as_expired(world: Pki, tmp_path: Path) -> None:
    world.issue_expired("orders", tmp_path)
    verdict = _decide(world, "users-in", tmp_path / "orders.pem", FakeStatusChecker(Clock()))
    assert verdict.reason == Reason.EXPIRED and "expired at" in verdict.words


# -- the real command against a real CA status server -------------------------------------


@pytest.fixture(scope="module")
def live(world: Pki, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("explain-live")
    port = free_port()
    procs = Processes(directory)
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(world.directory / "ca"), "--listen", f"tcp:{port}:interface=127.0.0.1")
        procs.wait_port(port)
        config = directory / "gateway.toml"
        config.write_text(_config_text(world, port))
        yield config
    finally:
        procs.stop_all()


def _run(config: Path, route: str, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "s2sgw"), "explain", "--config", str(config), "--route", route, "--cert", str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.e2e
def test_command_admits_a_good_allowed_peer_with_exit_0(world: Pki, live: Path) -> None:
    result = _run(live, "users-in", world.certs / "orders.pem")
    assert result.returncode == EXIT_ALLOWED, result.stdout + result.stderr
    assert "decision:     ALLOWED" in result.stdout
    assert "OCSP query to http://127.0.0.1:" in result.stdout


@pytest.mark.e2e
def test_command_refuses_a_revoked_peer_after_asking_the_ca(world: Pki, live: Path) -> None:
    # reports is not on users-in's allow-list: ask on a route that would admit it otherwise
    config = live.parent / "reports.toml"
    config.write_text(live.read_text().replace('allow = ["orders"]', 'allow = ["orders", "reports"]'))
    result = _run(config, "users-in", world.certs / "reports.pem")
    assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
    assert "REFUSED (revoked)" in result.stdout
    assert "keyCompromise" in result.stdout and "the CA revoked it" in result.stdout


@pytest.mark.e2e
def test_command_refuses_a_peer_not_on_the_allow_list(world: Pki, live: Path) -> None:
    result = _run(live, "users-in", world.certs / "billing.pem")
    assert result.returncode == EXIT_REFUSED
    assert "REFUSED (identity_not_allowed)" in result.stdout
    assert "billing is not on the allow-list of route users-in (it allows: orders)" in result.stdout


@pytest.mark.e2e
def test_command_refuses_a_foreign_ca_certificate(world: Pki, live: Path) -> None:
    result = _run(live, "users-in", world.directory / "foreign-orders.pem")
    assert result.returncode == EXIT_REFUSED
    assert "REFUSED (untrusted_chain)" in result.stdout
    assert "does not chain to the trust bundle" in result.stdout


@pytest.mark.e2e
def test_command_reports_an_unknown_route_with_exit_2(world: Pki, live: Path) -> None:
    result = _run(live, "nope", world.certs / "orders.pem")
    assert result.returncode == EXIT_ERROR
    assert "no route named 'nope' (routes: users-in, orders-to-users)" in result.stderr


# -- every rule a certificate breaks ------------------------------------------------------------


def _explain_path(world: Pki, path, route_name: str = "users-in"):
    """Explain a chainkit path (its own root as the bundle) on one of the world's routes."""
    config_path = world.directory / "gateway-closed.toml"
    config_path.write_text(_config_text(world, None))
    config = load_config(config_path)
    checker = FakeStatusChecker(Clock())
    results: list = []
    now = datetime.datetime.now(UTC)
    route = find_route(config, route_name)
    explain(config, [path.root], "chains.test", route, list(path.chain), checker, now).addBoth(results.append)
    assert len(results) == 1
    return results[0], checker


def test_every_rule_a_certificate_breaks_is_reported(world: Pki) -> None:
    from tests import chainkit as kit

    path = kit.build(
        kit.root(), kit.intermediate(ski=False), kit.leaf(usage=("digital_signature", "key_cert_sign"), serial=b"\x00")
    )
    verdict, checker = _explain_path(world, path)
    assert not verdict.allowed and verdict.reason == Reason.BAD_CERTIFICATE
    rendered = verdict.render()
    for rule in ("leaf-key-usage: leaf keyUsage asserts keyCertSign", "serial-number: serial number is zero",
                 "subject-key-id: CA certificate has no subjectKeyIdentifier (depth 1",
                 "second-verifier: validation failed: EE keyUsage must not assert keyCertSign"):
        assert rule in rendered, rendered
    assert "(3 more problems listed above.)" in verdict.words
    assert checker.calls == []  # the CA is not asked about a certificate refused anyway


def test_the_second_verifiers_refusal_is_reported(world: Pki) -> None:
    import ipaddress

    from cryptography import x509

    from tests import chainkit as kit

    constraints = x509.NameConstraints([x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))], None)
    sans = (x509.UniformResourceIdentifier("spiffe://chains.test/orders"), x509.IPAddress(ipaddress.ip_address("192.0.2.7")))
    path = kit.build(kit.root(), kit.intermediate(name_constraints=constraints), kit.leaf("orders", sans=sans))
    verdict, _ = _explain_path(world, path)
    assert verdict.reason == Reason.UNTRUSTED_CHAIN
    rendered = verdict.render()
    assert "permitted subtree violation" in rendered  # OpenSSL's words, and the second verifier's:
    assert "second-verifier: validation failed: candidates exhausted: no permitted name constraints" in rendered
    assert "does not trust" not in rendered  # the chain ends in our root: no hint about another CA


def test_a_sound_chain_goes_on_to_the_authorizer(world: Pki) -> None:
    from tests import chainkit as kit

    verdict, checker = _explain_path(world, kit.standard())
    assert verdict.reason == Reason.IDENTITY_NOT_ALLOWED  # svc is not on users-in's allow-list
    assert "passes our rules and the second verifier" in verdict.render()
