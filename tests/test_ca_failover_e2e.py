"""Three status servers on one PostgreSQL store and two gateways listing them in ``status.url``.

The gateways use replica B first (then C, then A). A revocation made through replica A closes
live connections at the gateways (which follow B's feed) within a second; ``kill -9`` of B under a
loop of new connections loses none of them: the gateways move to C.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from s2sgw.ca.authority import CertificateAuthority
from tests.e2e import TRUST_DOMAIN, EchoServer, Processes, closed, echoes, free_port, live_connection, s2sgw, wait_for
from tests.replicas import Replica, ReplicaSet

pytestmark = pytest.mark.e2e

CALLERS = ("orders", "reports", "billing")


def _config(certs: Path, bundle: Path, status_urls: list[str], services: str) -> str:
    urls = ", ".join(f'"{url}"' for url in status_urls)
    return (
        f'trust = "{bundle}"\n[status]\nmode = "ocsp"\nurl = [{urls}]\nfeed = true\nfail = "closed"\n'
        "max_cache_age = 1.0\ntimeout = 1.0\n[timeouts]\nhandshake = 5\ndrain = 2\n" + services
    )


def _service(certs: Path, name: str, routes: str) -> str:
    return f'\n[[service]]\nname = "{name}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n{routes}'


@attrs.define
class World:
    processes: Processes
    replicas: list[Replica]
    ports: dict[str, int]
    calls: int = 0
    lost: list[str] = attrs.Factory(list)

    def call(self, caller: str) -> bool:
        """One new connection through ``caller``'s route to the echo backend."""
        return echoes(self.ports[caller])

    def live(self, caller: str) -> socket.socket:
        return live_connection(self.ports[caller])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[World]:
    root = tmp_path_factory.mktemp("failover")
    source, certs = root / "ca", root / "certs"
    ca = CertificateAuthority.init(source, TRUST_DOMAIN, store=pg_cluster.new_database())
    for name in ("users", *CALLERS):
        ca.write_identity(ca.issue(name), certs)
    processes = Processes(root)
    echo = EchoServer()
    ports = {name: free_port() for name in ("users_gw", *CALLERS)}
    try:
        a, b, c = ReplicaSet(source, processes).start(3)
        status_urls = [f"{replica.url}/ocsp" for replica in (b, c, a)]
        users = _service(certs, "users", f"""
[[service.inbound]]
name = "users-in"
listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
backend = "tcp:127.0.0.1:{echo.port}"
allow = {list(CALLERS)!r}
""".replace("'", '"'))  # fmt: skip
        callers = "".join(
            _service(certs, name, f"""
[[service.outbound]]
name = "{name}-to-users"
listen = "tcp:{ports[name]}:interface=127.0.0.1"
remote = "tcp:127.0.0.1:{ports['users_gw']}"
peer = "users"
""")  # fmt: skip
            for name in CALLERS
        )
        bundle = source / "bundle.pem"
        (root / "users-gw.toml").write_text(_config(certs, bundle, status_urls, users))
        (root / "callers-gw.toml").write_text(_config(certs, bundle, status_urls, callers))
        processes.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        processes.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for port in ports.values():
            processes.wait_port(port)
        for name in ("users-gw", "callers-gw"):
            wait_for(lambda: "following the revocation feed" in processes.log(name), timeout=15)
        yield World(processes, [a, b, c], ports)
    finally:
        processes.stop_all()
        echo.close()


def test_a_revocation_through_replica_a_closes_live_connections_at_gateways_following_b(world: World) -> None:
    a = world.replicas[0]
    reports = world.live("reports")
    orders = world.live("orders")  # a bystander
    s2sgw("ca", "revoke", "--dir", a.directory, "reports", "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    wait_for(lambda: closed(reports), timeout=5)
    closed_after = time.monotonic() - revoked_at
    assert closed_after < 1.0, f"live connection closed {closed_after:.3f} s after the revocation"
    assert not world.call("reports")
    assert time.monotonic() - revoked_at < 1.5
    line = world.processes.wait_audit("users-gw", "users-in", "outcome=closed", "reason=revoked ")
    assert "peer=spiffe://e2e.s2sgw.test/reports" in line
    assert "from the revocation feed" in world.processes.log("users-gw")
    orders.settimeout(5)
    orders.sendall(b"still here\n")
    assert orders.recv(100) == b"still here\n"
    orders.close()
    reports.close()


def test_kill_9_of_the_replica_in_use_loses_no_call(world: World) -> None:
    b = world.replicas[1]
    stop = threading.Event()
    results: list[bool] = []

    def loop() -> None:
        while not stop.is_set():
            for caller in ("orders", "billing"):
                results.append(world.call(caller))
            time.sleep(0.02)

    runner = threading.Thread(target=loop)
    runner.start()
    try:
        wait_for(lambda: len(results) >= 20, timeout=10)
        os.kill(world.processes.running[b.name].pid, signal.SIGKILL)
        killed_at = len(results)
        time.sleep(4.0)  # several cache lifetimes (max_cache_age = 1 s): every check asks a server
    finally:
        stop.set()
        runner.join(timeout=30)
    assert len(results) - killed_at >= 40
    assert all(results), f"{results.count(False)} of {len(results)} calls lost"
