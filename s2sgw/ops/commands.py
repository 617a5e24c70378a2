"""Gateway command: ``check-config`` (``explain`` has its own module)."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from s2sgw import pki
from s2sgw.config import GatewayConfig, load_config


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
    check.set_defaults(run=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    from s2sgw.material import load_material

    config = load_config(args.file)
    # A command, not the reactor: the wall clock is the right "now" here.
    material = load_material(config, datetime.datetime.now(datetime.UTC), 1)
    print(summary(config, material))
    return 0


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
