"""End to end: a revocation closes live connections within a second, through real processes.

Layout: `twistd s2sgw-ca`; callers-gw hosts orders, reports and billing, each with an outbound
route to users-gw; users-gw admits all three and relays to an echo backend. users-gw follows
the revocation feed through a TCP relay in this test process, so a test can cut the feed while
the CA keeps answering OCSP.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest

from tests.e2e import (
    EchoServer,
    closed,
    echoes,
    live_connection,
    Pki,
    Processes,
    callers_of,
    free_port,
    gateway_config,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e

S2SGW = str(Path(sys.executable).parent / "s2sgw")
MAX_CACHE_AGE = 2.0


class CuttableRelay:
    """A TCP relay to ``target``; ``cut()`` stops listening and drops every relayed connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                return
            with self.lock:
                if self.is_cut:  # accepted from the backlog after the cut
                    conn.close()
                    upstream.close()
                    return
                self.open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            a.settimeout(None)
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.is_cut = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self.sock.close()
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    relay: CuttableRelay


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("revocation-e2e")
    ports = {name: free_port() for name in ("ca", "users_gw", "orders", "reports", "billing", "admin")}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "reports", "billing"))
    echo = EchoServer()
    relay = CuttableRelay(ports["ca"])
    procs = Processes(root)
    try:
        procs.twistd(
            "ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1",
            "--validity", "10",
        )
        users = service_block(
            pki,
            "users",
            f"""
            [[service.inbound]]
            name = "users-in"
            listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{echo.port}"
            allow = ["orders", "reports", "billing"]
            """,
        )
        callers = callers_of(pki, ("orders", "reports", "billing"), ports, ports["users_gw"])
        admin = '[admin]\nlisten = "tcp:%d:interface=127.0.0.1"' % ports["admin"]
        users_config = gateway_config(pki, ports["ca"], users, extra=admin).replace(
            "max_cache_age = 1.0", f'max_cache_age = {MAX_CACHE_AGE}\nfeed = "http://127.0.0.1:{relay.port}/revocations"'
        )
        callers_config = gateway_config(pki, ports["ca"], callers).replace(
            "max_cache_age = 1.0", f"max_cache_age = {MAX_CACHE_AGE}"
        )
        (root / "users-gw.toml").write_text(users_config)
        (root / "callers-gw.toml").write_text(callers_config)
        procs.wait_port(ports["ca"])
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in ("users_gw", "orders", "reports", "billing"):
            procs.wait_port(ports[name])
        for name in ("users-gw", "callers-gw"):
            wait_for(lambda: "revocation feed" in procs.log(name) or "following the revocation feed" in procs.log(name))
        yield World(pki, procs, ports, relay)
    finally:
        procs.stop_all()
        relay.cut()
        echo.close()


def revoke(world: World, name: str) -> float:
    """`s2sgw ca revoke NAME`; returns the monotonic time the command finished."""
    subprocess.run(
        [S2SGW, "ca", "revoke", "--dir", str(world.pki.directory / "ca"), name, "--reason", "keyCompromise"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return time.monotonic()


def test_revoking_a_caller_closes_its_live_connection_and_refuses_new_ones_within_a_second(world: World) -> None:
    reports = live_connection(world.ports["reports"])
    orders = live_connection(world.ports["orders"])  # a bystander
    revoked = revoke(world, "reports")
    wait_for(lambda: closed(reports), timeout=5)
    closed_after = time.monotonic() - revoked
    assert not echoes(world.ports["reports"])
    refused_after = time.monotonic() - revoked
    assert closed_after < 1.0, f"live connection closed {closed_after:.3f} s after the revocation"
    assert refused_after < 1.0, f"new connection refused {refused_after:.3f} s after the revocation"
    line = world.procs.wait_audit("users-gw", "users-in", "outcome=closed", "reason=revoked ")
    assert "peer=spiffe://e2e.s2sgw.test/reports" in line
    refusal = world.procs.wait_audit("users-gw", "users-in", "outcome=refused", "reason=revoked ")
    assert "peer=spiffe://e2e.s2sgw.test/reports" in refusal
    assert "from the revocation feed" in world.procs.log("users-gw")
    orders.settimeout(5)
    orders.sendall(b"still here\n")
    assert orders.recv(100) == b"still here\n"
    orders.close()
    reports.close()


def test_the_status_document_and_metrics_show_how_fresh_the_feed_is(world: World) -> None:
    import json
    import urllib.request

    base = f"http://127.0.0.1:{world.ports['admin']}"
    with urllib.request.urlopen(f"{base}/status", timeout=10) as answer:
        feed = json.load(answer)["revocation_feed"]
    assert feed["following"] is True
    assert feed["seq"] >= 1  # the revocation of the test before
    assert 0 <= feed["age_seconds"] < 30
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert "s2sgw_revocation_feed_age_seconds{" in metrics
    assert 's2sgw_live_closes_total{cause="feed",reason="revoked"} 1.0' in metrics


def test_with_the_feed_cut_a_revocation_takes_effect_at_revalidation(world: World) -> None:
    billing = live_connection(world.ports["billing"])
    world.relay.cut()
    wait_for(lambda: "revocation feed at" in world.procs.log("users-gw") and "failed" in world.procs.log("users-gw"))
    revoked = revoke(world, "billing")
    wait_for(lambda: closed(billing), timeout=MAX_CACHE_AGE + 5)
    closed_after = time.monotonic() - revoked
    assert closed_after < MAX_CACHE_AGE + 2.0, closed_after
    line = world.procs.wait_audit("users-gw", "users-in", "outcome=closed", "reason=revoked ", "billing")
    assert "peer=spiffe://e2e.s2sgw.test/billing" in line
    assert "found on re-validation" in world.procs.log("users-gw")
    billing.close()


def test_revoking_the_remote_closes_outbound_connections_to_it(world: World) -> None:
    """Last: afterwards no caller reaches users any more."""
    orders = live_connection(world.ports["orders"])
    revoked = revoke(world, "users")
    wait_for(lambda: closed(orders), timeout=5)
    assert time.monotonic() - revoked < 1.0
    line = world.procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed", "reason=revoked ")
    assert "peer=spiffe://e2e.s2sgw.test/users" in line
    orders.close()
