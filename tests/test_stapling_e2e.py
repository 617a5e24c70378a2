"""End to end: OCSP stapling between real gateways, with a real CA status server.

Layout: `twistd s2sgw-ca`; users-gw serves users (inbound, stapling by default) in front of an
echo backend; orders-gw (stapling on) and billing-gw (``staple = false``) each have an outbound
route to users-gw and an admin endpoint whose /metrics show their own status queries.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request

import attrs
import pytest

from s2sgw.serials import serial_text
from tests.e2e import (
    EchoServer,
    Pki,
    Processes,
    free_port,
    gateway_config,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stapling-e2e")
    names = ("ca", "users_gw", "users_admin", "orders", "orders_admin", "billing", "billing_admin")
    ports = {name: free_port() for name in names}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "billing"))
    echo = EchoServer()
    procs = Processes(root)
    try:
        procs.twistd(
            "ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1",
            "--validity", "60",
        )
        users = service_block(
            pki,
            "users",
            f"""
            [[service.inbound]]
            name = "users-in"
            listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{echo.port}"
            allow = ["orders", "billing"]
            """,
        )
        configs = {"users-gw": gateway_config(pki, ports["ca"], users, extra=_admin(ports["users_admin"]))}
        for caller, staple in (("orders", "true"), ("billing", "false")):
            block = service_block(
                pki,
                caller,
                f"""
                [[service.outbound]]
                name = "{caller}-to-users"
                listen = "tcp:{ports[caller]}:interface=127.0.0.1"
                remote = "tcp:127.0.0.1:{ports['users_gw']}"
                peer = "users"
                """,
            )
            text = gateway_config(pki, ports["ca"], block, extra=_admin(ports[caller + "_admin"]))
            configs[f"{caller}-gw"] = text.replace("max_cache_age = 1.0", f"max_cache_age = 30\nstaple = {staple}")
        procs.wait_port(ports["ca"])
        for name, text in configs.items():
            (root / f"{name}.toml").write_text(text)
            procs.twistd(name, "s2sgw", "--config", str(root / f"{name}.toml"))
        # Admin ports open after every route's port; probing an outbound port would relay a connection.
        for name in ("users_admin", "orders_admin", "billing_admin"):
            procs.wait_port(ports[name])
        world = World(pki, procs, ports)
        wait_for(lambda: stapling(world).get("stapling"), timeout=15)
        yield world
    finally:
        procs.stop_all()
        echo.close()


def _admin(port: int) -> str:
    return f'[admin]\nlisten = "tcp:{port}:interface=127.0.0.1"'


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return answer.read()


def stapling(world: World) -> dict:
    """users-gw's stapling status for service users."""
    document = json.loads(fetch(world.ports["users_admin"], "/status"))
    return document["stapling"]["services"]["users"]


def metric(world: World, admin: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on a gateway's /metrics matching ``labels`` (0 if none)."""
    text = fetch(world.ports[admin], "/metrics").decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def echo_through(world: World, caller: str) -> float:
    """One new connection through ``caller``'s gateway to the echo backend; seconds to the echo."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", world.ports[caller]), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"ping\n")
        assert sock.recv(100) == b"ping\n"
    return time.monotonic() - started


def test_openssl_s_client_sees_a_successful_stapled_answer(world: World) -> None:
    """`openssl s_client -status` against the inbound listener gets users' OCSP answer: good."""
    certs = world.pki.certs
    result = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{world.ports['users_gw']}", "-servername", "users",
            "-status", "-cert", str(certs / "orders.pem"), "-key", str(certs / "orders.key"),
            "-CAfile", str(world.pki.bundle), "-verify_return_error",
        ],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    out = result.stdout.decode(errors="replace")
    assert "OCSP Response Status: successful" in out, out + result.stderr.decode(errors="replace")
    assert "Cert Status: good" in out
    serial = f"{_serial(world, 'users'):X}"
    assert re.search(rf"Serial Number: 0*{serial}", out), out


def _serial(world: World, name: str) -> int:
    return next(r.serial for r in world.pki.ca.records() if r.name == name)


def test_the_outbound_gateway_asks_the_ca_nothing_when_the_remote_staples(world: World) -> None:
    """orders-gw relays through users-gw after verifying users' staple: no status query of its own.
    billing-gw, with staple = false, asks the CA for the same certificate's status."""
    assert metric(world, "orders_admin", "s2sgw_status_queries_total") == 0
    assert metric(world, "billing_admin", "s2sgw_status_queries_total") == 0
    echo_through(world, "orders")
    echo_through(world, "billing")
    wait_for(lambda: metric(world, "orders_admin", "s2sgw_staples_received_total", result="valid") == 1)
    assert metric(world, "orders_admin", "s2sgw_status_queries_total") == 0
    assert metric(world, "orders_admin", "s2sgw_status_cache_lookups_total", result="hit") == 1
    assert metric(world, "billing_admin", "s2sgw_status_queries_total", outcome="good") == 1
    assert metric(world, "billing_admin", "s2sgw_staples_received_total") == 0
    # users-gw fetched its own answer for stapling (and still asks about its callers: no client stapling)
    assert metric(world, "users_admin", "s2sgw_staple_fetches_total", outcome="good") >= 1
    assert metric(world, "users_admin", "s2sgw_status_queries_total", outcome="good") >= 1


def test_users_gw_reports_its_staple_in_status(world: World) -> None:
    status = stapling(world)
    assert status["stapling"] is True and status["state"] == "good" and status["failures"] == 0
    assert status["serial"] == serial_text(_serial(world, "users"))  # as openssl x509 -serial prints it
