"""What a certificate renewal adds to request latency through a gateway pair, under load.

    python -m bench.renewal_bench [--seconds 120] [--lifetime 30s] [--clients 4] [--window 1.0] [--json]

A real ``twistd s2sgw-ca --est`` issues short-lived certificates (``--lifetime``); two gateways
(``callers-gw`` with an outbound route, ``users-gw`` with an inbound one, status mode ``ocsp``)
start from tokens (``s2sgw enroll``) and renew on their own at two thirds of the lifetime. Client
threads send small HTTP requests back to back through the pair: ``--clients`` on keep-alive
connections (each recycled after 5 s, shorter than a certificate's remaining life) and one on a new
connection per request. The moment of each renewal (when its reload put the new certificate in
force) is read from the gateways' ``/status`` every 0.2 s. Requests that started within
``--window`` seconds of a renewal count as "during renewal", the others as "steady"; the table
compares their latency percentiles. A renewal's own work (key generation in a thread, the EST
request, the file writes, the reload in a thread) lies in the second before that moment.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.enroll.client import display_fingerprint
from s2sgw.wire import est

BIN = Path(sys.executable).parent
ANSWER = b'{"id": 1, "name": "John Doe"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


class Backend(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # One write: head and body in separate segments would meet Nagle and delayed ACKs.
                close = self.headers.get("Connection", "").lower() == "close"
                self.close_connection = close
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(ANSWER), b"Connection: close\r\n" if close else b"", ANSWER)
                )

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def load(port: int, keep_alive: bool, stop: threading.Event, samples: list, failures: list) -> None:
    """Requests back to back; each sample is (start wall time, seconds, keep_alive)."""
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        opened, first = time.monotonic(), True
        try:
            while first or (keep_alive and not stop.is_set() and time.monotonic() - opened < 5.0):
                first = False
                started, t0 = time.time(), time.perf_counter()
                connection.request("GET", "/api/users/1", headers={} if keep_alive else {"Connection": "close"})
                response = connection.getresponse()
                body = response.read()
                samples.append((started, time.perf_counter() - t0, keep_alive))
                if response.status != 200 or body != ANSWER:
                    failures.append(f"HTTP {response.status}")
        except Exception as error:  # a failed call counts; the bench goes on
            failures.append(f"{type(error).__name__}: {error}")
        finally:
            connection.close()


def renewal_moments(admin_ports: Sequence[int], stop: threading.Event, moments: set) -> None:
    """Collect (service, last_renewal) from each gateway's /status until ``stop``."""
    while not stop.is_set():
        for port in admin_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as answer:
                    document = json.load(answer)
            except Exception:
                continue
            for name, service in document.get("services", {}).items():
                stamp = (service.get("renewal") or {}).get("last_renewal")
                if stamp:
                    moments.add((name, datetime.datetime.fromisoformat(stamp).timestamp()))
        stop.wait(0.2)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"count": len(values), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000}


def gateway_toml(work: Path, name: str, routes: str, ports: dict[str, int], admin: int, fingerprint: str) -> str:
    out = work / name
    return (
        f'trust = "{out / "bundle.pem"}"\n'
        f'[status]\nmode = "ocsp"\nurl = "http://127.0.0.1:{ports["status"]}/ocsp"\n'
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        f'[enrollment]\nurl = "https://127.0.0.1:{ports["est"]}"\nfingerprint = "{fingerprint}"\n'
        f'[[service]]\nname = "{name}"\ncert = "{out / (name + ".pem")}"\nkey = "{out / (name + ".key")}"\n' + routes
    )


