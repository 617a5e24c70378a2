"""Reloads of real ``twistd s2sgw`` gateways by SIGHUP: certificate and trust-anchor rotation under
load, bad material refused with the old kept, allow-list changes.

Layout: callers-gw runs orders and billing, each with an outbound route to users-gw; users-gw
runs users, whose inbound route forwards to a small HTTP backend. Status checking is ``off`` here
so that only the TLS material changes (revocation across a reload is tested in mode ``crl`` in
test_crl_refresh.py); the chain is still verified against the current bundle on every handshake.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from s2sgw.serials import serial_text
from s2sgw.ca.authority import CertificateAuthority
from tests.e2e import TRUST_DOMAIN, Pki, Processes, free_port
from tests.reloadkit import (
    ANSWER,
    ClientLoop,
    config_text,
    count_in_log,
    get,
    inbound,
    outbound,
    reloaded,
    wait_log_count,
)

pytestmark = pytest.mark.e2e

ORDERS = f"spiffe://{TRUST_DOMAIN}/orders"
USERS = f"spiffe://{TRUST_DOMAIN}/users"
BILLING = f"spiffe://{TRUST_DOMAIN}/billing"


@attrs.define
class World:
    root: Path
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    trust: Path

    def users_config(self, allow: list[str]) -> None:
        routes = inbound("users-in", self.ports["users_gw"], self.ports["backend"], allow)
        (self.root / "users-gw.toml").write_text(config_text(self.trust, self.pki.certs, {"users": routes}))


def start_world(root: Path) -> World:
    ports = {name: free_port() for name in ("users_gw", "backend", "orders", "billing")}
    pki = Pki.create(root, None, ("users", "orders", "billing"))
    trust = root / "trust.pem"
    shutil.copyfile(pki.bundle, trust)
    www = root / "www"
    (www / "api" / "users").mkdir(parents=True)
    (www / "api" / "users" / "1").write_bytes(ANSWER)
    procs = Processes(root)
    world = World(root, pki, procs, ports, trust)
    try:
        procs.start(
            "backend",
            [sys.executable, "-m", "http.server", str(ports["backend"]), "--bind", "127.0.0.1", "--directory", str(www)],
        )
        world.users_config(["orders"])
        callers = {
            name: outbound(f"{name}-to-users", ports[name], ports["users_gw"], "users") for name in ("orders", "billing")
        }
        (root / "callers-gw.toml").write_text(config_text(trust, pki.certs, callers))
        procs.wait_port(ports["backend"])
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in ("users_gw", "orders", "billing"):
            procs.wait_port(ports[name])
        # A request through both gateways proves both reactors run (and SIGHUP handlers are in place).
        assert get(ports["orders"]) == (200, ANSWER)
    except BaseException:
        procs.stop_all()
        raise
    return world


def serial_hex(pem: Path) -> str:
    from cryptography import x509

    return serial_text(x509.load_pem_x509_certificate(pem.read_bytes()).serial_number)


def hup_and_wait(world: World, name: str, generation: int) -> None:
    world.procs.signal(name)
    reloaded(world.procs, name, generation)


# -- rotation under load ---------------------------------------------------------------------------


def test_certificate_and_trust_anchor_rotation_under_load_drops_nothing(tmp_path: Path) -> None:
    """old root -> bundle with old and new roots -> certificates reissued under the new root ->
    new root only, each step a SIGHUP to the real processes, while a client opens connection after
    connection through both gateways: no request fails, each side sees the other's new certificate
    serial, a connection opened between the overlap steps finishes after the rotation, and one
    opened with old-root certificates is closed (untrusted_chain) once the old root leaves."""
    world = start_world(tmp_path)
    procs, ports = world.procs, world.ports
    client = ClientLoop(ports["orders"], deadline=120.0)
    live = fresh = None
    try:
        new_ca = CertificateAuthority.init(tmp_path / "ca2", TRUST_DOMAIN)
        old_root = world.pki.bundle.read_bytes()
        new_root = (tmp_path / "ca2" / "bundle.pem").read_bytes()
        client.start()
        client.wait_for(20)

        # A connection opened now, finished after the whole rotation.
        import socket

        live = socket.create_connection(("127.0.0.1", ports["orders"]), timeout=10)
        live.sendall(b"GET /api/users/1 HTTP/1.0\r\n")

        # 1. overlap bundle on both sides
        world.trust.write_bytes(old_root + new_root)
        hup_and_wait(world, "users-gw", 2)
        hup_and_wait(world, "callers-gw", 2)
        client.wait_for(20)

        # 2. users rotates to a certificate from the new CA
        new_ca.write_identity(new_ca.issue("users"), world.pki.certs)
        users_serial = serial_hex(world.pki.certs / "users.pem")
        hup_and_wait(world, "users-gw", 3)
        client.wait_for(20)
        line = procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed", f"serial={users_serial} ")
        assert f"peer={USERS} " in line

        # 3. orders (and billing) rotate too
        new_ca.write_identity(new_ca.issue("orders"), world.pki.certs)
        new_ca.write_identity(new_ca.issue("billing"), world.pki.certs)
        orders_serial = serial_hex(world.pki.certs / "orders.pem")
        hup_and_wait(world, "callers-gw", 3)
        client.wait_for(20)
        line = procs.wait_audit("users-gw", "users-in", "outcome=closed", f"serial={orders_serial} ")
        assert f"peer={ORDERS} " in line

        # A connection opened now, between peers that both hold new-root certificates.
        fresh = socket.create_connection(("127.0.0.1", ports["orders"]), timeout=10)
        fresh.sendall(b"GET /api/users/1 HTTP/1.0\r\n")
        client.wait_for(5)

        # 4. the old root leaves the bundle
        world.trust.write_bytes(new_root)
        hup_and_wait(world, "users-gw", 4)
        hup_and_wait(world, "callers-gw", 4)
        client.wait_for(20)

        # The connection set up under the old root no longer chains to the trust: closed.
        assert live.recv(65536) == b""
        procs.wait_audit("users-gw", "users-in", "outcome=closed", "reason=untrusted_chain ")
        # The one set up under the new root carries on.
        fresh.sendall(b"\r\n")
        answer = b""
        while chunk := fresh.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(ANSWER)
    finally:
        client.stop()
        for sock in (live, fresh):
            if sock is not None:
                sock.close()
        procs.stop_all()
    assert client.failures == [], f"{len(client.failures)} of {client.ok + len(client.failures)} requests failed"
    assert client.ok >= 100
    print(f"rotation: {client.ok} requests on new connections, {len(client.failures)} failed")
    assert "trust reload failed" not in procs.log("users-gw") + procs.log("callers-gw")


def test_after_rotation_the_old_root_is_no_longer_trusted(tmp_path: Path) -> None:
    """With the old root gone from the bundle, a peer still holding an old-CA certificate is refused."""
    world = start_world(tmp_path)
    try:
        new_ca = CertificateAuthority.init(tmp_path / "ca2", TRUST_DOMAIN)
        stale = tmp_path / "stale"
        stale.mkdir()
        shutil.copy(world.pki.certs / "orders.pem", stale)
        shutil.copy(world.pki.certs / "orders.key", stale)
        new_ca.write_identity(new_ca.issue("users"), world.pki.certs)
        world.trust.write_bytes((tmp_path / "ca2" / "bundle.pem").read_bytes())
        hup_and_wait(world, "users-gw", 2)
        result = subprocess.run(
            [
                "openssl", "s_client", "-connect", f"127.0.0.1:{world.ports['users_gw']}", "-ign_eof",
                "-CAfile", str(tmp_path / "ca2" / "bundle.pem"),
                "-cert", str(stale / "orders.pem"), "-cert_chain", str(stale / "orders.pem"),
                "-key", str(stale / "orders.key"),
            ],
            input=b"GET /api/users/1 HTTP/1.0\r\n\r\n",
            capture_output=True,
            timeout=30,
        )
        assert ANSWER not in result.stdout
        # The served chain verifies against the new root alone.
        assert b"Verify return code: 0 (ok)" in result.stdout
        world.procs.wait_audit("users-gw", "users-in", "reason=untrusted_chain ")
    finally:
        world.procs.stop_all()


# -- bad material, allow-lists (one pair of gateways) -------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    world = start_world(tmp_path_factory.mktemp("reload-e2e"))
    try:
        yield world
    finally:
        world.procs.stop_all()


def _truncate_bundle(world: World, tmp: Path) -> None:
    data = world.trust.read_bytes()
    world.trust.write_bytes(data[: len(data) // 2])


def _mismatched_key(world: World, tmp: Path) -> None:
    other = world.pki.ca.issue("users")
    (world.pki.certs / "users.key").write_bytes(other.key_pem)


def _expired_certificate(world: World, tmp: Path) -> None:
    world.pki.issue_expired("users", world.pki.certs)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate_bundle, "trust.pem: truncated PEM certificate"),
        (_mismatched_key, "key does not match the certificate"),
        (_expired_certificate, "users.pem: certificate expired at"),
    ],
    ids=["truncated-bundle", "mismatched-key", "expired-certificate"],
)
def test_bad_material_on_sighup_keeps_serving_with_the_old_and_logs_why(
    world: World, tmp_path: Path, damage, reason: str
) -> None:
    procs = world.procs
    saved = {path: path.read_bytes() for path in (world.trust, world.pki.certs / "users.pem", world.pki.certs / "users.key")}
    serial = serial_hex(world.pki.certs / "users.pem")
    failed_before = count_in_log(procs, "users-gw", "trust reload failed")
    reloaded_before = count_in_log(procs, "users-gw", "trust material reloaded")
    try:
        damage(world, tmp_path)
        procs.signal("users-gw")
        log = wait_log_count(procs, "users-gw", "trust reload failed", failed_before + 1)
        failure_line = [line for line in log.splitlines() if "trust reload failed" in line][-1]
        assert reason in failure_line, failure_line
        assert "keeping generation" in failure_line
        # Still serving, with the old certificate.
        assert get(world.ports["orders"]) == (200, ANSWER)
        procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed", f"serial={serial} ")
        assert count_in_log(procs, "users-gw", "trust material reloaded") == reloaded_before
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    # Repaired files load again.
    procs.signal("users-gw")
    wait_log_count(procs, "users-gw", "trust material reloaded", reloaded_before + 1)
    assert get(world.ports["orders"]) == (200, ANSWER)


def test_allow_list_changes_apply_on_sighup(world: World) -> None:
    """billing is refused, added to users' allow-list by SIGHUP and admitted; then orders is removed."""
    procs = world.procs
    status, _ = _try(world.ports["billing"])
    assert status != 200
    procs.wait_audit("users-gw", "users-in", "reason=identity_not_allowed ", f"peer={BILLING} ")
    reloads = count_in_log(procs, "users-gw", "trust material reloaded")
    try:
        world.users_config(["orders", "billing"])
        procs.signal("users-gw")
        wait_log_count(procs, "users-gw", "trust material reloaded", reloads + 1)
        assert get(world.ports["billing"]) == (200, ANSWER)
        procs.wait_audit("users-gw", "users-in", "outcome=closed", f"peer={BILLING} ")

        world.users_config(["billing"])
        procs.signal("users-gw")
        wait_log_count(procs, "users-gw", "trust material reloaded", reloads + 2)
        denied = count_in_log(procs, "users-gw", f"reason=identity_not_allowed peer={ORDERS} ")
        status, _ = _try(world.ports["orders"])
        assert status != 200
        wait_log_count(procs, "users-gw", f"reason=identity_not_allowed peer={ORDERS} ", denied + 1)
        assert get(world.ports["billing"]) == (200, ANSWER)
    finally:
        world.users_config(["orders"])
        procs.signal("users-gw")
        wait_log_count(procs, "users-gw", "trust material reloaded", reloads + 3)
    assert get(world.ports["orders"]) == (200, ANSWER)


def test_listener_change_on_sighup_is_logged_as_needing_a_restart(world: World) -> None:
    """A changed listen address is not applied by a reload; the log says a restart is needed."""
    procs = world.procs
    reloads = count_in_log(procs, "users-gw", "trust material reloaded")
    original = (world.root / "users-gw.toml").read_text()
    try:
        moved = original.replace(f"tcp:{world.ports['users_gw']}:", f"tcp:{free_port()}:")
        (world.root / "users-gw.toml").write_text(moved)
        procs.signal("users-gw")
        log = wait_log_count(procs, "users-gw", "trust material reloaded", reloads + 1)
        assert "listener changes of service users need a restart" in log
        assert get(world.ports["orders"]) == (200, ANSWER)
    finally:
        (world.root / "users-gw.toml").write_text(original)
        procs.signal("users-gw")
        wait_log_count(procs, "users-gw", "trust material reloaded", reloads + 2)


def _try(port: int) -> tuple[int, bytes]:
    try:
        return get(port, timeout=10)
    except Exception:
        return 0, b""
