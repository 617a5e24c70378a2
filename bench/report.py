"""From raw runs to medians, ratios, target checks, and the tables (terminal text and reStructuredText)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

COLUMNS = ("direct", "s2sgw", "stunnel", "haproxy", "nginx")
TITLES = {"direct": "direct", "s2sgw": "s2sgw", "stunnel": "stunnel", "haproxy": "HAProxy", "nginx": "nginx"}


def median(runs: Sequence[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@attrs.frozen
class Row:
    """One line of the table: a figure, its medians per column, the two ratios and the target."""

    label: str
    values: dict[str, float | None]
    digits: int = 0
    vs_stunnel: float | None = None
    vs_direct: float | None = None
    target: str = ""
    met: bool | None = None


def _row(label: str, figure: dict, key: str, digits: int, target: str = "", check: Callable[[float], bool] | None = None, scale: float = 1.0) -> Row:
    values = {}
    for column in COLUMNS:
        value = median(figure.get(column, ()), key)
        values[column] = value * scale if value is not None else None
    vs_stunnel = ratio(values["s2sgw"], values["stunnel"])
    met = check(vs_stunnel) if check is not None and vs_stunnel is not None else None
    return Row(label, values, digits, vs_stunnel, ratio(values["s2sgw"], values["direct"]), target, met)


def summarize(figures: dict) -> list[Row]:
    rows: list[Row] = []
    if "throughput" in figures:
        f = figures["throughput"]
        rows.append(_row("1. bulk throughput, Gbit/s", f, "gbit_s", 2, ">= 1.0x stunnel", lambda r: r >= 1.0))
        rows.append(_row("   pair CPU, s per GB", f, "cpu_s_per_gb", 2))
    if "handshakes" in figures:
        for version in ("1.3", "1.2"):
            f = figures["handshakes"].get(version)
            if not f:
                continue
            direct = "(plain TCP)" if version == "1.3" else ""
            rows.append(_row(f"2. new mTLS conns/s, TLS {version} {direct}".rstrip(), f, "per_s", 0, ">= 1.0x stunnel", lambda r: r >= 1.0))
            rows.append(_row(f"   inbound CPU, us per conn, TLS {version}", f, "cpu_us_per_connection", 0))
            off = median(f.get("s2sgw", ()), "per_s")
            for mode, target in (("warm", "<= 5% slower than off"), ("cold", "")):
                runs = f.get(f"s2sgw-{mode}")
                if not runs:
                    continue
                value = median(runs, "per_s")
                cost = 1 - value / off if value and off else None
                rows.append(
                    Row(
                        f"   s2sgw status {mode} cache, conns/s, TLS {version}",
                        {"s2sgw": value},
                        0,
                        ratio(value, median(f.get("stunnel", ()), "per_s")),
                        None,
                        f"{target} (is {100 * cost:.1f}%)" if target and cost is not None else (f"{100 * cost:.1f}% slower" if cost is not None else ""),
                        (cost <= 0.05) if target and cost is not None else None,
                    )
                )
    if "requests" in figures:
        f = figures["requests"]
        rows.append(_row("3. small requests, req/s", f, "rps", 0, ">= 0.8x stunnel", lambda r: r >= 0.8))
        rows.append(_row("   p50 latency, ms", f, "p50_ms", 3))
        rows.append(_row("   p99 latency, ms", f, "p99_ms", 3, "<= 1.5x stunnel", lambda r: r <= 1.5))
        rows.append(_row("   pair CPU, us per request", f, "cpu_us_per_request", 1))
    if "idle" in figures:
        f = figures["idle"]
        rows.append(_row("4. idle conns: pair RSS, KiB per conn", f, "kib_per_connection", 1, "<= 1.0x stunnel", lambda r: r <= 1.0))
        rows.append(_row("   idle connections held", f, "connections", 0))
    if "est" in figures:
        rows.extend(summarize_est(figures["est"]))
    if "workers" in figures:
        rows.extend(summarize_workers(figures["workers"]))
    return rows


def summarize_workers(workers: dict) -> list[Row]:
    """bench/workers_bench.py: per-event cost beside stunnel, and one inbound gateway with 2 workers vs 1."""
    rows: list[Row] = []
    requests = workers.get("requests", {}).get("median", {})
    if requests:
        for key, label, digits in (("rps", "7. small requests, req/s", 0), ("cpu_us_per_request", "   pair CPU, us per request", 1)):
            ours, stock, stunnel = (requests.get(n, {}).get(key) for n in ("s2sgw", "s2sgw-epoll", "stunnel"))
            rows.append(Row(f"{label} (s2sgw reactor)", {"s2sgw": ours, "stunnel": stunnel}, digits, ratio(ours, stunnel)))
            rows.append(Row("   same, Twisted's epoll reactor", {"s2sgw": stock, "stunnel": stunnel}, digits, ratio(stock, stunnel)))
    handshakes = workers.get("handshakes", {}).get("median", {})
    if handshakes:
        one, two = handshakes.get("workers=1", {}), handshakes.get("workers=2", {})
        speedup = ratio(two.get("per_s"), one.get("per_s"))
        rows.append(Row(f"8. new mTLS conns/s, 1 worker (client CPU {one.get('client_cpu_cores', 0):.2f} cores)", {"s2sgw": one.get("per_s")}, 0))
        rows.append(
            Row(
                f"   2 workers (client CPU {two.get('client_cpu_cores', 0):.2f} cores)", {"s2sgw": two.get("per_s")}, 0,
                target=f">= 1.5x 1 worker (is {speedup:.2f}x)" if speedup else ">= 1.5x 1 worker",
                met=speedup >= 1.5 if speedup else None,
            )
        )  # fmt: skip
    return rows


def summarize_est(est: dict) -> list[Row]:
    """Certificates per second through simplereenroll and simpleenroll, the CA's CPU per certificate."""
    rows: list[Row] = []
    for place, figures in est.get("figures", {}).items():
        for scenario, label in (("renewal", "simplereenroll"), ("token", "simpleenroll")):
            runs = figures.get(scenario, ())
            per_s, cpu = median(runs, "per_s"), median(runs, "cpu_us_per_certificate")
            one_core = 1e6 / cpu if cpu else None
            rows.append(
                Row(
                    f"6. EST certs/s, {label}, keep-alive, CA on {place}",
                    {"s2sgw": per_s}, 0, None, None,
                    f">= 300/s on one core (its CPU allows {one_core:.0f}/s per core)" if one_core else ">= 300/s on one core",
                    (per_s >= 300 and one_core >= 300) if per_s and one_core else None,
                )
            )  # fmt: skip
            rows.append(Row(f"   CA CPU, us per certificate ({label}, {place})", {"s2sgw": cpu}, 0))
    return rows


