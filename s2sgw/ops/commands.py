"""Gateway command: ``check-config`` (``explain`` has its own module)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from s2sgw import pki
from s2sgw.config import GatewayConfig, load_config
from s2sgw.errors import S2sgwError, listen_problem


def register(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "check-config",
        help="validate a gateway configuration and the files it names, then print a summary",
        description=(
            "Load FILE as `twistd s2sgw --config FILE` would: every key, every endpoint string, "
            "the trust bundle, each service's certificate chain and key (they must match, verify "
            "against the bundle and be valid now) and, in status mode crl, the CRL. Exits 1 with "
            "a one-line error naming the file and key on the first problem."
        ),
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--bind",
        action="store_true",
        help="also open and close every listen address (routes and admin) to find ports in use",
    )
    check.set_defaults(run=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    from s2sgw.material import identity_warnings, load_material

    config = load_config(args.file)
    # A command, not the reactor: the wall clock is the right "now" here.
    material = load_material(config, datetime.datetime.now(datetime.UTC), 1)
    if args.bind:
        problems = bind_problems(config)
        if problems:
            raise S2sgwError("\n".join(problems))
    print(summary(config, material))
    for warning in identity_warnings(material):
        print(f"s2sgw: warning: {warning}", file=sys.stderr)
    return 0


def listens(config: GatewayConfig) -> list[tuple[str, str, str]]:
    """(what, configuration key, endpoint) of every address the gateway would listen on."""
    found = []
    for service in config.services:
        for route in service.inbound:
            found.append((f"route {route.name} of service {service.name}", "[[service.inbound]] listen", route.listen))
        for route in service.outbound:
            found.append((f"route {route.name} of service {service.name}", "[[service.outbound]] listen", route.listen))
    if config.admin is not None:
        found.append(("the admin endpoint", "[admin] listen", config.admin.listen))
    return found


def bind_problems(config: GatewayConfig) -> list[str]:
    """Listen on each TCP address and stop again; one line per address that cannot be had.

    Only ``tcp:`` addresses are tried: systemd hands over ``systemd:`` ones, and trying a
    ``unix:`` one would leave its socket and lock files behind (the reactor does not run here).
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    problems = []
    for what, key, listen in listens(config):
        if listen.split(":", 1)[0].lower() != "tcp":
            continue
        ports: list = []
        failures: list = []
        serverFromString(reactor, listen).listen(Factory()).addCallbacks(ports.append, failures.append)
        for port in ports:
            port.stopListening()
        if failures:
            problems.append(listen_problem(what, key, listen, failures[0].getErrorMessage()))
    return problems


def summary(config: GatewayConfig, material) -> str:
    """Plain lines describing what the gateway would run; no secrets."""
    status = config.status
    if status.mode == "ocsp":
        status_text = f"ocsp {status.url} (fail {status.fail}, timeout {status.timeout:g}s)"
    elif status.mode == "crl":
        status_text = f"crl {status.crl} (number {material.crl_number}, fail {status.fail})"
    else:
        status_text = "off (no revocation checks)"
    lines = [
        f"{config.path}: OK",
        f"trust: {config.trust} ({len(material.roots)} root(s): "
        + ", ".join(root.subject.rfc4514_string() for root in material.roots)
        + ")",
        f"trust domain: {material.trust_domain or '(none: no SPIFFE IDs)'}",
        f"status: {status_text}",
        "reload: SIGHUP" + (f", every {config.reload_interval:g}s" if config.reload_interval else ""),
    ]
    if config.admin is not None:
        lines.append(f"admin: {config.admin.listen}")
    for service in config.services:
        leaf = material.services[service.name].leaf
        lines.append(f"service {service.name}: {pki.describe(leaf)}")
        for route in service.inbound:
            allow = ", ".join(route.allow) if route.allow else "nobody (empty allow-list)"
            lines.append(
                f"  inbound {route.name}: {route.listen} -> {route.backend}; allow {allow}; "
                f"max {route.max_connections}"
            )
        for route in service.outbound:
            lines.append(
                f"  outbound {route.name}: {route.listen} -> {route.remote}; peer {route.peer}; "
                f"max {route.max_connections}"
            )
    return "\n".join(lines)
