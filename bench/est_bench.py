"""Certificates issued per second over EST by `twistd s2sgw-ca --est`, and the CA's CPU per certificate.

    python -m bench.est_bench [--seconds 3] [--clients 4] [--rounds 1] [--where disk,tmpfs] [--json]

Client processes keep one HTTPS connection each (keep-alive, TLS 1.3) and send one request after
the other, each with a P-256 CSR made beforehand (key generation is the client's cost, not the
CA's):

* renewal: ``simplereenroll``, authorized by the client's certificate (one identity per client);
* token:   ``simpleenroll``, a fresh one-time token per request (made before the run).

Every certificate is signed, recorded in ``ca.db`` and answered only after its transaction is on
disk (SQLite ``synchronous=FULL``), so the figure depends on the disk's fsync time. ``--where``
runs the same scenarios with the CA directory on the test machine's disk and on tmpfs
(``/dev/shm``, where fsync costs nothing): the difference is the price of durability. Server CPU
per certificate comes from /proc (every thread of the twistd process).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.ocsp_bench import _cpu_seconds, _read_response, _wait
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.tokens import TokenBook
from s2sgw.wire import est as wire

BIN = Path(sys.executable).parent
PATH = "/.well-known/est/"


# -- load generation (runs in client processes) -----------------------------------------


def _post(operation: str, body: bytes, authorization: str | None) -> bytes:
    head = (
        f"POST {PATH}{operation} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if authorization:
        head += f"Authorization: Basic {authorization}\r\n"
    return head.encode("ascii") + b"\r\n" + body


def client(
    port: int, cafile: str, identity: tuple[str, str] | None, operation: str, body: bytes,
    tokens: list[str], name: str, warmup: float, seconds: float,
) -> dict:  # fmt: skip
    """Send requests back to back on one TLS connection for ``seconds`` after ``warmup``."""
    context = ssl.create_default_context(cafile=cafile)
    if identity is not None:
        context.load_cert_chain(*identity)
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    count = errors = 0
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds
    used = 0
    while (now := time.monotonic()) < stop:
        authorization = None
        if tokens:
            if used >= len(tokens):
                break
            authorization = base64.b64encode(f"{name}:{tokens[used]}".encode()).decode()
            used += 1
        sock.sendall(_post(operation, body, authorization))
        answer, open_ = _read_response(sock, buffer)
        done = time.monotonic()
        try:
            ok = len(wire.decode_certs_only(answer)) == 2
        except wire.WireFormatError:
            ok = False
        if now >= measure_from:
            count += ok
            errors += not ok
            latencies.append(done - now)
        if not open_:
            break
    sock.close()
    latencies.sort()
    return {"count": count, "errors": errors, "latencies": latencies[:: max(1, len(latencies) // 2000)]}


# -- the server -------------------------------------------------------------------------


def start_ca(ca_dir: Path, work: Path) -> tuple[subprocess.Popen, int]:
    log = work / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "s2sgw-ca", "--dir", str(ca_dir),
             "--listen", "tcp:0:interface=127.0.0.1", "--est", "tcp:0:interface=127.0.0.1",
             "--est-rate-limit", "0"],
            stdout=out, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip

    def port() -> int | None:
        found = re.search(r"EST listening on port (\d+)", log.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    return process, _wait(port, "twistd s2sgw-ca --est", process, log)


def _csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    return wire.encode_csr(x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()))


def run_scenario(pool, port: int, cafile: str, jobs: list[tuple], warmup: float, seconds: float, pid: int) -> dict:
    time.sleep(0.2)
    futures = [pool.submit(client, port, cafile, *job, warmup, seconds) for job in jobs]
    time.sleep(warmup)
    cpu_before, wall_before = _cpu_seconds(pid), time.monotonic()
    results = [future.result(timeout=warmup + seconds + 120) for future in futures]
    cpu, wall = _cpu_seconds(pid) - cpu_before, time.monotonic() - wall_before
    count = sum(r["count"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    return {
        "per_s": count / seconds,
        "errors": sum(r["errors"] for r in results),
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "cpu_us_per_certificate": 1e6 * cpu / count if count else None,
        "server_cpu_share": cpu / wall if wall else None,
    }


def measure(where: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    base = "/dev/shm" if where == "tmpfs" else None
    work = Path(tempfile.mkdtemp(prefix="est-bench-", dir=base))
    figures: dict[str, list[dict]] = {}
    try:
        ca = CertificateAuthority.init(work / "ca", "bench.test")
        names = [f"svc-{i}" for i in range(args.clients)]
        for name in names:
            ca.write_identity(ca.issue(name), work / "ids")
        cafile = str(ca.directory / "bundle.pem")
        bodies = {name: _csr(name) for name in names}
        book, now = TokenBook(ca.store), datetime.datetime.now(datetime.timezone.utc)
        process, port = start_ca(ca.directory, work)
        try:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=context) as pool:
                for _ in range(args.rounds):
                    renewal = [
                        ((str(work / "ids" / f"{n}.pem"), str(work / "ids" / f"{n}.key")), "simplereenroll",
                         bodies[n], [], n)
                        for n in names
                    ]  # fmt: skip
                    figures.setdefault("renewal", []).append(
                        run_scenario(pool, port, cafile, renewal, args.warmup, args.seconds, process.pid)
                    )
                    # Tokens for 1.5 times the renewal rate just measured: made one by one, each costs an fsync.
                    per_client = int(1.5 * figures["renewal"][-1]["per_s"] * (args.warmup + args.seconds) / args.clients) + 10
                    tokens = {n: [book.create(n, now=now, ttl=datetime.timedelta(hours=1)) for _ in range(per_client)]
                              for n in names}  # fmt: skip
                    enroll = [(None, "simpleenroll", bodies[n], tokens[n], n) for n in names]
                    figures.setdefault("token", []).append(
                        run_scenario(pool, port, cafile, enroll, args.warmup, args.seconds, process.pid)
                    )
        finally:
            process.terminate()
            process.wait(timeout=10)
        figures["issued"] = [{"certificates": len(ca.records())}]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=4, help="client processes (one keep-alive connection each)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--where", default="disk,tmpfs", help="where the CA directory lives: disk, tmpfs or both")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    places = [p.strip() for p in args.where.split(",") if p.strip()]
    results = {place: measure(place, args) for place in places}

    def median(runs: list[dict], key: str) -> float:
        values = [run[key] for run in runs if run.get(key) is not None]
        return statistics.median(values) if values else 0.0

    print(
        f"EST issuance, {args.clients} client processes (keep-alive TLS), ecdsa-p256 CA, "
        f"{args.seconds:g} s x {args.rounds} round(s), {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    )
    print(f"{'scenario':<18}{'certs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/cert':>13}{'CA CPU':>8}{'errors':>8}")
    for place, figures in results.items():
        for scenario in ("renewal", "token"):
            runs = figures[scenario]
            print(
                f"{scenario + ' ' + place:<18}{median(runs, 'per_s'):>9.0f}{median(runs, 'p50_ms'):>9.2f}"
                f"{median(runs, 'p99_ms'):>9.2f}{median(runs, 'cpu_us_per_certificate'):>13.0f}"
                f"{100 * median(runs, 'server_cpu_share'):>7.0f}%{sum(r['errors'] for r in runs):>8}"
            )
    print("CA CPU: share of one core the twistd process used; certs/s at 100% = 1e6 / (CPU us/cert)")
    if args.json:
        print(json.dumps({"figures": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
