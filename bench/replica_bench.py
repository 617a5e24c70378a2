"""Status servers on one PostgreSQL store: OCSP answers per second and the revocation feed's reach.

    python -m bench.replica_bench [--seconds 3] [--clients 2] [--subscribers 1000] [--json]

In a throwaway directory: a PostgreSQL cluster of its own (tests/pgcluster.py), a CA made with
``--store``, two ``twistd s2sgw-ca`` replicas, nginx with the shipped
``etc/nginx/s2sgw-ca-cache.conf`` in front of them, and ``openssl ocsp`` on an index of the same
records as the reference. Each answer source is checked with a sample answer first.

OCSP: nonce-less queries, keep-alive connections from client processes (bench/ocsp_bench.py's
client; GET for the cache, since only GET answers are cacheable), answers per second and the
replicas' CPU per answer; ``openssl ocsp`` closes the connection after each answer, so it is
measured with a new connection per query, as in bench/ocsp_bench.py.

Feed: ``--subscribers`` long polls held on one replica (raw sockets, one thread), then a revocation:
once written from this process (time from its commit to the last subscriber's answer), once with
``s2sgw ca revoke`` as a command (time from its start and from its exit; negative: before it had
exited); and the replica's RSS growth per held subscriber.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cryptography.x509 import ocsp

from bench.ocsp_bench import (
    _cpu_seconds,
    build_requests,
    check_answer,
    client,
    start_openssl,
    start_ours,
    write_index,
)
from s2sgw.ca.authority import CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
CACHE_CONF = ROOT / "etc" / "nginx" / "s2sgw-ca-cache.conf"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def start_nginx(work: Path, ports: list[int]) -> tuple[subprocess.Popen, int]:
    """nginx with the shipped cache configuration, its servers replaced by ``ports``."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    text = CACHE_CONF.read_text()
    lines = [line for line in text.splitlines() if line.strip().startswith("server ") and ":8080" in line]
    servers = [lines[0].replace(lines[0].split()[1], f"127.0.0.1:{port}") for port in ports]
    port = _free_port()
    text = text.replace("\n".join(lines), "\n".join(servers)).replace("listen 80;", f"listen 127.0.0.1:{port};")
    text = text.replace("/var/cache/nginx/s2sgw-ca", str(work / "nginx-cache"))
    for name in ("nginx-cache", "nginx-body", "nginx-proxy"):
        (work / name).mkdir()
    (work / "nginx-ca.conf").write_text(text)
    (work / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {work}/nginx.pid;\nerror_log {work}/nginx-error.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {work}/nginx-body; proxy_temp_path {work}/nginx-proxy;\n"
        f"  include {work}/nginx-ca.conf; }}\n"
    )
    process = subprocess.Popen([nginx, "-p", str(work), "-c", str(work / "nginx.conf")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nginx did not start")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_paths(bodies: list[bytes]) -> list[str]:
    return ["/ocsp/" + urllib.parse.quote(base64.b64encode(body).decode(), safe="") for body in bodies]


def get_client(port: int, paths: list[str], warmup: float, seconds: float) -> dict:
    """Like ``ocsp_bench.client`` with GET requests on keep-alive connections (reopened when the
    server closes one, as nginx does after ``keepalive_requests``)."""
    from bench.ocsp_bench import _read_response

    requests = [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii") for path in paths]
    sock: socket.socket | None = None
    buffer = bytearray()
    count = errors = i = 0
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds
    while (now := time.monotonic()) < stop:
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer.clear()
            sock.sendall(requests[i % len(requests)])
            i += 1
            body, open_ = _read_response(sock, buffer)
            if now >= measure_from:
                count += 1 if body else 0
                errors += 0 if body else 1
            if not open_:
                sock.close()
                sock = None
        except OSError:
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return {"count": count, "errors": errors}


def measure(pool, jobs: list[tuple], warmup: float, seconds: float, pids: list[int]) -> dict:
    futures = [pool.submit(*job) for job in jobs]
    time.sleep(warmup)
    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
    results = [future.result(timeout=warmup + seconds + 60) for future in futures]
    cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before
    count = sum(r["count"] for r in results)
    return {
        "rps": count / seconds,
        "errors": sum(r["errors"] for r in results),
        "cpu_us_per_answer": 1e6 * cpu / count if count else None,
    }


def _latest(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
        probe.sendall(b"GET /revocations?since=0&wait=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := probe.recv(65536):
            data += chunk
    return json.loads(base64.b64decode(json.loads(data.split(b"\r\n\r\n", 1)[1])["payload"]))["latest"]


def _hold(port: int, subscribers: int) -> tuple[selectors.BaseSelector, list[socket.socket]]:
    """``subscribers`` long polls for what comes after the feed's latest, held by the server."""
    request = f"GET /revocations?since={_latest(port)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    socks = []
    for _ in range(subscribers):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib_health(port) as health:
            if health["feed_waiting"] >= subscribers:
                break
        time.sleep(0.1)
    return selector, socks


def _last_answer(selector: selectors.BaseSelector, socks: list[socket.socket]) -> tuple[int, float | None]:
    """Wait for every held request's answer: (how many answered, monotonic time of the last)."""
    answered, last = 0, None
    deadline = time.monotonic() + 60
    while answered < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            if key.fileobj.recv(65536):
                answered += 1
                last = time.monotonic()
            selector.unregister(key.fileobj)
    for sock in socks:
        sock.close()
    return answered, last


def feed_reach(ca: CertificateAuthority, port: int, pid: int, subscribers: int, victims: list[int]) -> dict:
    """Hold ``subscribers`` long polls and revoke; time to the last answer, RSS per subscriber.

    First the revocation is written from this process (the time counts from its commit), then
    with ``s2sgw ca revoke`` as a command (from its start, and from its exit)."""
    time.sleep(0.5)
    rss_before = _rss_kib(pid)
    selector, socks = _hold(port, subscribers)
    rss_held = _rss_kib(pid)
    ca.revoke(serial=victims[0], reason="keyCompromise")
    committed = time.monotonic()
    answered, last = _last_answer(selector, socks)
    selector, socks = _hold(port, subscribers)
    exited: list[float] = []
    started = time.monotonic()
    command = subprocess.Popen(
        [str(Path(sys.executable).parent / "s2sgw"), "ca", "revoke", "--dir", str(ca.directory),
         "--serial", format(victims[1], "x"), "--reason", "keyCompromise"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    waiter = threading.Thread(target=lambda: (command.wait(), exited.append(time.monotonic())))
    waiter.start()
    answered_cli, last_cli = _last_answer(selector, socks)
    waiter.join(timeout=60)
    return {
        "subscribers": subscribers,
        "answered": min(answered, answered_cli),
        "last_after_commit_ms": 1000 * (last - committed) if last else None,
        "command_ms": 1000 * (exited[0] - started),
        "last_after_command_start_ms": 1000 * (last_cli - started) if last_cli else None,
        "last_after_command_exit_ms": 1000 * (last_cli - exited[0]) if last_cli else None,
        "rss_kib_per_subscriber": (rss_held - rss_before) / subscribers,
    }


class urllib_health:
    """``GET /healthz`` of a status server as a dict (a context manager for symmetry with urlopen)."""

    def __init__(self, port: int) -> None:
        self._answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)

    def __enter__(self) -> dict:
        return json.load(self._answer)

    def __exit__(self, *exc: object) -> None:
        self._answer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=2, help="client processes (one connection each)")
    parser.add_argument("--certs", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.pgcluster import running_cluster

    processes: list[subprocess.Popen] = []
    figures: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="replica-bench-") as tmp, running_cluster() as cluster:
        work = Path(tmp)
        ca = CertificateAuthority.init(work / "ca", "bench.test", store=cluster.new_database())
        records = [ca.issue(f"svc-{i}").record for i in range(args.certs + 2)]
        victims, records = records[-2:], records[:-2]
        certs = [record.certificate() for record in records]
        plain, _ = build_requests(ca, certs, nonces=0)
        write_index(ca, work / "index.txt")
        try:
            ports, pids = [], []
            for name in ("a", "b"):
                (work / name).mkdir()
                shutil.copytree(ca.directory, work / name / "ca")
                process, port = start_ours(work / name / "ca", work / name, 300)
                processes.append(process)
                ports.append(port)
                pids.append(process.pid)
            theirs, theirs_port = start_openssl(ca.directory, work / "index.txt", work, 300)
            cache, cache_port = start_nginx(work, ports)
            processes += [theirs, cache]
            for port, path in ((ports[0], "/ocsp"), (ports[1], "/ocsp"), (theirs_port, "/"), (cache_port, "/ocsp")):
                check_answer(port, path, plain[0], ca, ocsp.OCSPCertStatus.GOOD)
            paths = get_paths(plain)
            for port in ports:  # every replica has looked every serial up once, like a warm server
                for body in plain:
                    check_answer(port, "/ocsp", body, ca, ocsp.OCSPCertStatus.GOOD)
            for path in paths:  # and the cache holds every answer
                with urllib.request.urlopen(f"http://127.0.0.1:{cache_port}{path}", timeout=10) as answer:
                    answer.read()
            c, w, sec = args.clients, args.warmup, args.seconds
            scenarios = {
                "one replica": ([(client, ports[0], "/ocsp", plain[i::c], w, sec, True) for i in range(c)], pids[:1]),
                "two replicas": ([(client, ports[i % 2], "/ocsp", plain[i::c], w, sec, True) for i in range(c)], pids),
                "one replica GET": ([(get_client, ports[0], paths[i::c], w, sec) for i in range(c)], pids[:1]),
                "nginx cache GET": ([(get_client, cache_port, paths[i::c], w, sec) for i in range(c)], [cache.pid]),
                "openssl ocsp": ([(client, theirs_port, "/", plain[i::c], w, sec, False) for i in range(c)], [theirs.pid]),
            }
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(c, mp_context=context) as pool:
                for _ in range(args.rounds):
                    for name, (jobs, scenario_pids) in scenarios.items():
                        figures.setdefault(name, []).append(measure(pool, jobs, w, sec, scenario_pids))
            feed = feed_reach(ca, ports[0], pids[0], args.subscribers, [v.serial for v in victims])
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()

    def median(name: str, key: str) -> float:
        values = [run[key] for run in figures[name] if run[key] is not None]
        return statistics.median(values) if values else 0.0

    print(f"OCSP through PostgreSQL-backed replicas, {args.clients} clients, {args.certs} serials, "
          f"{args.seconds:g} s x {args.rounds}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'source':<20}{'answers/s':>11}{'CPU us/ans':>12}{'errors':>8}")
    for name in figures:
        errors = sum(run["errors"] for run in figures[name])
        print(f"{name:<20}{median(name, 'rps'):>11.0f}{median(name, 'cpu_us_per_answer'):>12.0f}{errors:>8}")
    print(
        f"feed: {feed['answered']}/{feed['subscribers']} subscribers notified, the last "
        f"{feed['last_after_commit_ms']:.0f} ms after the revocation committed; with `s2sgw ca revoke` "
        f"({feed['command_ms']:.0f} ms, Python start-up included): {feed['last_after_command_start_ms']:.0f} ms "
        f"after it started, {feed['last_after_command_exit_ms']:.0f} ms after it exited; "
        f"{feed['rss_kib_per_subscriber']:.1f} KiB RSS per held subscriber"
    )
    if args.json:
        print(json.dumps({"figures": figures, "feed": feed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
