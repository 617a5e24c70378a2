"""OCSP answers per second: `twistd s2sgw-ca` beside `openssl ocsp -index ... -port`, same queries, same run.

    python bench/ocsp_bench.py [--seconds 3] [--clients 2] [--certs 100] [--rounds 1]

Both responders serve one throwaway CA: ours from its store, OpenSSL from an index.txt written
from the same records, signing with the same delegated OCSP key. Load comes from client
processes sending raw HTTP POSTs over loopback:

* cached: nonce-less queries for the CA's serials (ours answers from pre-signed answers;
  OpenSSL signs every answer);
* nonce:  every query carries a fresh nonce, so both sign every answer.

OpenSSL's responder closes the connection after each answer (HTTP/1.0), so ours is measured
both with keep-alive and with a new connection per query; the ratios to OpenSSL use the
latter (like for like) and the former (what an HTTP/1.1 client gets). Server CPU per answer
comes from /proc. Every scenario checks a sample answer with cryptography before it counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from s2sgw.ca.authority import CertificateAuthority

BIN = Path(sys.executable).parent


# -- load generation (runs in client processes) -----------------------------------------


def _http_post(path: str, body: bytes, keepalive: bool) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if not keepalive:
        head += "Connection: close\r\n"
    return head.encode("ascii") + b"\r\n" + body


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bool]:
    """(body, server keeps the connection open)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).lower()
    del buffer[:end]
    found = re.search(rb"content-length:\s*(\d+)", head)
    closes = head.startswith(b"http/1.0") or b"connection: close" in head
    if found is None:
        while chunk := sock.recv(65536):
            buffer += chunk
        body = bytes(buffer)
        buffer.clear()
        return body, False
    length = int(found.group(1))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return body, not closes


