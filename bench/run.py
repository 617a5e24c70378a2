"""``python -m bench``: every benchmark figure for every proxy pair, side by side, in one run.

    python -m bench [--quick] [--only FIGURE[,FIGURE]] [--pairs NAME[,NAME]] [--runs N] [--keep]

Figures: throughput (iperf3, one stream through the pair), handshakes (new mTLS connections per
second against the inbound listener alone, TLS 1.3 and 1.2; s2sgw also with the status check on,
warm and cold cache), requests (wrk, 10 keep-alive connections, ~100-byte answers), idle (RSS per
connection with 10,000 idle connections through the pair; fresh proxy processes per run) and
ocsp (bench/ocsp_bench.py: s2sgw-ca against ``openssl ocsp``) and est (bench/est_bench.py:
certificates issued per second over EST, on disk and on tmpfs). Each figure is measured ``--runs``
times, the pairs alternating in a rotating order, and the median is reported with the ratios
s2sgw/stunnel and s2sgw/direct of the same run. Results: bench/results/RUN.json and RUN.rst,
and latest.json / latest.rst beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import load, report
from bench.procs import BenchError, Fleet, raise_nofile
from bench.proxies import PAIRS, Lab, Pair

FIGURES = ("throughput", "handshakes", "requests", "idle", "ocsp", "est", "workers")
ALONE = ("ocsp", "est", "workers")  # figures with processes of their own, measured after the pairs stop
RESULTS = Path(__file__).resolve().parent / "results"


def _split(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if name not in allowed:
            raise SystemExit(f"unknown {what} {name!r} (expected: {', '.join(allowed)})")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure, for development")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"figures to measure, of: {', '.join(FIGURES)}")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"pairs to measure, of: {', '.join(PAIRS)}")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, quick 2)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (default 8, quick 2)")
    parser.add_argument("--idle", type=int, help="idle connections (default 10000, quick 1000)")
    parser.add_argument("--clients", type=int, default=2, help="handshake client processes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--from-json", metavar="FILE", help="print the tables of a saved run (bench/results/*.json) and exit")
    parser.add_argument("--hold", type=float, default=0, help="keep the pairs running this many seconds after the figures (for profiling)")
    args = parser.parse_args(argv)
    args.figures = _split(args.only, FIGURES, "figure")
    args.pair_names = _split(args.pairs, PAIRS, "pair")
    args.runs = args.runs or (2 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.idle = args.idle or (1000 if args.quick else 10000)
    return args


def say(text: str) -> None:
    print(text, flush=True)


def rotations(names: Sequence[str], runs: int):
    """Run r measures the pairs starting at the r-th: no pair always goes first (or right after another)."""
    for run in range(runs):
        shift = run % len(names)
        yield run, [*names[shift:], *names[:shift]]


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child process."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Bench:
    def __init__(self, args: argparse.Namespace, lab: Lab) -> None:
        self.args = args
        self.lab = lab
        self.figures: dict = {}

    def pids(self, pair: Pair) -> list[int]:
        return [pid for name in pair.processes for pid in self.lab.fleet.pids(name)]

    def each_run(self, figure: str, names: Sequence[str], measure) -> None:
        results = self.figures.setdefault(figure, {})
        for run, order in rotations(names, self.args.runs):
            for name in order:
                self.lab.fleet.check()
                figures = measure(name)
                results.setdefault(name, []).append(figures)
                say(f"  {figure} run {run + 1}/{self.args.runs} {name}: {_brief(figures)}")

    def throughput(self) -> None:
        pairs = self.lab.pairs
        for name in pairs:  # warm-up: first connection through each pair
            load.iperf(pairs[name].iperf, 1, [])
        self.each_run("throughput", list(pairs), lambda n: load.iperf(pairs[n].iperf, self.args.seconds, self.pids(pairs[n])))

    def requests(self) -> None:
        pairs = self.lab.pairs
        for name in pairs:
            load.wrk(pairs[name].http, 1, [])
        self.each_run("requests", list(pairs), lambda n: load.wrk(pairs[n].http, self.args.seconds, self.pids(pairs[n])))

    def handshakes(self) -> None:
        pki = self.lab.pki
        identity = (str(pki.cert("client")), str(pki.key("client")), str(pki.bundle))
        # (variant, port, processes whose CPU counts)
        targets: dict[str, tuple[int, list[str]]] = {}
        for name, pair in self.lab.pairs.items():
            if pair.inbound is None:
                targets[name] = (pair.http, ["backend-http"])  # plain TCP: the floor a proxy adds to
            else:
                targets[name] = (pair.inbound, [pair.processes[-1]])
        for mode, port in self.lab.status_listeners.items():
            targets[f"s2sgw-{mode}"] = (port, [f"s2sgw-in-{mode}"])
        seconds = min(self.args.seconds, 5.0)
        for version in ("1.3", "1.2"):
            results = self.figures.setdefault("handshakes", {}).setdefault(version, {})

            def measure(variant: str) -> dict:
                port, names = targets[variant]
                tls = None if variant == "direct" else version
                pids = [pid for name in names for pid in self.lab.fleet.pids(name)]
                return load.connections(port, tls, identity, seconds, pids, clients=self.args.clients)

            for variant in targets:  # warm-up: lazy imports, caches, the first status answer
                load.connections(targets[variant][0], None if variant == "direct" else version, identity, 0.5, [], clients=1, warmup=0)
            for run, order in rotations(list(targets), self.args.runs):
                for variant in order:
                    self.lab.fleet.check()
                    figures = measure(variant)
                    results.setdefault(variant, []).append(figures)
                    say(f"  handshakes TLS {version} run {run + 1}/{self.args.runs} {variant}: {_brief(figures)}")

    def idle(self) -> None:
        names = [name for name in self.lab.pairs if name != "direct"]
        backend = self.lab.backends.http
        runs = max(1, min(self.args.runs, 2))  # deterministic enough; 10,000 connections take minutes
        results = self.figures.setdefault("idle", {})
        count = min(self.args.idle, self.lab.max_proxied - 100)
        if count < self.args.idle:
            say(f"  open-file limit {self.lab.nofile}: {count} idle connections instead of {self.args.idle}")
        for run, order in rotations(names, runs):
            for name in order:
                pair = self.lab.restart_pair(name)  # fresh processes: no memory left over from earlier figures
                self.lab.fleet.check()
                load.wrk(pair.http, 1, [])  # load what the first connections load, then measure from there
                figures = load.idle(pair.http, count, backend, self.pids(pair))
                results.setdefault(name, []).append(figures)
                say(f"  idle run {run + 1}/{runs} {name}: {_brief(figures)}")

    def ocsp(self) -> None:
        from bench import ocsp_bench

        seconds = 1.0 if self.args.quick else 3.0
        rounds = 1 if self.args.quick else 3
        argv = ["--seconds", str(seconds), "--rounds", str(rounds), "--json"]
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = ocsp_bench.main(argv)
        lines = captured.getvalue().splitlines()
        if code != 0 or not lines:
            raise BenchError(f"ocsp_bench exited with {code}")
        for line in lines[:-1]:
            say(f"  {line}")
        self.figures["ocsp"] = json.loads(lines[-1])

    def est(self) -> None:
        from bench import est_bench

        seconds = 1.0 if self.args.quick else 3.0
        rounds = 1 if self.args.quick else 3
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = est_bench.main(["--seconds", str(seconds), "--rounds", str(rounds), "--json"])
        lines = captured.getvalue().splitlines()
        if code != 0 or not lines:
            raise BenchError(f"est_bench exited with {code}")
        for line in lines[:-1]:
            say(f"  {line}")
        self.figures["est"] = json.loads(lines[-1])

    def workers(self) -> None:
        """bench/workers_bench.py: s2sgw's reactor vs Twisted's beside stunnel; 2 workers vs 1."""
        from bench import workers_bench

        argv = ["--runs", str(self.args.runs), "--seconds", str(min(self.args.seconds, 5.0)), "--json"]
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = workers_bench.main(argv)
        lines = captured.getvalue().splitlines()
        if code != 0 or not lines:
            raise BenchError(f"workers_bench exited with {code}")
        for line in lines[:-1]:
            say(f"  {line}")
        self.figures["workers"] = json.loads(lines[-1])


def _brief(figures: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items() if k not in ("latencies",))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return render_saved(Path(args.from_json))
    raise_nofile()
    started = datetime.datetime.now(datetime.timezone.utc)
    info = report.machine()
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    say(f"machine: {report.machine_text(info)}")
    if info["loadavg_start"][0] > 0.5:
        say(f"warning: load average {info['loadavg_start'][0]} before the run: other work shares the CPUs")
    work = Path(tempfile.mkdtemp(prefix="s2sgw-bench-"))
    fleet = Fleet(work)
    bench: Bench | None = None
    t0 = time.monotonic()
    try:
        with _terminate_as_exit():
            pair_figures = [f for f in args.figures if f not in ALONE]
            if pair_figures:
                lab = Lab.create(fleet, work)
                bench = Bench(args, lab)
                lab.start_backends()
                for name in args.pair_names:
                    lab.start_pair(name)
                if "handshakes" in args.figures and "s2sgw" in args.pair_names:
                    lab.start_ca()
                    for mode in ("warm", "cold"):
                        lab.start_s2sgw_status(mode)
                say(f"started {', '.join(lab.pairs)} in {time.monotonic() - t0:.1f} s; work directory {work}")
                for figure in ("throughput", "handshakes", "requests", "idle"):
                    if figure in args.figures:
                        say(f"{figure}:")
                        getattr(bench, figure)()
                if args.hold:
                    say(f"holding the pairs for {args.hold:g} s: {_describe_ports(lab)}")
                    time.sleep(args.hold)
            fleet.stop_all()
            for figure in ALONE:
                if figure in args.figures:
                    bench = bench or Bench(args, None)  # type: ignore[arg-type]
                    say(f"{figure}:")
                    getattr(bench, figure)()
    except BenchError as error:
        say(f"bench failed: {error}")
        return 1
    except KeyboardInterrupt as interrupt:
        say(f"interrupted ({interrupt}); every process stopped")
        return 130
    finally:
        fleet.stop_all()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    figures = bench.figures if bench else {}
    rows = report.summarize(figures)
    ocsp_rows = report.summarize_ocsp(figures["ocsp"]) if "ocsp" in figures else []
    mode = "quick" if args.quick else "full"
    caption = f"s2sgw benchmark, {mode} run of {started:%Y-%m-%d %H:%M} UTC, medians of {args.runs} runs"
    stamp = f"{started:%Y%m%dT%H%M%SZ}-{mode}"
    RESULTS.mkdir(exist_ok=True)
    document = {
        "started": started.isoformat(),
        "seconds": round(time.monotonic() - t0, 1),
        "mode": mode,
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, tuple, bool))},
        "machine": info,
        "figures": figures,
        "summary": [_row_json(row) for row in rows] + [_row_json(row) for row in ocsp_rows],
    }
    table = report.rst_table(rows, ocsp_rows, caption)
    for name in (stamp, "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
        (RESULTS / f"{name}.rst").write_text(table + f"\nMachine: {report.machine_text(info)}\n")
    say("")
    say(caption)
    say(report.text_table(rows, ocsp_rows))
    say(f"\nwritten: {RESULTS / (stamp + '.json')}, {RESULTS / (stamp + '.rst')} ({document['seconds']:.0f} s)")
    return 0


def render_saved(path: Path) -> int:
    """The terminal and reStructuredText tables of a saved run, from its raw figures."""
    document = json.loads(path.read_text())
    figures = document["figures"]
    rows = report.summarize(figures)
    ocsp_rows = report.summarize_ocsp(figures["ocsp"]) if "ocsp" in figures else []
    started = datetime.datetime.fromisoformat(document["started"])
    caption = f"s2sgw benchmark, {document['mode']} run of {started:%Y-%m-%d %H:%M} UTC, medians of {document['settings']['runs']} runs"
    say(report.text_table(rows, ocsp_rows))
    say("")
    say(report.rst_table(rows, ocsp_rows, caption))
    say(f"Machine: {report.machine_text(document['machine'])}")
    return 0


def _row_json(row) -> dict:
    import attrs

    return attrs.asdict(row)


def _describe_ports(lab: Lab) -> str:
    return "; ".join(f"{name}: http {pair.http}, iperf {pair.iperf}, inbound {pair.inbound}" for name, pair in lab.pairs.items())
