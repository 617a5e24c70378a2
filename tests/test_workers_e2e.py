"""End to end: ``workers = 2`` behaves as one process, on two cores.

Layout: `twistd s2sgw-ca` (OCSP and the revocation feed); users-gw runs with ``workers = 2``, an
admin endpoint and ``--log-format json``, admitting orders, reports and billing and relaying to an
echo backend; callers-gw (one process) hosts the three callers' outbound routes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import attrs
import pytest

from tests.e2e import (
    closed,
    echoes,
    live_connection,
    BIN,
    EchoServer,
    Pki,
    Processes,
    callers_of,
    free_port,
    gateway_config,
    receive_notification,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e

S2SGW = str(Path(sys.executable).parent / "s2sgw")


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    root: Path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}{path}", timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def workers(self) -> list[dict]:
        code, body = self.get("/status")
        assert code == 200, body
        return json.loads(body)["workers"]

    def live(self) -> list[int | None]:
        """Live connections of route users-in, per worker (None: the worker did not answer)."""
        return [
            None if w["status"] is None else w["status"]["routes"]["users-in"]["live_connections"]
            for w in self.workers()
        ]

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def metric(self, sample: str) -> float | None:
        _, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("workers-e2e")
    ports = {name: free_port() for name in ("ca", "users_gw", "orders", "reports", "billing", "admin")}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "reports", "billing"))
    echo = EchoServer()
    procs = Processes(root)
    try:
        procs.twistd(
            "ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1",
            "--validity", "10",
        )  # fmt: skip
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
        extra = 'workers = 2\n[admin]\nlisten = "tcp:%d:interface=127.0.0.1"' % ports["admin"]
        users_config = gateway_config(pki, ports["ca"], users, extra=extra).replace(
            "max_cache_age = 1.0", f'max_cache_age = 2.0\nfeed = "http://127.0.0.1:{ports["ca"]}/revocations"'
        )
        (root / "users-gw.toml").write_text(users_config)
        callers = callers_of(pki, ("orders", "reports", "billing"), ports, ports["users_gw"])
        (root / "callers-gw.toml").write_text(gateway_config(pki, ports["ca"], callers))
        procs.wait_port(ports["ca"])
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"), "--log-format", "json")
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in ("admin", "orders", "reports", "billing"):
            procs.wait_port(ports[name])
        world = World(pki, procs, ports, root)
        wait_for(world.ready, timeout=30, step=0.2)
        wait_for(lambda: procs.log("users-gw").count("following the revocation feed") >= 2, timeout=20)
        yield world
    finally:
        procs.stop_all()
        echo.close()


def spread(world: World, caller: str, count: int = 12) -> list[socket.socket]:
    """``count`` live connections of ``caller``, once both workers hold some of them (and no others)."""
    wait_for(lambda: world.live() == [0, 0], timeout=10, step=0.1)  # those of other tests have closed
    socks = [live_connection(world.ports[caller]) for _ in range(count)]
    wait_for(lambda: sum(n or 0 for n in world.live()) >= count, timeout=10, step=0.1)
    assert all(n for n in world.live()), f"connections not spread over both workers: {world.live()}"
    return socks


def test_connections_are_spread_over_both_workers_and_metrics_sum_them(world: World) -> None:
    """Each worker accepts some connections; /metrics counts the connections of both."""
    socks = spread(world, "orders")
    per_worker = world.live()
    assert sum(per_worker) == len(socks)
    assert world.metric('s2sgw_active_connections{route="users-in"}') == len(socks)
    status = {w["index"]: w for w in world.workers()}
    assert set(status) == {0, 1} and status[0]["pid"] != status[1]["pid"]
    for sock in socks:
        sock.close()
    wait_for(lambda: world.metric('s2sgw_active_connections{route="users-in"}') == 0)


def test_every_worker_logs_json_lines_through_the_parent(world: World) -> None:
    """With --log-format json, both workers' audit lines reach the parent's log as JSON objects."""
    for sock in spread(world, "orders"):
        sock.close()

    def audit_workers() -> set[int]:
        records = [json.loads(line) for line in world.procs.log("users-gw").splitlines() if line.startswith("{")]
        return {r["worker"] for r in records if r.get("route") == "users-in" and r.get("peer", "").endswith("/orders")}

    wait_for(lambda: audit_workers() == {0, 1}, timeout=10)
    started = [line for line in world.procs.log("users-gw").splitlines() if "worker 1 started" in line]
    assert started and json.loads(started[0])["message"].startswith("worker 1 started")  # the parent's own, as JSON


def test_a_reload_reaches_every_worker(world: World) -> None:
    """SIGHUP to the parent: every worker loads its trust material again."""
    generations = [w["status"]["generation"] for w in world.workers()]
    world.procs.signal("users-gw", signal.SIGHUP)
    wait_for(lambda: [w["status"]["generation"] for w in world.workers()] == [g + 1 for g in generations], timeout=10)
    assert world.ready()
    assert world.procs.running["users-gw"].poll() is None


def test_a_revocation_closes_live_connections_in_every_worker(world: World) -> None:
    """reports is revoked: its live connections close in both workers, new ones are refused."""
    socks = spread(world, "reports")
    bystander = live_connection(world.ports["orders"])
    subprocess.run(
        [S2SGW, "ca", "revoke", "--dir", str(world.pki.directory / "ca"), "reports", "--reason", "keyCompromise"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    wait_for(lambda: all(closed(sock) for sock in socks), timeout=5)
    assert not echoes(world.ports["reports"])
    bystander.sendall(b"still here\n")
    assert bystander.recv(100) == b"still here\n"
    assert world.metric('s2sgw_live_closes_total{cause="feed",reason="revoked"}') >= len(socks)
    for sock in (*socks, bystander):
        sock.close()


def test_a_killed_worker_is_started_again_while_the_other_keeps_serving(world: World) -> None:
    """kill -9 of one worker: its connections die, the other's live on, a new worker takes its place."""
    socks = spread(world, "billing")
    workers = world.workers()
    victim, survivor = workers[0], workers[1]
    restarts = world.metric('s2sgw_worker_restarts_total{worker="0"}') or 0.0
    on_survivor = survivor["status"]["routes"]["users-in"]["live_connections"]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: sum(closed(sock) for sock in socks) >= len(socks) - on_survivor, timeout=10)
    alive = [sock for sock in socks if not closed(sock)]
    assert alive, "the surviving worker's connections were closed too"
    for sock in alive:
        sock.settimeout(5)
        sock.sendall(b"still here\n")
        assert sock.recv(100) == b"still here\n"
    assert echoes(world.ports["billing"])
    wait_for(lambda: world.workers()[0]["pid"] not in (None, victim["pid"]) and world.ready(), timeout=20, step=0.2)
    assert world.workers()[1]["pid"] == survivor["pid"]
    assert world.metric('s2sgw_worker_restarts_total{worker="0"}') == restarts + 1
    assert all(echoes(world.ports["billing"]) for _ in range(8))
    assert "worker 0 (pid %d) exited" % victim["pid"] in world.procs.log("users-gw")
    for sock in socks:
        sock.close()


