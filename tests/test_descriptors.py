"""File descriptors: the gateway raises its soft limit at start, warns when the routes cannot fit,
and a connection closed at accept for lack of descriptors is audited (``no_descriptors``) and
counted. Real ``twistd s2sgw`` processes under a lowered ``ulimit -n``."""

from __future__ import annotations

import resource
import shlex
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from s2sgw.config import GatewayConfig, InboundRoute, OutboundRoute, ServiceConfig
from s2sgw.ops.descriptors import MARGIN, descriptors_needed, raise_soft_limit
from tests.e2e import BIN, Pki, Processes, free_port, wait_for
from tests.hostile import gateway_toml, service_toml


def _config(inbound: int, pending: int, outbound: int) -> GatewayConfig:
    service = ServiceConfig(
        "users",
        Path("users.pem"),
        Path("users.key"),
        inbound=(InboundRoute("in", "users", "tcp:0", "tcp:127.0.0.1:1", max_connections=inbound, max_pending=pending),),
        outbound=(OutboundRoute("out", "users", "tcp:0", "tcp:127.0.0.1:2", "orders", max_connections=outbound),),
    )
    return GatewayConfig(Path("gateway.toml"), Path("bundle.pem"), (service,))


def test_two_descriptors_per_connection_one_per_pending_one_plus_a_margin() -> None:
    assert descriptors_needed(_config(1024, 1024, 100)) == 2 * 1024 + 1024 + 2 * 100 + MARGIN


def test_the_soft_limit_is_raised_to_the_hard_limit_and_never_lowered() -> None:
    limits = {resource.RLIMIT_NOFILE: (1024, 524288)}

    def set_(which: int, value: tuple[int, int]) -> None:
        limits[which] = value

    limit = raise_soft_limit(3200, limits.get, set_)
    assert (limit.before, limit.soft, limit.hard, limit.enough) == (1024, 524288, 524288, True)
    assert limits[resource.RLIMIT_NOFILE] == (524288, 524288)
    limits[resource.RLIMIT_NOFILE] = (4096, 2048)  # odd, but never lower what is there
    assert raise_soft_limit(3200, limits.get, set_).soft == 4096
    limits[resource.RLIMIT_NOFILE] = (256, 1024)
    limit = raise_soft_limit(3200, limits.get, set_)
    assert (limit.soft, limit.enough) == (1024, False)


def _start(procs: Processes, name: str, toml: str, ulimit: str) -> None:
    config = procs.directory / f"{name}.toml"
    config.write_text(toml)
    twistd = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "s2sgw", "--config", str(config)]
    procs.start(name, ["bash", "-c", f"ulimit {ulimit} && exec {shlex.join(twistd)}"])


def _log(procs: Processes, name: str) -> str:
    path = procs.directory / f"{name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


@pytest.mark.e2e
def test_under_a_low_limit_the_gateway_raises_it_or_warns_and_audits_and_counts_connections_it_cannot_accept(
    tmp_path: Path,
) -> None:
    pki = Pki.create(tmp_path, None, ("users",))
    procs = Processes(tmp_path)
    ports = {"raised": free_port(), "low": free_port(), "admin": free_port()}
    route = (
        '\n[[service.inbound]]\nname = "users-in"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        'backend = "tcp:127.0.0.1:1"\nallow = ["orders"]\n'
    )
    flood: list[socket.socket] = []
    try:
        # Soft limit 1,024 under a high hard limit (systemd's default): raised at start.
        services = service_toml("users", pki.certs / "users.pem", pki.certs / "users.key", route.format(port=ports["raised"]))
        _start(procs, "raised", gateway_toml(pki.bundle, services), "-Sn 1024 && ulimit -Hn 8192")
        procs.wait_port(ports["raised"])
        assert _soft_limit(procs.running["raised"].pid) == 8192
        assert "descriptor limit raised from 1024 to 8192" in _log(procs, "raised")

        # A hard limit of 64: cannot fit 1024 connections, warned; the connections past it are
        # closed at accept, each audited and counted.
        services = service_toml("users", pki.certs / "users.pem", pki.certs / "users.key", route.format(port=ports["low"]))
        admin = f'[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\n'
        _start(procs, "low", gateway_toml(pki.bundle, services, handshake=5, extra=admin), "-n 64")
        procs.wait_port(ports["low"])
        log = _log(procs, "low")
        assert "descriptor limit 64 (hard 64) cannot fit the configured connections: 3136 needed" in log
        for _ in range(100):
            flood.append(socket.create_connection(("127.0.0.1", ports["low"]), timeout=5))
        wait_for(lambda: "reason=no_descriptors" in _log(procs, "low"), timeout=10)
        for sock in flood:
            sock.close()
        flood.clear()
        refused = [line for line in _log(procs, "low").splitlines() if "s2sgw.audit" in line and "reason=no_descriptors" in line]
        assert refused and all("outcome=refused" in line and "route=users-in " in line for line in refused)
        metrics = ""
        deadline = time.monotonic() + 10
        while 'reason="no_descriptors"' not in metrics and time.monotonic() < deadline:
            try:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
        counted = [
            line for line in metrics.splitlines()
            if line.startswith("s2sgw_connections_total{") and 'reason="no_descriptors"' in line
        ]
        assert counted and float(counted[0].rsplit(" ", 1)[1]) >= len(refused), metrics[-2000:]
    finally:
        for sock in flood:
            sock.close()
        procs.stop_all()
