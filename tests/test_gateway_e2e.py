"""End to end: real `twistd s2sgw` gateways and `twistd s2sgw-ca`, an HTTP backend, curl and openssl.

Layout: callers-gw hosts three services (orders, billing, reports), each with an outbound route to
the users gateway; users-gw admits orders and reports. billing is a valid identity that is not
allowed; reports is revoked by one test.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest

from tests.e2e import (
    Pki,
    Processes,
    callers_of,
    free_port,
    gateway_config,
    rss_kib,
    service_block,
)

pytestmark = pytest.mark.e2e

BIG = 200 * 1024 * 1024


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    files: Path
    big_sha256: str

    def url(self, caller: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[caller]}/{path}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gateway-e2e")
    ports = {name: free_port() for name in ("ca", "users_gw", "backend", "orders", "billing", "reports")}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "billing", "reports"))
    files = root / "www"
    (files / "api" / "users").mkdir(parents=True)
    (files / "api" / "users" / "1").write_text('{"id": 1, "name": "John Doe"}')
    digest = hashlib.sha256()
    with open(files / "big.bin", "wb") as out:
        chunk = os.urandom(1024 * 1024)
        for i in range(BIG // len(chunk)):
            block = chunk[:-8] + i.to_bytes(8, "big")
            digest.update(block)
            out.write(block)

    procs = Processes(root)
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")
        procs.start(
            "backend",
            [sys.executable, "-m", "http.server", str(ports["backend"]), "--bind", "127.0.0.1", "--directory", str(files)],
        )
        users = service_block(
            pki,
            "users",
            f"""
            [[service.inbound]]
            name = "users-in"
            listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{ports['backend']}"
            allow = ["orders", "reports"]
            """,
        )
        callers = callers_of(pki, ("orders", "billing", "reports"), ports, ports["users_gw"])
        (root / "users-gw.toml").write_text(gateway_config(pki, ports["ca"], users))
        (root / "callers-gw.toml").write_text(gateway_config(pki, ports["ca"], callers))
        procs.wait_port(ports["ca"])
        procs.wait_port(ports["backend"])
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in ("users_gw", "orders", "billing", "reports"):
            procs.wait_port(ports[name])
        yield World(pki, procs, ports, files, digest.hexdigest())
    finally:
        procs.stop_all()


def curl(url: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *extra, url], capture_output=True, timeout=timeout + 10)


def s_client(port: int, *extra: str, identity: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """openssl s_client sending a request; ``identity`` (NAME.pem, its .key beside) as client cert + chain."""
    if identity is not None:
        extra += ("-cert", str(identity), "-cert_chain", str(identity), "-key", str(identity.with_suffix(".key")))
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "users", "-ign_eof", *extra],
        input=b"GET /api/users/1 HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=30,
    )


def test_request_passes_outbound_then_inbound_to_the_backend(world: World) -> None:
    """orders -> its gateway -> mTLS -> users gateway -> backend, and the answer comes back."""
    result = curl(world.url("orders", "api/users/1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'{"id": 1, "name": "John Doe"}'
    line = world.procs.wait_audit("users-gw", "users-in", "outcome=closed", "peer=spiffe://e2e.s2sgw.test/orders")
    assert "tls=TLSv1.3" in line
    world.procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed", "peer=spiffe://e2e.s2sgw.test/users")


def test_gateways_run_on_s2sgws_reactor_unless_told_otherwise(world: World) -> None:
    """``twistd s2sgw`` without ``--reactor`` runs the relay without per-event logging contexts."""
    for name in ("users-gw", "callers-gw"):
        assert "reactor class: s2sgw.reactor.DirectEventsReactor" in world.procs.log(name)


def test_relayed_connections_log_no_factory_start_and_stop_lines(world: World) -> None:
    """Each dial used to log "Starting factory" and "Stopping factory"; the audit line says it all."""
    assert curl(world.url("orders", "api/users/1")).returncode == 0
    world.procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed")
    for name in ("users-gw", "callers-gw"):
        log = world.procs.log(name)
        assert "twisted.internet.protocol.Factory object" not in log
        assert "TLSFactory" not in log


def test_caller_not_on_the_allow_list_is_refused(world: World) -> None:
    """billing holds a good certificate, but users only admits orders and reports."""
    result = curl(world.url("billing", "api/users/1"))
    assert result.returncode != 0
    assert b"John Doe" not in result.stdout
    line = world.procs.wait_audit("users-gw", "users-in", "reason=identity_not_allowed ")
    assert "peer=spiffe://e2e.s2sgw.test/billing" in line


def test_openssl_client_without_certificate_is_refused(world: World) -> None:
    result = s_client(world.ports["users_gw"], "-CAfile", str(world.pki.bundle))
    assert b"John Doe" not in result.stdout
    world.procs.wait_audit("users-gw", "users-in", "reason=no_client_cert ")


def test_openssl_client_with_a_foreign_ca_certificate_is_refused(world: World, tmp_path: Path) -> None:
    foreign = Pki.create(tmp_path, None, ("orders",))
    result = s_client(
        world.ports["users_gw"],
        "-CAfile", str(world.pki.bundle),
        identity=foreign.certs / "orders.pem",
    )
    assert b"John Doe" not in result.stdout
    world.procs.wait_audit("users-gw", "users-in", "reason=untrusted_chain ")


def test_openssl_client_with_an_expired_certificate_is_refused(world: World, tmp_path: Path) -> None:
    world.pki.issue_expired("orders", tmp_path)
    result = s_client(
        world.ports["users_gw"],
        "-CAfile", str(world.pki.bundle),
        identity=tmp_path / "orders.pem",
    )
    assert b"John Doe" not in result.stdout
    world.procs.wait_audit("users-gw", "users-in", "reason=expired ")


def test_openssl_client_with_a_good_certificate_gets_the_answer(world: World) -> None:
    """The inbound listener speaks plain mTLS: any TLS client with an allowed identity works."""
    result = s_client(
        world.ports["users_gw"],
        "-CAfile", str(world.pki.bundle),
        identity=world.pki.certs / "orders.pem",
    )
    assert b'{"id": 1, "name": "John Doe"}' in result.stdout


def test_revoked_caller_is_refused_within_the_status_validity_window(world: World) -> None:
    """After `s2sgw ca revoke reports`, reports is refused with reason revoked (cache age is 1 s)."""
    assert curl(world.url("reports", "api/users/1")).returncode == 0
    subprocess.run(
        [str(Path(sys.executable).parent / "s2sgw"), "ca", "revoke", "--dir", str(world.pki.directory / "ca"), "reports", "--reason", "keyCompromise"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if curl(world.url("reports", "api/users/1"), timeout=5).returncode != 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("reports was still admitted 10 s after its revocation")
    line = world.procs.wait_audit("users-gw", "users-in", "reason=revoked ")
    assert "peer=spiffe://e2e.s2sgw.test/reports" in line


def test_large_transfer_arrives_intact_with_flat_gateway_memory(world: World) -> None:
    """200 MB through both gateways: same checksum, and neither gateway grows by more than a few MB."""
    pids = {name: world.procs.running[name].pid for name in ("users-gw", "callers-gw")}
    idle = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(idle)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "120", world.url("orders", "big.bin")],
            capture_output=True,
            timeout=150,
        )
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == BIG
    assert hashlib.sha256(result.stdout).hexdigest() == world.big_sha256
    growth = {name: (peak[name] - idle[name]) / 1024 for name in pids}
    assert all(mib < 16 for mib in growth.values()), growth


def test_client_that_shuts_its_write_side_still_gets_the_whole_answer(world: World) -> None:
    """Half-close travels through both gateways; the answer still comes back in full."""
    with socket.create_connection(("127.0.0.1", world.ports["orders"]), timeout=10) as sock:
        sock.sendall(b"GET /api/users/1 HTTP/1.0\r\nHost: users\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.0 200")
    assert received.endswith(b'{"id": 1, "name": "John Doe"}')
