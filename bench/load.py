"""Load generators and their parsers: iperf3, wrk, a certificate-presenting handshake client, idle sockets.

The handshake client is plain Python (``ssl`` module, OpenSSL underneath) in a few forked
processes, the same for every proxy: it presents the bench client certificate, checks the
server's chain and name, sends one small HTTP request and reads the answer before closing, so a
connection only counts once the proxy has authorized it and reached the backend.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import re
import socket
import ssl
import subprocess
import time

from bench.procs import BenchError, cpu_seconds, established, machine_busy_seconds, raise_nofile, rss_kib

REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
TLS_VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}


# -- 1: bulk throughput -------------------------------------------------------------------------


def iperf(port: int, seconds: float, pids: list[int]) -> dict:
    """One TCP stream through ``port`` for ``seconds`` (after one omitted second); Gbit/s and pair CPU."""
    before = cpu_seconds(pids)
    result = subprocess.run(
        ["iperf3", "--client", "127.0.0.1", "--port", str(port), "--time", str(max(1, round(seconds))),
         "--omit", "1", "--json"],
        capture_output=True, timeout=seconds + 40,
    )  # fmt: skip
    cpu = cpu_seconds(pids) - before
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise BenchError(f"iperf3 gave no JSON: {result.stderr.decode(errors='replace')[-500:]}") from None
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    gbit = received["bits_per_second"] / 1e9
    gigabytes = received["bytes"] / 1e9
    return {"gbit_s": gbit, "cpu_s_per_gb": cpu / gigabytes if pids and gigabytes else None}


# -- 3: small requests ---------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not found:
        raise BenchError(f"unreadable wrk latency {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> dict:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"unreadable wrk output:\n{output}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "requests": int(total.group(1)),
        "errors": (int(bad.group(1)) if bad else 0) + (sum(int(n) for n in errors.groups()) if errors else 0),
    }


def wrk(port: int, seconds: float, pids: list[int], connections: int = 10) -> dict:
    """wrk with one thread and ``connections`` keep-alive connections; req/s, p50/p99 and pair CPU per request."""
    before = cpu_seconds(pids)
    result = subprocess.run(
        ["wrk", "--threads", "1", "--connections", str(connections), "--duration", f"{max(1, round(seconds))}s",
         "--timeout", "5s", "--latency", f"http://127.0.0.1:{port}/small"],
        capture_output=True, text=True, timeout=seconds + 40,
    )  # fmt: skip
    cpu = cpu_seconds(pids) - before
    figures = parse_wrk(result.stdout)
    if figures["errors"]:
        raise BenchError(f"wrk through port {port}: {figures['errors']} errors\n{result.stdout}")
    figures["cpu_us_per_request"] = 1e6 * cpu / figures["requests"] if pids and figures["requests"] else None
    return figures


# -- 2: new connections with a client certificate ---------------------------------------------------


def _read_answer(sock, buffer: bytearray) -> None:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer")
        buffer += chunk
    head, _, body = bytes(buffer).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"answer {head[:40]!r}")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-answer")
        body += chunk


def _connect_worker(port: int, version: str | None, identity: tuple[str, str, str] | None, warmup: float, seconds: float) -> dict:
    context = None
    if version is not None and identity is not None:
        cert, key, bundle = identity
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(bundle)
        context.minimum_version = context.maximum_version = TLS_VERSIONS[version]
    count = errors = 0
    latencies: list[float] = []
    last_error = ""
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds
    cpu_from = None  # this client's own CPU over the measured window
    while (now := time.monotonic()) < stop:
        if cpu_from is None and now >= measure_from:
            cpu_from = time.process_time()
        sock = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname="server")  # a full handshake: no session reuse
            sock.sendall(REQUEST)
            _read_answer(sock, bytearray())
            if now >= measure_from:
                count += 1
                latencies.append(time.monotonic() - now)
        except (OSError, ValueError) as error:
            errors += 1
            last_error = repr(error)
            time.sleep(0.01)
        finally:
            if sock is not None:
                sock.close()
    latencies.sort()
    cpu = time.process_time() - cpu_from if cpu_from is not None else 0.0
    sampled = latencies[:: max(1, len(latencies) // 2000)]
    return {"count": count, "errors": errors, "last_error": last_error, "latencies": sampled, "cpu_s": cpu}


def connections(
    port: int,
    version: str | None,
    identity: tuple[str, str, str] | None,
    seconds: float,
    pids: list[int],
    clients: int = 2,
    warmup: float = 0.5,
) -> dict:
    """New connections per second (TLS ``version`` with the client certificate, or plain TCP when None)."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(clients, mp_context=context) as pool:
        futures = [pool.submit(_connect_worker, port, version, identity, warmup, seconds) for _ in range(clients)]
        time.sleep(warmup)
        before, machine_before, started = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
        results = [future.result(timeout=warmup + seconds + 60) for future in futures]
        cpu = cpu_seconds(pids) - before
        machine = (machine_busy_seconds() - machine_before) / (time.monotonic() - started)
    count = sum(result["count"] for result in results)
    errors = sum(result["errors"] for result in results)
    if errors > count * 0.01 or not count:
        detail = next((result["last_error"] for result in results if result["last_error"]), "")
        raise BenchError(f"connections to port {port} (TLS {version}): {errors} errors, {count} done; {detail}")
    latencies = sorted(latency for result in results for latency in result["latencies"])
    return {
        "per_s": count / seconds,
        "errors": errors,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "cpu_us_per_connection": 1e6 * cpu / count if pids else None,
        "client_cpu_cores": sum(result["cpu_s"] for result in results) / seconds,
        "machine_busy_cores": machine,  # everything on the machine: proxy, clients, backend, the rest
    }


# -- 4: idle connections ----------------------------------------------------------------------------


def idle(port: int, count: int, backend_port: int, pids: list[int], timeout: float = 180.0) -> dict:
    """Open ``count`` connections through ``port``, wait until the backend holds them all, measure RSS."""
    limit = raise_nofile()
    if limit < count + 100:
        raise BenchError(f"open-file limit {limit} is below {count} idle connections")
    base_backend = established(backend_port)
    time.sleep(0.3)
    base_rss = rss_kib(pids)
    sockets: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    try:
        while len(sockets) < count:
            # Batches below the smallest listen backlog (Twisted's 50): an overflowing accept queue
            # drops the final ACK, and an idle client never learns that its connection is gone.
            for _ in range(min(40, count - len(sockets))):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sockets.append(sock)
            while established(backend_port) - base_backend < len(sockets):
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"only {established(backend_port) - base_backend} of {len(sockets)} idle connections "
                        f"reached the backend through port {port}"
                    )
                time.sleep(0.05)
        setup = time.monotonic() - started
        time.sleep(1.0)
        held = min(count, established(backend_port) - base_backend)
        rss = rss_kib(pids)
    finally:
        for sock in sockets:
            sock.close()
    _wait_drained(backend_port, base_backend)
    return {
        "connections": held,
        "kib_per_connection": (rss - base_rss) / held if held else None,
        "rss_before_kib": base_rss,
        "rss_after_kib": rss,
        "setup_s": setup,
    }


def _wait_drained(backend_port: int, base: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while established(backend_port) > base and time.monotonic() < deadline:
        time.sleep(0.2)