@attrs.frozen
class OcspRow:
    label: str
    ours: float | None
    openssl: float | None
    target: str = ""
    met: bool | None = None


def summarize_ocsp(ocsp: dict) -> list[OcspRow]:
    figures = ocsp.get("figures", {})

    def rps(name: str) -> float | None:
        return median(figures.get(name, ()), "rps")

    rows = [
        OcspRow("5. OCSP answers/s, cached, keep-alive", rps("ours cached keep-alive"), rps("openssl cached"), ">= 10x openssl"),
        OcspRow("   cached, new connection each", rps("ours cached new-conn"), rps("openssl cached")),
        OcspRow("   nonce (signed per answer), keep-alive", rps("ours nonce keep-alive"), rps("openssl nonce")),
        OcspRow("   nonce, new connection each", rps("ours nonce new-conn"), rps("openssl nonce")),
    ]
    first = rows[0]
    r = ratio(first.ours, first.openssl)
    rows[0] = attrs.evolve(first, met=(r >= 10) if r is not None else None)
    return rows


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _target(target: str, met: bool | None) -> str:
    verdict = {True: "met", False: "MISSED", None: ""}[met]
    return f"{target}: {verdict}" if target and verdict else target


def table_cells(rows: list[Row], ocsp_rows: list[OcspRow]) -> tuple[list[str], list[list[str]]]:
    header = ["figure (median)", *(TITLES[c] for c in COLUMNS), "s2sgw/stunnel", "s2sgw/direct", "target"]
    body = [
        [row.label, *(_fmt(row.values.get(c), row.digits) for c in COLUMNS), _fmt_ratio(row.vs_stunnel), _fmt_ratio(row.vs_direct), _target(row.target, row.met)]
        for row in rows
    ]
    for row in ocsp_rows:
        body.append(
            [f"{row.label} (s2sgw-ca vs openssl ocsp)", "-", _fmt(row.ours, 0), "-", "-", "-",
             f"{_fmt_ratio(ratio(row.ours, row.openssl))} of openssl's {_fmt(row.openssl, 0)}/s", "-", _target(row.target, row.met)]
        )  # fmt: skip
    return header, body


def text_table(rows: list[Row], ocsp_rows: list[OcspRow]) -> str:
    header, body = table_cells(rows, ocsp_rows)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 or i >= 8 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def rst_table(rows: list[Row], ocsp_rows: list[OcspRow], caption: str) -> str:
    header, body = table_cells(rows, ocsp_rows)
    out = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for line in [header, *body]:
        cells = [cell.strip() or "\\" for cell in line]  # an escaped space keeps an empty cell valid
        out.append(f"   * - {cells[0]}")
        out.extend(f"     - {cell}" for cell in cells[1:])
    return "\n".join(out) + "\n"


# -- the machine ------------------------------------------------------------------------------------


def _first_line(argv: list[str], pattern: str = "") -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = result.stdout + result.stderr
    for line in text.splitlines():
        if not pattern or re.search(pattern, line):
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else "?"


def machine() -> dict:
    """What the figures were measured on: they mean nothing without it."""
    import cryptography
    import OpenSSL
    import twisted

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    from bench.proxies import stunnel_binary

    try:
        stunnel = _first_line([stunnel_binary(), "-version"], r"^stunnel ")
    except Exception:  # noqa: BLE001 - reported as missing
        stunnel = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "openssl": _first_line(["openssl", "version"]),
        "python_ssl": __import__("ssl").OPENSSL_VERSION,
        "stunnel": stunnel,
        "haproxy": _first_line(["haproxy", "-v"], r"version"),
        "nginx": _first_line(["nginx", "-v"], r"version"),
        "wrk": _first_line(["wrk", "-v"], r"wrk"),
        "iperf3": _first_line(["iperf3", "--version"], r"iperf"),
    }


def machine_text(info: dict) -> str:
    return (
        f"{info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, Linux {info['kernel']}; "
        f"Python {info['python']}, Twisted {info['twisted']}, pyOpenSSL {info['pyopenssl']}, "
        f"cryptography {info['cryptography']}, {info['openssl']}; {info['stunnel']}; {info['haproxy']}; "
        f"{info['nginx']}; {info['wrk']}; {info['iperf3']}"
    )
