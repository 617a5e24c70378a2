"""Revocation-to-enforcement latency with live connections open.

``python -m bench.revocation_bench [--connections 100] [--revocations 20] [--poll-interval 0.25]``

Starts, in a throwaway directory, a CA (``twistd s2sgw-ca``), an echo backend, users-gw (one
inbound route admitting every caller) and callers-gw (one service with an outbound route per
revoked identity), all on 127.0.0.1. It opens ``--connections`` live connections spread evenly
over ``--revocations`` caller identities and proves each one echoes. Then, one identity at a time,
it revokes the identity with the CA library (the same SQLite write ``s2sgw ca revoke`` makes) and
measures how long until every live connection of that identity is closed by the gateways. It
checks that no connection of an identity not yet revoked was closed, and prints the median and
worst latency (first and last connection of each identity) as text and, with ``--json``, JSON.

The latency covers the CA's store poll (``--poll-interval``, default 0.25 s as in production),
re-signing, the signed long-poll answer, verification at users-gw and closing the connections.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TRUST_DOMAIN = "bench.s2sgw.test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Echo:
    """An echo backend in this process, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


class Processes:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: dict[str, subprocess.Popen] = {}

    def twistd(self, name: str, *args: str) -> None:
        log = open(self.directory / f"{name}.out", "wb")
        self.running[name] = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={self.directory / (name + '.log')}", *args],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.running.items():
                if process.poll() is not None:
                    log = (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"{name} exited with {process.returncode}:\n{log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"nothing listens on port {port} after {timeout} s")

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(100, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def open_live(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"ping\n")
    if sock.recv(100) != b"ping\n":
        raise SystemExit(f"no echo through port {port}")
    sock.setblocking(False)
    return sock


def wait_closed(socks: list[socket.socket], started: float, timeout: float) -> list[float]:
    """Seconds from ``started`` until each socket saw EOF or a reset."""
    closed: dict[int, float] = {}
    deadline = started + timeout
    while len(closed) < len(socks):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"{len(socks) - len(closed)} connections still open {timeout} s after the revocation")
        readable, _, _ = select.select([s for i, s in enumerate(socks) if i not in closed], [], [], min(left, 0.5))
        now = time.monotonic()
        for sock in readable:
            if is_closed(sock):
                closed[socks.index(sock)] = now - started
    return sorted(closed.values())


def run(connections: int, revocations: int, poll_interval: float, keep: bool) -> dict:
    from s2sgw.ca.authority import CertificateAuthority

    directory = Path(tempfile.mkdtemp(prefix="s2sgw-revocation-bench-"))
    names = [f"svc{i:02d}" for i in range(revocations)]
    ports = {name: free_port() for name in ["ca", "users_gw", *names]}
    ca = CertificateAuthority.init(directory / "ca", TRUST_DOMAIN, url=f"http://127.0.0.1:{ports['ca']}")
    certs = directory / "certs"
    for name in ["users", *names]:
        ca.write_identity(ca.issue(name), certs)
    echo = Echo()
    procs = Processes(directory)

    def service(name: str, routes: str) -> str:
        return f'\n[[service]]\nname = "{name}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n' + textwrap.dedent(routes)

    head = textwrap.dedent(
        f"""\
        trust = "{directory / 'ca' / 'bundle.pem'}"
        [status]
        url = "http://127.0.0.1:{ports['ca']}/ocsp"
        [timeouts]
        idle = 3600
        drain = 1
        """
    )
    allow = ", ".join(f'"{n}"' for n in names)
    users = service(
        "users",
        f"""
        [[service.inbound]]
        name = "users-in"
        listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
        backend = "tcp:127.0.0.1:{echo.port}"
        allow = [{allow}]
        """,
    )
    callers = "".join(
        service(
            name,
            f"""
            [[service.outbound]]
            name = "{name}-to-users"
            listen = "tcp:{ports[name]}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{ports['users_gw']}"
            peer = "users"
            """,
        )
        for name in names
    )
    (directory / "users-gw.toml").write_text(head + users)
    (directory / "callers-gw.toml").write_text(head + callers)
    socks: dict[str, list[socket.socket]] = {name: [] for name in names}
    try:
        procs.twistd(
            "ca", "s2sgw-ca", "--dir", str(directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1",
            "--poll-interval", str(poll_interval),
        )
        procs.wait_port(ports["ca"])
        procs.twistd("users-gw", "s2sgw", "--config", str(directory / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(directory / "callers-gw.toml"))
        for name in ("users_gw", *names):
            procs.wait_port(ports[name])
        time.sleep(1.0)  # both gateways' first feed answers
        for i in range(connections):
            name = names[i % len(names)]
            socks[name].append(open_live(ports[name]))
        results = []
        for index, name in enumerate(names):
            started = time.monotonic()
            ca.revoke(name=name, reason="keyCompromise")
            revoked_at = time.monotonic()
            latencies = wait_closed(socks[name], revoked_at, timeout=30.0)
            results.append(
                {"name": name, "connections": len(latencies), "first": latencies[0], "last": latencies[-1],
                 "revoke_call": revoked_at - started}
            )
            survivors = [n for n in names[index + 1 :] for s in socks[n] if is_closed(s)]
            if survivors:
                raise SystemExit(f"connections of identities not revoked were closed: {sorted(set(survivors))}")
            # Let the next long polls settle, then revoke at a random point of the CA's poll cycle.
            time.sleep(0.3 + random.uniform(0, poll_interval))
        users_log = (directory / "users-gw.log").read_text(errors="replace")
        closes = users_log.count("reason=revoked")
        lasts = [r["last"] for r in results]
        firsts = [r["first"] for r in results]
        return {
            "connections": connections,
            "revocations": revocations,
            "poll_interval": poll_interval,
            "median_last": statistics.median(lasts),
            "worst_last": max(lasts),
            "median_first": statistics.median(firsts),
            "worst_first": max(firsts),
            "audited_revoked_closes": closes,
            "per_revocation": results,
            "directory": str(directory) if keep else None,
        }
    finally:
        for group in socks.values():
            for sock in group:
                sock.close()
        procs.stop()
        echo.sock.close()
        if not keep:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--revocations", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=0.25, help="the CA's store poll (s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--keep", action="store_true", help="keep the directory with logs")
    args = parser.parse_args(argv)
    if args.revocations < 1 or args.connections < args.revocations:
        parser.error("need at least one revocation and one connection per revoked identity")
    result = run(args.connections, args.revocations, args.poll_interval, args.keep)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['revocations']} revocations, {result['connections']} live connections, "
        f"CA poll interval {result['poll_interval']} s"
    )
    print(
        f"revocation -> all of the identity's connections closed: median {result['median_last'] * 1000:.0f} ms, "
        f"worst {result['worst_last'] * 1000:.0f} ms"
    )
    print(
        f"revocation -> first connection closed:                 median {result['median_first'] * 1000:.0f} ms, "
        f"worst {result['worst_first'] * 1000:.0f} ms"
    )
    print(f"audit events with reason=revoked at users-gw: {result['audited_revoked_closes']}")
    if result["directory"]:
        print(f"logs in {result['directory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
