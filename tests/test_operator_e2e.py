"""End to end: what an operator sees when starting and stopping real `twistd s2sgw` gateways.

A port already taken stops the start with one line naming the route (or the admin endpoint) and
its key; `s2sgw check-config --bind` finds the same before a start; a CA URL that answers with an
HTTP error is reported as such by /readyz.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import (
    BIN,
    Pki,
    Processes,
    free_port,
    gateway_config,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("operator-e2e"), None, ("users",))


def users_config(pki: Pki, listen_port: int, ca_port: int | None = None, admin: str = "", mode: str = "off") -> str:
    users = service_block(
        pki,
        "users",
        f"""
        [[service.inbound]]
        name = "users-in"
        listen = "tcp:{listen_port}:interface=127.0.0.1"
        backend = "tcp:127.0.0.1:9"
        allow = ["orders"]
        """,
    )
    return gateway_config(pki, ca_port, users, mode=mode) + admin


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def run_gateway_to_exit(tmp_path: Path, config: str) -> tuple[int, str]:
    path = tmp_path / "gw.toml"
    path.write_text(config)
    result = subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "s2sgw", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


def test_a_route_port_in_use_stops_the_start_with_one_line(pki: Pki, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, output = run_gateway_to_exit(tmp_path, users_config(pki, port))
    assert code == 1
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert lines[0].endswith(
        f"s2sgw: route users-in of service users cannot listen ([[service.inbound]] listen = "
        f"'tcp:{port}:interface=127.0.0.1'): Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    ), output


def test_an_admin_port_in_use_stops_the_start_with_one_line(pki: Pki, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        admin = f'\n[admin]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        code, output = run_gateway_to_exit(tmp_path, users_config(pki, free_port(), admin=admin))
    assert code == 1
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert f"s2sgw: the admin endpoint cannot listen ([admin] listen = 'tcp:{port}:interface=127.0.0.1'): " in lines[0]
    assert lines[0].endswith("Address already in use."), output


def test_check_config_bind_finds_a_port_in_use(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path.write_text(users_config(pki, port))
        busy = subprocess.run([str(BIN / "s2sgw"), "check-config", "--bind", str(path)], capture_output=True, timeout=60)
    assert busy.returncode == 1
    assert b"route users-in of service users cannot listen" in busy.stderr and b"in use" in busy.stderr
    free = subprocess.run([str(BIN / "s2sgw"), "check-config", "--bind", str(path)], capture_output=True, timeout=60)
    assert free.returncode == 0, free.stderr
    assert b": OK" in free.stdout


def test_readyz_says_the_ca_answered_an_http_error_rather_than_unreachable(pki: Pki, tmp_path: Path) -> None:
    """A plain HTTP server in the CA's place answers the OCSP POST with 501."""
    procs = Processes(tmp_path)
    ports = {"web": free_port(), "admin": free_port(), "users": free_port()}
    try:
        procs.start("web", [sys.executable, "-m", "http.server", str(ports["web"]), "--bind", "127.0.0.1"])
        procs.wait_port(ports["web"])
        admin = f'\n[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\nprobe_interval = 0.3\n'
        (tmp_path / "gw.toml").write_text(users_config(pki, ports["users"], ports["web"], admin, mode="ocsp"))
        procs.twistd("gw", "s2sgw", "--config", str(tmp_path / "gw.toml"))
        procs.wait_port(ports["admin"])
        reasons: list[str] = []

        def reported() -> bool:
            code, body = http_get(f"http://127.0.0.1:{ports['admin']}/readyz")
            reasons[:] = json.loads(body)["reasons"]
            return code == 503 and any("answered HTTP 501" in reason for reason in reasons)

        wait_for(reported, timeout=15)
        assert not any("unreachable" in reason for reason in reasons), reasons
    finally:
        procs.stop_all()


