"""No leak: after many refused and allowed connections, the gateway's descriptors and memory are
back within a small margin of where they started.

One ``twistd s2sgw`` (OCSP against a real ``twistd s2sgw-ca``) in front of a recording echo
backend. Concurrent clients in threads: refused ones (no certificate, garbage, an identity not
on the allow-list) and allowed ones (a full mTLS round trip). The default run uses 1,000 of each;
the 10,000 + 10,000 run of the issue is opt-in (``-m slow``).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import attrs
import pytest

from tests.hostile import (
    HOSTILE,
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    client_context,
    free_port,
    gateway_toml,
    inbound_toml,
    marker,
    opt_in_slow,
    plain_exchange,
    roundtrip,
    service_toml,
    tls_exchange,
)

pytestmark = pytest.mark.e2e

WORKERS = 8
WARM_UP = 200


@attrs.define
class World:
    pki: Pki
    procs: Processes
    gateway: Gateway
    backend: RecordingBackend
    port: int
    contexts: dict[str, ssl.SSLContext]

    def allowed_once(self, _: int) -> None:
        roundtrip(self.port, self.contexts["orders"])

    def refused_once(self, i: int) -> None:
        kind = i % 3
        if kind == 0:
            exchange = tls_exchange(self.port, self.contexts["anonymous"], marker("no-cert"))
        elif kind == 1:
            exchange = tls_exchange(self.port, self.contexts["billing"], marker("not-allowed"))
        else:
            exchange = plain_exchange(self.port, HOSTILE + os.urandom(64))
        assert b"echo:" not in exchange.received, exchange

    def wait_idle(self, audits: int, timeout: float = 60) -> None:
        """Until ``audits`` audit lines are written (every connection ended) and the backend is idle."""
        deadline = time.monotonic() + timeout
        while len(self.gateway.audit_lines()) < audits or self.backend.open_connections():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.gateway.audit_lines())} of {audits} audit lines, "
                    f"{self.backend.open_connections()} backend connections open"
                )
            time.sleep(0.1)
        time.sleep(0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-resources")
    ports = {"ca": free_port(), "users": free_port()}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "billing"))
    procs = Processes(root)
    backend = RecordingBackend(root / "backend.bytes")
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")
        procs.wait_port(ports["ca"])
        services = service_toml(
            "users", pki.certs / "users.pem", pki.certs / "users.key",
            inbound_toml("users-in", ports["users"], backend.port, ["orders"], max_connections=4096),
        )  # fmt: skip
        status = f'mode = "ocsp"\nurl = "http://127.0.0.1:{ports["ca"]}/ocsp"\nfail = "closed"\nmax_cache_age = 60'
        toml = gateway_toml(pki.bundle, services, status=status, handshake=5, connect=5)
        gateway = Gateway.start(procs, "gateway", toml, [ports["users"]])
        gateway.wait_audit(0, "users-in")  # the start-up probe's connection, before anything is counted
        certs = pki.certs
        contexts = {
            name: client_context(certs / f"{name}.pem", certs / f"{name}.key", pki.bundle)
            for name in ("orders", "billing")
        }
        contexts["anonymous"] = client_context(None, None, pki.bundle)
        yield World(pki, procs, gateway, backend, ports["users"], contexts)
    finally:
        procs.stop_all()
        backend.stop()


def _hammer(count: int, attempt: Callable[[int], None]) -> None:
    with ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(attempt, range(count)):
            pass


def _churn(world: World, count: int) -> None:
    """``count`` refused and ``count`` allowed connections, interleaved, ``WORKERS`` at a time."""
    def one(i: int) -> None:
        (world.refused_once if i % 2 else world.allowed_once)(i // 2)

    _hammer(2 * count, one)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure_leaks(world: World, count: int, rss_margin_mib: float) -> None:
    gateway = world.gateway
    audits = len(gateway.audit_lines()) + 2 * WARM_UP
    _churn(world, WARM_UP)  # allocator pools, caches and the status answer settle first
    world.wait_idle(audits)
    assert len(gateway.audit_lines()) == audits
    fds, rss = gateway.fds(), gateway.rss_kib()
    cpu = _cpu_seconds(gateway.pid)
    started = time.monotonic()
    _churn(world, count)
    world.wait_idle(audits + 2 * count)
    spent = time.monotonic() - started
    lines = gateway.audit_lines()[audits:]
    assert len(lines) == 2 * count, "every connection ends in exactly one audit line"
    refused = [line for line in lines if "outcome=refused " in line]
    assert len(refused) == count
    reasons = {reason: sum(f"reason={reason} " in line for line in refused) for reason in ("no_client_cert", "identity_not_allowed", "tls_error")}
    assert sum(reasons.values()) == count, reasons
    assert HOSTILE not in world.backend.received()
    fds_after, rss_after = gateway.fds(), gateway.rss_kib()
    growth = (rss_after - rss) / 1024
    cpu = _cpu_seconds(gateway.pid) - cpu
    print(f"\n{count}+{count} connections in {spent:.1f}s (gateway CPU {cpu:.1f}s); fds {fds} -> {fds_after}; rss {rss / 1024:.1f} -> {rss_after / 1024:.1f} MiB; {reasons}")
    # a margin of 2 for the status client's kept-alive connections to the CA, which come and go
    assert fds_after <= fds + 2, f"file descriptors {fds} -> {fds_after}"
    assert growth < rss_margin_mib, f"RSS grew by {growth:.1f} MiB"
    roundtrip(world.port, world.contexts["orders"])


def test_a_thousand_refused_and_a_thousand_allowed_connections_leak_nothing(world: World) -> None:
    _measure_leaks(world, 1000, rss_margin_mib=8)


@pytest.mark.slow
def test_ten_thousand_refused_and_ten_thousand_allowed_connections_leak_nothing(world: World, request) -> None:
    opt_in_slow(request)
    _measure_leaks(world, 10_000, rss_margin_mib=12)


def test_no_handshake_state_is_left_behind_by_abandoned_connections(world: World) -> None:
    """Clients that connect and vanish at every stage: accept, mid-hello, after the handshake."""
    from tests.hostile import client_hello

    gateway = world.gateway
    hello = client_hello()
    audits = len(gateway.audit_lines())
    world.wait_idle(audits)
    fds = gateway.fds()
    import socket
    import struct

    def vanish(i: int) -> None:
        sock = socket.create_connection(("127.0.0.1", world.port), timeout=5)
        stage = i % 3
        if stage == 1:
            sock.sendall(hello[: len(hello) // 2])
        elif stage == 2:
            tls = world.contexts["orders"].wrap_socket(sock, server_hostname="users")
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    _hammer(300, vanish)
    world.wait_idle(audits + 300)
    assert gateway.fds() <= fds + 2
    roundtrip(world.port, world.contexts["orders"])