def run(args: argparse.Namespace, work: Path) -> dict:
    ports = {name: free_port() for name in ("status", "est", "users_gw", "orders", "admin_users", "admin_orders")}
    backend = Backend()
    CertificateAuthority.init(work / "ca", "bench.s2sgw.test", url=f"http://127.0.0.1:{ports['status']}")
    fingerprint = display_fingerprint(est.fingerprint(CertificateAuthority.open(work / "ca").root_cert))
    processes: list[subprocess.Popen] = []

    def twistd(name: str, *plugin: str) -> None:
        log = work / f"{name}.log"
        processes.append(subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}", *plugin],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        ))  # fmt: skip

    try:
        twistd("ca", "s2sgw-ca", "--dir", str(work / "ca"), "--listen", f"tcp:{ports['status']}:interface=127.0.0.1",
               "--est", f"tcp:{ports['est']}:interface=127.0.0.1", "--est-lifetime", args.lifetime)
        wait_port(ports["est"])
        for name in ("users", "orders"):
            token = subprocess.run([str(BIN / "s2sgw"), "ca", "token", "--dir", str(work / "ca"), name],
                                   capture_output=True, text=True, check=True).stdout.strip()
            subprocess.run([str(BIN / "s2sgw"), "enroll", "--ca", f"https://127.0.0.1:{ports['est']}", "--fingerprint",
                            fingerprint, "--token", token, "--name", name, "--out", str(work / name)],
                           capture_output=True, check=True)
        inbound = (f'[[service.inbound]]\nlisten = "tcp:{ports["users_gw"]}:interface=127.0.0.1"\n'
                   f'backend = "tcp:127.0.0.1:{backend.port}"\nallow = ["orders"]\n')
        outbound = (f'[[service.outbound]]\nlisten = "tcp:{ports["orders"]}:interface=127.0.0.1"\n'
                    f'remote = "tcp:127.0.0.1:{ports["users_gw"]}"\npeer = "users"\n')
        (work / "users-gw.toml").write_text(gateway_toml(work, "users", inbound, ports, ports["admin_users"], fingerprint))
        (work / "callers-gw.toml").write_text(gateway_toml(work, "orders", outbound, ports, ports["admin_orders"], fingerprint))
        twistd("users-gw", "s2sgw", "--config", str(work / "users-gw.toml"))
        twistd("callers-gw", "s2sgw", "--config", str(work / "callers-gw.toml"))
        wait_port(ports["orders"])
        wait_port(ports["users_gw"])

        stop = threading.Event()
        samples: list = []
        failures: list = []
        moments: set = set()
        threads = [threading.Thread(target=load, args=(ports["orders"], True, stop, samples, failures))
                   for _ in range(args.clients)]
        threads.append(threading.Thread(target=load, args=(ports["orders"], False, stop, samples, failures)))
        threads.append(threading.Thread(target=renewal_moments,
                                        args=((ports["admin_users"], ports["admin_orders"]), stop, moments)))
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        backend.shutdown()

    stamps = sorted(stamp for _, stamp in moments)
    begin = min((s for s, _, _ in samples), default=0.0)
    samples = [s for s in samples if s[0] > begin + 2.0]  # skip the first connections' status queries
    result: dict = {"renewals": len(stamps), "failed_calls": len(failures), "failures": failures[:5]}
    for kind, keep_alive in (("keep-alive", True), ("new connection", False)):
        during = [d for start, d, k in samples if k == keep_alive and any(abs(start - t) <= args.window for t in stamps)]
        steady = [d for start, d, k in samples if k == keep_alive and all(abs(start - t) > args.window for t in stamps)]
        result[kind] = {"steady": percentiles(steady), "during renewal": percentiles(during)}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured seconds")
    parser.add_argument("--lifetime", default="30s", help="certificate lifetime (renewal at two thirds)")
    parser.add_argument("--clients", type=int, default=4, help="keep-alive client threads")
    parser.add_argument("--window", type=float, default=1.0, help="seconds either side of a renewal")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="s2sgw-renewal-bench-"))
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"renewal under load: {args.seconds:g} s, {args.lifetime} certificates, {result['renewals']} renewals "
        f"(both gateways), {args.clients} keep-alive clients + 1 on new connections, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, failed calls {result['failed_calls']}"
    )
    print(f"{'requests':<16}{'window':<16}{'count':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for kind in ("keep-alive", "new connection"):
        for window in ("steady", "during renewal"):
            figures = result[kind][window]
            if figures["count"]:
                print(f"{kind:<16}{window:<16}{figures['count']:>8}{figures['p50_ms']:>9.2f}"
                      f"{figures['p99_ms']:>9.2f}{figures['max_ms']:>9.2f}")
    print(f"'during renewal': requests started within {args.window:g} s of a renewal's reload")
    if args.json:
        print(json.dumps(result))
    return 0 if not result["failed_calls"] else 1


if __name__ == "__main__":
    sys.exit(main())