def client(port: int, path: str, bodies: list[bytes], warmup: float, seconds: float, keepalive: bool) -> dict:
    """Send the bodies round-robin for ``seconds`` (after ``warmup``); count answers and latencies."""
    requests = [_http_post(path, body, keepalive) for body in bodies]
    sock: socket.socket | None = None
    buffer = bytearray()
    count = errors = 0
    latencies: list[float] = []
    start = time.monotonic()
    measure_from = start + warmup
    stop = measure_from + seconds
    i = 0
    while True:
        now = time.monotonic()
        if now >= stop:
            break
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer.clear()
            sock.sendall(requests[i % len(requests)])
            i += 1
            _, open_ = _read_response(sock, buffer)
            done = time.monotonic()
            if now >= measure_from:
                count += 1
                latencies.append(done - now)
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
    latencies.sort()
    return {"count": count, "errors": errors, "latencies": latencies[:: max(1, len(latencies) // 2000)]}


# -- the two responders -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _index_line(record) -> str:
    serial = f"{record.serial:X}"
    serial = "0" + serial if len(serial) % 2 else serial
    expires = record.not_after.strftime("%y%m%d%H%M%SZ")
    if record.revoked_at is None:
        return "\t".join(["V", expires, "", serial, "unknown", f"/CN={record.name}"])
    revoked = record.revoked_at.strftime("%y%m%d%H%M%SZ") + (f",{record.reason}" if record.reason else "")
    return "\t".join(["R", expires, revoked, serial, "unknown", f"/CN={record.name}"])


def write_index(ca: CertificateAuthority, path: Path) -> None:
    """OpenSSL's CA database format, from the same records our server answers from."""
    path.write_text("".join(_index_line(record) + "\n" for record in ca.records()))
    path.with_name(path.name + ".attr").write_text("unique_subject = no\n")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks


def _wait(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start:\n{log.read_text(errors='replace')}")


def start_ours(ca_dir: Path, work: Path, validity: int) -> tuple[subprocess.Popen, int]:
    log = work / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "s2sgw-ca", "--dir", str(ca_dir),
             "--listen", "tcp:0:interface=127.0.0.1", "--validity", str(validity)],
            stdout=out, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip

    def port() -> int | None:
        found = re.search(r"StatusSite starting on (\d+)", log.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    number = _wait(port, "twistd s2sgw-ca", process, log)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{number}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    _wait(healthy, "twistd s2sgw-ca health", process, log)
    return process, number


def start_openssl(ca_dir: Path, index: Path, work: Path, validity: int) -> tuple[subprocess.Popen, int]:
    log = work / "openssl-ocsp.log"
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["openssl", "ocsp", "-index", str(index), "-port", str(port),
             "-rsigner", str(ca_dir / "ocsp.pem"), "-rkey", str(ca_dir / "ocsp.key"),
             "-CA", str(ca_dir / "intermediate.pem"), "-nmin", str(max(1, validity // 60))],
            stdout=out, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip

    def accepting() -> bool:
        # Not a test connection: OpenSSL 3.0's responder stalls after a connection that sends nothing.
        return "waiting for OCSP client connections" in log.read_text(errors="replace")

    _wait(accepting, "openssl ocsp", process, log)
    return process, port


# -- requests and checks --------------------------------------------------------------------


def build_requests(ca: CertificateAuthority, certs: list[x509.Certificate], nonces: int) -> tuple[list[bytes], list[bytes]]:
    plain, with_nonce = [], []
    for cert in certs:
        plain.append(
            ocsp.OCSPRequestBuilder()
            .add_certificate(cert, ca.intermediate_cert, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
    for i in range(nonces):
        cert = certs[i % len(certs)]
        with_nonce.append(
            ocsp.OCSPRequestBuilder()
            .add_certificate(cert, ca.intermediate_cert, hashes.SHA1())
            .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
    return plain, with_nonce


def check_answer(port: int, path: str, body: bytes, ca: CertificateAuthority, expected: ocsp.OCSPCertStatus) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_http_post(path, body, keepalive=False))
        der, _ = _read_response(sock, bytearray())
    answer = ocsp.load_der_ocsp_response(der)
    request = ocsp.load_der_ocsp_request(body)
    problems = []
    if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        problems.append(f"status {answer.response_status}")
    elif answer.certificate_status is not expected or answer.serial_number != request.serial_number:
        problems.append(f"answer {answer.certificate_status} for {answer.serial_number:x}")
    else:
        try:
            wanted = request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            wanted = None
        try:
            got = answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            got = None
        if wanted != got:
            problems.append("nonce not echoed")
        ca.ocsp_cert.public_key()  # signer sanity: the included certificate is ours
        if answer.certificates and answer.certificates[0] != ca.ocsp_cert:
            problems.append("signed by another certificate")
    if problems:
        raise SystemExit(f"bad answer from port {port}: {', '.join(problems)}")


# -- the run ------------------------------------------------------------------------------


def run_scenario(
    pool: concurrent.futures.Executor,
    clients: int,
    port: int,
    path: str,
    bodies: list[bytes],
    warmup: float,
    seconds: float,
    keepalive: bool,
    pid: int,
) -> dict:
    shards = [bodies[i::clients] or bodies for i in range(clients)]
    time.sleep(0.2)
    futures = [pool.submit(client, port, path, shard, warmup, seconds, keepalive) for shard in shards]
    time.sleep(warmup)
    cpu_before = _cpu_seconds(pid)
    results = [future.result(timeout=warmup + seconds + 60) for future in futures]
    cpu = _cpu_seconds(pid) - cpu_before
    count = sum(result["count"] for result in results)
    latencies = sorted(latency for result in results for latency in result["latencies"])
    return {
        "rps": count / seconds,
        "errors": sum(result["errors"] for result in results),
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "cpu_us_per_answer": 1e6 * cpu / count if count else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=2, help="client processes (one connection each)")
    parser.add_argument("--certs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--key-type", default="ecdsa-p256")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    validity = 300

    with tempfile.TemporaryDirectory(prefix="ocsp-bench-") as tmp:
        work = Path(tmp)
        ca = CertificateAuthority.init(work / "ca", "bench.test", key_type=args.key_type)
        records = [ca.issue(f"svc-{i}").record for i in range(args.certs)]
        for record in records[:: 10]:
            ca.revoke(serial=record.serial, reason="keyCompromise")
        certs = [record.certificate() for record in records]
        index = work / "index.txt"
        write_index(ca, index)
        plain, with_nonce = build_requests(ca, certs, nonces=4000)

        ours, ours_port = start_ours(ca.directory, work, validity)
        theirs, theirs_port = start_openssl(ca.directory, index, work, validity)
        context = multiprocessing.get_context("fork")
        figures: dict[str, list[dict]] = {}
        try:
            for port, path in ((ours_port, "/ocsp"), (theirs_port, "/")):
                check_answer(port, path, plain[1], ca, ocsp.OCSPCertStatus.GOOD)
                check_answer(port, path, plain[0], ca, ocsp.OCSPCertStatus.REVOKED)
                check_answer(port, path, with_nonce[1], ca, ocsp.OCSPCertStatus.GOOD)
            scenarios = [
                ("ours cached keep-alive", ours_port, "/ocsp", plain, True, ours.pid),
                ("ours cached new-conn", ours_port, "/ocsp", plain, False, ours.pid),
                ("openssl cached", theirs_port, "/", plain, False, theirs.pid),
                ("ours nonce keep-alive", ours_port, "/ocsp", with_nonce, True, ours.pid),
                ("ours nonce new-conn", ours_port, "/ocsp", with_nonce, False, ours.pid),
                ("openssl nonce", theirs_port, "/", with_nonce, False, theirs.pid),
            ]
            with concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=context) as pool:
                for _ in range(args.rounds):
                    for name, port, path, bodies, keepalive, pid in scenarios:
                        figures.setdefault(name, []).append(
                            run_scenario(pool, args.clients, port, path, bodies, args.warmup,
                                         args.seconds, keepalive, pid)  # fmt: skip
                        )
            with urllib.request.urlopen(f"http://127.0.0.1:{ours_port}/healthz", timeout=5) as answer:
                health = json.load(answer)
        finally:
            for process in (ours, theirs):
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)

    def median(name: str, key: str) -> float | None:
        values = [run[key] for run in figures[name] if run[key] is not None]
        return statistics.median(values) if values else None

    print(
        f"OCSP responders, {args.clients} client processes, {args.certs} serials, {args.key_type} signer, "
        f"{args.seconds:g} s x {args.rounds} round(s), {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    )
    print(f"{'scenario':<26}{'answers/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/ans':>12}{'errors':>8}")
    for name in figures:
        cpu = median(name, "cpu_us_per_answer")
        print(
            f"{name:<26}{median(name, 'rps'):>11.0f}{median(name, 'p50_ms') or 0:>9.2f}"
            f"{median(name, 'p99_ms') or 0:>9.2f}{cpu or 0:>12.0f}"
            f"{sum(run['errors'] for run in figures[name]):>8}"
        )
    ratios = {
        "cached, new connection each (like for like)": ("ours cached new-conn", "openssl cached"),
        "cached, keep-alive vs openssl": ("ours cached keep-alive", "openssl cached"),
        "nonce, new connection each (like for like)": ("ours nonce new-conn", "openssl nonce"),
        "nonce, keep-alive vs openssl": ("ours nonce keep-alive", "openssl nonce"),
    }
    print("ratios ours/openssl (answers per second):")
    for label, (a, b) in ratios.items():
        print(f"  {label:<46}{median(a, 'rps') / median(b, 'rps'):>6.2f}x")
    print(f"server signatures made during the run: {health['signatures']}")
    if args.json:
        print(json.dumps({"figures": figures, "health": health}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
