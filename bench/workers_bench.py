"""Per-event cost and worker processes, measured side by side in one run.

    python -m bench.workers_bench [--only requests,handshakes] [--runs 3] [--seconds 5] [--profile] [--json]

requests
    ``wrk -t1 -c10`` through three pairs started together, taking turns: s2sgw under twistd's
    stock ``--reactor=epoll`` (every socket event wrapped in Twisted's logging context), s2sgw
    under its own reactor (:mod:`s2sgw.reactor`, the default) and stunnel. Requests per second,
    p99 and the pair's CPU per request. ``--profile`` also samples both inbound gateways with
    py-spy under the same load and prints where the samples fall.
handshakes
    New mTLS connections per second (TLS 1.3, full handshake with the client certificate, ``GET
    /small``) against one inbound gateway with ``workers = 1`` and one with ``workers = 2``, from
    the same closed-loop client processes; the gateway's CPU (all its processes) per connection
    and the client processes' CPU in cores beside it, and how many of the machine's cores were
    busy in all: when one worker already keeps every core busy (the client's handshakes cost
    about as much CPU as the gateway's), a second worker has nothing to run on, and the figure
    says more about the machine than about the gateway.

Every figure records the load average before and after it: other work on the machine moves
absolute figures and ratios alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import load
from bench.procs import BenchError, Fleet, raise_nofile
from bench.proxies import Lab

PARTS = ("requests", "handshakes")
# Where py-spy samples fall, by the innermost Python frame: label -> a substring of that frame
# ("function (file:line)"); the first that matches wins. "idle" is filled in by poll_lines().
LEAF_MARKERS = {
    "socket send/recv (the system calls)": ("untilConcludes (twisted/python/util.py", "doRead (twisted/internet/tcp.py"),
    "Twisted's logging context": ("twisted/python/log.py", "twisted/python/context.py"),
    "TLS layer (twisted.protocols.tls)": ("twisted/protocols/tls.py",),
    "pyOpenSSL wrappers and cffi": ("OpenSSL/", "cffi"),
    "reactor and TCP transport": ("twisted/internet/",),
    "s2sgw relay and transports": ("s2sgw/",),
}


def say(text: str) -> None:
    print(text, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def poll_lines() -> tuple[str, ...]:
    """Frames that mean "waiting in epoll_wait": the poll line of each reactor's ``doPoll``."""
    import twisted.internet.epollreactor as stock

    import s2sgw.reactor as ours

    frames = []
    for module, name in ((stock, "twisted/internet/epollreactor.py"), (ours, "s2sgw/reactor.py")):
        for number, line in enumerate(Path(module.__file__).read_text().splitlines(), 1):
            if "self._poller.poll(" in line:
                frames.append(f"doPoll ({name}:{number})")
    return tuple(frames)