def test_systemd_hears_of_all_workers_ready_reloaded_and_stopping(tmp_path: Path) -> None:
    """READY=1 once both workers are; a reload framed until both reloaded; SIGTERM drains both."""
    pki = Pki.create(tmp_path, None, ("users",))
    port = free_port()
    users = service_block(
        pki,
        "users",
        f"""
        [[service.inbound]]
        name = "users-in"
        listen = "tcp:{port}:interface=127.0.0.1"
        backend = "tcp:127.0.0.1:9"
        """,
    )
    (tmp_path / "gw.toml").write_text(gateway_config(pki, None, users, mode="off", extra="workers = 2"))
    name = f"s2sgw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={tmp_path / 'gw.log'}",
                "s2sgw", "--config", str(tmp_path / "gw.toml")]  # fmt: skip
        with open(tmp_path / "gw.out", "wb") as out:
            parent = subprocess.Popen(argv, env=dict(os.environ, NOTIFY_SOCKET="@" + name), stdout=out, stderr=out)
        try:
            ready = receive_notification(sock, "READY")
            assert ready["STATUS"] == "2 of 2 workers ready"
            log = (tmp_path / "gw.log").read_text()
            assert log.count("route users-in listening on") == 3  # the parent's sockets, then each worker
            children = [int(p) for p in _children(parent.pid)]
            assert len(children) == 2

            parent.send_signal(signal.SIGHUP)
            assert receive_notification(sock, "RELOADING")["RELOADING"] == "1"
            assert receive_notification(sock, "READY")["STATUS"] == "2 of 2 workers ready"
            # Log events come through each worker's stdout, maybe after its notification.
            wait_for(lambda: (tmp_path / "gw.log").read_text().count("trust material reloaded: generation 2") == 2)
            assert "need a restart" not in (tmp_path / "gw.log").read_text()

            for pid in (parent.pid, *children):  # as systemd's default KillMode=control-group does
                os.kill(pid, signal.SIGTERM)
            assert receive_notification(sock, "STOPPING")["STOPPING"] == "1"
            assert parent.wait(timeout=20) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped for
            log = (tmp_path / "gw.log").read_text()
            assert log.count(") stopped") == 2 and "Main loop terminated." in log
            assert "Traceback" not in log and "Unhandled" not in log
            for pid in children:
                assert not Path(f"/proc/{pid}").exists()
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()


def _children(pid: int) -> list[str]:
    """The child process ids of ``pid`` once it has two (or after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(found) >= 2 or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