def test_an_outbound_listener_on_every_interface_is_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    orders_to_users = service_block(
        pki,
        "users",
        f"""
        [[service.outbound]]
        listen = "tcp:{free_port()}"
        remote = "tcp:127.0.0.1:9"
        peer = "users"
        """,
    )
    code, output = run_gateway_to_exit(tmp_path, gateway_config(pki, None, orders_to_users, mode="off"))
    assert code != 0
    assert "service[0].outbound[0].listen" in output and "allow_remote = true" in output, output
    assert "Traceback" not in output


def test_on_sigterm_the_admin_endpoint_answers_stopping_while_connections_drain(pki: Pki, tmp_path: Path) -> None:
    """One gateway relays to itself (outbound -> its own inbound -> an echo backend); with a live
    connection open, SIGTERM closes the listeners while /readyz keeps answering 503 "stopping".
    The gateway logs JSON lines, none of them factory chatter."""
    from tests.e2e import EchoServer

    echo = EchoServer()
    procs = Processes(tmp_path)
    ports = {"admin": free_port(), "users": free_port(), "orders": free_port()}
    pki.issue("orders")
    services = service_block(
        pki,
        "users",
        f"""
        [[service.inbound]]
        name = "users-in"
        listen = "tcp:{ports['users']}:interface=127.0.0.1"
        backend = "tcp:127.0.0.1:{echo.port}"
        allow = ["orders"]
        """,
    ) + service_block(
        pki,
        "orders",
        f"""
        [[service.outbound]]
        listen = "tcp:{ports['orders']}:interface=127.0.0.1"
        remote = "tcp:127.0.0.1:{ports['users']}"
        peer = "users"
        """,
    )
    admin = f'\n[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\n'
    config = gateway_config(pki, None, services, mode="off").replace("drain = 2", "drain = 8") + admin
    (tmp_path / "gw.toml").write_text(config)
    try:
        gateway = procs.twistd("gw", "s2sgw", "--config", str(tmp_path / "gw.toml"), "--log-format", "json")
        procs.wait_port(ports["admin"])
        procs.wait_port(ports["orders"])
        with socket.create_connection(("127.0.0.1", ports["orders"]), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            procs.signal("gw", 15)
            reasons: list[str] = []

            def stopping() -> bool:
                try:
                    code, body = http_get(f"http://127.0.0.1:{ports['admin']}/readyz")
                except OSError:
                    return False
                reasons[:] = json.loads(body)["reasons"]
                return code == 503 and any(reason.startswith("stopping") for reason in reasons)

            wait_for(stopping, timeout=5)
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", ports["users"]), timeout=2).close()
            client.sendall(b"pong")  # the live connection still relays during the drain
            assert client.recv(4) == b"pong"
        gateway.wait(timeout=20)
        assert gateway.returncode in (0, -15)  # twistd re-raises the signal it stopped for
        lines = procs.log("gw").splitlines()
        first_json = next(i for i, line in enumerate(lines) if line.startswith("{"))
        assert first_json <= 3, lines  # only twistd's banner and the options check come before
        events = [json.loads(line) for line in lines[first_json:]]
        assert not [e for e in events if e["message"].startswith(("Starting factory", "Stopping factory"))], lines
        closes = [e for e in events if e["namespace"] == "s2sgw.audit" and e["route"] == "users-in"]
        assert closes and closes[-1]["outcome"] == "closed" and closes[-1]["bytes_in"] == 8
    finally:
        procs.stop_all()
        echo.close()


def test_a_daemonizing_gateway_reports_a_port_in_use_to_the_terminal_and_leaves_no_pid_file(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path.write_text(users_config(pki, port))
        result = subprocess.run(
            [str(BIN / "twistd"), f"--pidfile={tmp_path / 'gw.pid'}", f"--logfile={tmp_path / 'gw.log'}", "s2sgw", "--config", str(path)],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
        )
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 1
    assert "route users-in of service users cannot listen" in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "gw.pid").exists()