def profile(pid: int, seconds: float, out: Path) -> dict[str, float]:
    """py-spy raw (collapsed) samples of ``pid``, idle included; each label's share of all samples
    and of the busy ones (all but idle)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run(
        [spy, "record", "--nonblocking", "--idle", "-r", "200", "-d", str(max(1, round(seconds))), "-f", "raw",
         "-o", str(out), "--pid", str(pid)],
        capture_output=True, timeout=seconds + 60, check=True,
    )  # fmt: skip
    markers = {"idle (epoll_wait)": poll_lines(), **LEAF_MARKERS}
    total = 0
    counts = dict.fromkeys([*markers, "other"], 0)
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        leaf = stack.rsplit(";", 1)[-1]
        label = next((label for label, found in markers.items() if any(marker in leaf for marker in found)), "other")
        counts[label] += int(count)
    busy = total - counts["idle (epoll_wait)"]
    shares = {label: round(100 * count / total, 1) if total else 0.0 for label, count in counts.items()}
    shares.update(
        {f"{label}, % of busy": round(100 * count / busy, 1) for label, count in counts.items() if busy and "idle" not in label}
    )
    return shares


def requests(lab: Lab, args: argparse.Namespace) -> dict:
    variants = {"s2sgw-epoll": lab.start_s2sgw_variant("s2sgw-epoll", "epoll"), "s2sgw": lab.start_pair("s2sgw")}
    variants["stunnel"] = lab.start_pair("stunnel")
    pids = {name: [pid for proc in pair.processes for pid in lab.fleet.pids(proc)] for name, pair in variants.items()}
    for pair in variants.values():
        load.wrk(pair.http, 1, [])  # warm-up
    results: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for run in range(args.runs):
        order = names[run % len(names):] + names[: run % len(names)]
        for name in order:
            lab.fleet.check()
            figures = load.wrk(variants[name].http, args.seconds, pids[name])
            figures["loadavg"] = loadavg()
            results[name].append(figures)
            say(f"  requests run {run + 1}/{args.runs} {name}: {figures['rps']:.0f}/s, "
                f"p99 {figures['p99_ms']:.2f} ms, {figures['cpu_us_per_request']:.1f} us/request, "
                f"load {figures['loadavg'][0]}")  # fmt: skip
    summary: dict = {"runs": results, "median": {}}
    for name, runs in results.items():
        summary["median"][name] = {
            key: statistics.median(run[key] for run in runs) for key in ("rps", "p99_ms", "cpu_us_per_request")
        }
    if args.profile:
        summary["profile"] = {}
        for name in ("s2sgw-epoll", "s2sgw"):
            inbound = lab.fleet.running[variants[name].processes[-1]].pid
            with subprocess.Popen(
                ["wrk", "-t1", "-c10", f"-d{round(args.seconds) + 4}s", f"http://127.0.0.1:{variants[name].http}/small"],
                stdout=subprocess.DEVNULL,
            ) as wrk:
                time.sleep(1)
                shares = profile(inbound, args.seconds, lab.work / f"profile-{name}.txt")
                wrk.wait(timeout=60)
            summary["profile"][name] = shares
            say(f"  profile {name} (inbound gateway, % of samples): {shares}")
    return summary


def handshakes(lab: Lab, args: argparse.Namespace) -> dict:
    ports = {f"workers={n}": (lab.start_s2sgw_inbound(f"s2sgw-w{n}", n), f"s2sgw-w{n}") for n in (1, 2)}
    pki = lab.pki
    identity = (str(pki.cert("client")), str(pki.key("client")), str(pki.bundle))
    for port, _ in ports.values():
        load.connections(port, "1.3", identity, 0.5, [], clients=1, warmup=0)
    results: dict[str, list[dict]] = {name: [] for name in ports}
    names = list(ports)
    for run in range(args.runs):
        order = names[run % len(names):] + names[: run % len(names)]
        for name in order:
            lab.fleet.check()
            port, process = ports[name]
            figures = load.connections(port, "1.3", identity, args.seconds, lab.fleet.pids(process), clients=args.clients)
            figures["loadavg"] = loadavg()
            results[name].append(figures)
            say(f"  handshakes run {run + 1}/{args.runs} {name}: {figures['per_s']:.0f}/s, "
                f"{figures['cpu_us_per_connection']:.0f} us/conn, client CPU {figures['client_cpu_cores']:.2f} cores, "
                f"machine busy {figures['machine_busy_cores']:.2f} of {os.cpu_count()} cores, "
                f"load {figures['loadavg'][0]}")  # fmt: skip
    summary: dict = {"runs": results, "median": {}}
    for name, runs in results.items():
        summary["median"][name] = {
            key: statistics.median(run[key] for run in runs)
            for key in ("per_s", "cpu_us_per_connection", "client_cpu_cores", "machine_busy_cores", "p50_ms")
        }
    one, two = summary["median"]["workers=1"]["per_s"], summary["median"]["workers=2"]["per_s"]
    summary["speedup"] = round(two / one, 2) if one else None
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.workers_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to measure, of: {', '.join(PARTS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2, help="handshake client processes")
    parser.add_argument("--profile", action="store_true", help="py-spy both s2sgw inbound gateways (requests part)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    for part in args.parts:
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r} (expected: {', '.join(PARTS)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="s2sgw-workers-bench-"))
    fleet = Fleet(work)
    result: dict = {"cpus": os.cpu_count(), "loadavg_start": loadavg(), "uptime": _uptime()}
    say(f"load before: {result['uptime']}")
    try:
        lab = Lab.create(fleet, work)
        lab.start_backends()
        for part in args.parts:
            say(f"{part}:")
            result[part] = {"loadavg_before": loadavg(), **globals()[part](lab, args), "loadavg_after": loadavg()}
    except BenchError as error:
        say(f"bench failed: {error}")
        return 1
    finally:
        fleet.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_end"] = loadavg()
    result["uptime_end"] = _uptime()
    say(f"load after: {result['uptime_end']}")
    for part in args.parts:
        say(f"{part} medians: {json.dumps(result[part]['median'])}")
    if "handshakes" in result:
        say(f"workers=2 / workers=1: {result['handshakes']['speedup']}x")
    if args.json:
        print(json.dumps(result))
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
