"""What each route identity mode costs against ``none``: small keep-alive requests through a gateway pair.

    python -m bench.identity_bench [--seconds 5] [--rounds 2] [--connections 10]

One callers gateway (service orders, one outbound route per mode) and one users gateway (one
inbound route per mode) on loopback, status checks off, nginx as the backend (a plain listener,
and a ``proxy_protocol`` one for ``proxy-v2``), wrk with keep-alive connections. The modes are
alternated round by round so drift hits them all alike; figures are medians over rounds. CPU per
request is both gateways' user+system time divided by the requests served.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.load import wrk
from bench.procs import Fleet, free_port, raise_nofile, wait_port
from s2sgw.ca.authority import CertificateAuthority

MODES = ("none", "proxy-v2", "http-headers", "jwt")
DOMAIN = "bench.s2sgw.test"


def _nginx_conf(root: Path, plain: int, proxied: int) -> Path:
    conf = root / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            daemon off;
            master_process off;
            pid {root}/nginx.pid;
            error_log {root}/nginx-error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                keepalive_requests 1000000;
                client_body_temp_path {root}/nginx-tmp;
                server {{
                    listen 127.0.0.1:{plain};
                    listen 127.0.0.1:{proxied} proxy_protocol;
                    location / {{ return 200 "ok"; }}
                }}
            }}
            """
        )
    )
    (root / "nginx-tmp").mkdir(exist_ok=True)
    return conf


def _gateway_configs(root: Path, ca: CertificateAuthority, ports: dict[str, int]) -> tuple[Path, Path]:
    certs = root / "certs"
    for name in ("users", "orders"):
        ca.write_identity(ca.issue(name), certs)
    head = f'trust = "{root / "ca" / "bundle.pem"}"\n[status]\nmode = "off"\n[timeouts]\nidle = 600\n'

    def service(name: str) -> str:
        return f'[[service]]\nname = "{name}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n'

    users, orders = head + service("users"), head + service("orders")
    for mode in MODES:
        backend = ports["nginx_proxied"] if mode == "proxy-v2" else ports["nginx_plain"]
        users += (
            f'[[service.inbound]]\nname = "in-{mode}"\nlisten = "tcp:{ports["in-" + mode]}:interface=127.0.0.1"\n'
            f'backend = "tcp:127.0.0.1:{backend}"\nallow = ["orders"]\nidentity = "{mode}"\n'
        )
        orders += (
            f'[[service.outbound]]\nname = "out-{mode}"\nlisten = "tcp:{ports["out-" + mode]}:interface=127.0.0.1"\n'
            f'remote = "tcp:127.0.0.1:{ports["in-" + mode]}"\npeer = "users"\n'
            + ('identity = "jwt"\n' if mode == "jwt" else "")
        )
    (root / "users.toml").write_text(users)
    (root / "orders.toml").write_text(orders)
    return root / "users.toml", root / "orders.toml"


def run(seconds: float, rounds: int, connections: int) -> dict[str, dict[str, float]]:
    raise_nofile()
    twistd = str(Path(sys.executable).parent / "twistd")
    with tempfile.TemporaryDirectory(prefix="identity-bench-") as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.init(root / "ca", DOMAIN)
        ports = {"nginx_plain": free_port(), "nginx_proxied": free_port()}
        ports.update({f"{side}-{mode}": free_port() for side in ("in", "out") for mode in MODES})
        users_toml, orders_toml = _gateway_configs(root, ca, ports)
        fleet = Fleet(root)
        try:
            fleet.start("nginx", ["nginx", "-p", str(root), "-c", str(_nginx_conf(root, ports["nginx_plain"], ports["nginx_proxied"]))])
            for name, config in (("users-gw", users_toml), ("orders-gw", orders_toml)):
                fleet.start(name, [twistd, "--nodaemon", "--pidfile=", f"--logfile={root / (name + '.log')}", "s2sgw", "--config", str(config)])
            for port in ports.values():
                wait_port(port)
            pids = fleet.pids("users-gw") + fleet.pids("orders-gw")
            samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for mode in MODES:  # warm-up
                wrk(ports["out-" + mode], 1, pids, connections)
            for _ in range(rounds):
                for mode in MODES:
                    samples[mode].append(wrk(ports["out-" + mode], seconds, pids, connections))
                    fleet.check()
        finally:
            fleet.stop_all()
    return {
        mode: {key: statistics.median(s[key] for s in runs) for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
        for mode, runs in samples.items()
    }


def table(figures: dict[str, dict[str, float]]) -> str:
    base = figures["none"]
    lines = [
        f"{'mode':<14}{'req/s':>10}{'vs none':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'+us/req':>9}",
    ]
    for mode, f in figures.items():
        lines.append(
            f"{mode:<14}{f['rps']:>10.0f}{f['rps'] / base['rps']:>9.2f}{f['p50_ms']:>9.2f}{f['p99_ms']:>9.2f}"
            f"{f['cpu_us_per_request']:>12.1f}{f['cpu_us_per_request'] - base['cpu_us_per_request']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=10)
    options = parser.parse_args(argv)
    print(table(run(options.seconds, options.rounds, options.connections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
