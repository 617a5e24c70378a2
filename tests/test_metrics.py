"""Metrics are made one way: nothing at import time, registered on the given registry while a service runs.

The families a gateway exposes are compared with the list below, generated from the code before
its metrics moved into services (module-level counters in prometheus' default registry): same
names, types, help texts and label names, in every status mode.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock

import s2sgw
from s2sgw.config import load_config
from s2sgw.service import build_gateway
from s2sgw.truststore import TrustStore
from tests.doubles import InlineThreads
from tests.pkifactory import TestCA

Family = tuple[str, str, str, tuple[str, ...]]  # name, type, help, label names

ALWAYS: set[Family] = {
    ("s2sgw_active_connections", "gauge", "Connections open now.", ("route",)),
    ("s2sgw_build_info", "gauge", "The running s2sgw version (always 1).", ("version",)),
    ("s2sgw_certificate_expiry_timestamp_seconds", "gauge", "Unix time at which each service's own certificate expires.", ("service",)),
    ("s2sgw_trust_bundle_expiry_timestamp_seconds", "gauge", "Unix time at which each root certificate of the trust bundle expires.", ("fingerprint", "root")),
    ("s2sgw_certificate_expiry_seconds", "gauge", "Seconds until each service's own certificate expires (negative: expired).", ("service",)),
    ("s2sgw_connection_duration_seconds", "histogram", "Lifetime of relayed connections.", ("route",)),
    ("s2sgw_connections", "counter", "Connections ended, by outcome (closed | refused) and reason.", ("outcome", "reason", "route")),
    ("s2sgw_crl_refreshes", "counter", "CRL fetches from the CA, by outcome.", ("outcome",)),
    ("s2sgw_handshakes", "counter", "TLS handshakes with authorization, by result (ok | refused) and reason.", ("reason", "result", "route")),
    ("s2sgw_live_closes", "counter", "Live connections closed because their peer's status changed, by reason and cause (feed | revalidation | reload | root_crl).", ("cause", "reason")),
    ("s2sgw_ready", "gauge", "1 when /readyz would answer 200, else 0.", ()),
    ("s2sgw_remote_refusals", "counter", "Outbound connections the remote gateway refused, by the TLS alert it sent.", ("alert", "route")),
    ("s2sgw_relay_bytes", "counter", "Bytes relayed; in = read from the accepted connection, out = written to it.", ()),
    ("s2sgw_reloads", "counter", "Trust reloads by result (ok | failed).", ("result",)),
    ("s2sgw_staple_fetches", "counter", "OCSP queries for our own certificates' staples, by outcome.", ("outcome",)),
    ("s2sgw_staples_received", "counter", "OCSP staples received on outbound handshakes, by result: valid (no query needed) or invalid (ignored; the remote was checked as usual).", ("result",)),
    ("s2sgw_status_cache_lookups", "counter", "Status checks by how they were answered: hit (cache), miss (new query), coalesced (joined a query already in flight), revoked (revocation pushed to the checker).", ("result",)),
    ("s2sgw_status_queries", "counter", "OCSP queries to the CA status server, by outcome.", ("outcome",)),
    ("s2sgw_status_query_seconds", "histogram", "Duration of OCSP queries to the CA status server.", ()),
    ("s2sgw_trust_bundle_expiry_seconds", "gauge", "Seconds until each root certificate of the trust bundle expires.", ("fingerprint", "root")),
    ("s2sgw_trust_generation", "gauge", "Generation of the trust material in use (1 at start).", ()),
}  # fmt: skip

BY_MODE: dict[str, set[Family]] = {
    "ocsp": {
        ("s2sgw_revocation_feed_age_seconds", "gauge", "Age of the newest verified revocation feed answer (at most the hold time, ~25 s, while the feed is followed); NaN before the first.", ("url",)),
        ("s2sgw_revocation_feed_failures", "gauge", "Failed feed polls in a row (0 while following).", ("url",)),
        ("s2sgw_revocation_feed_revocations", "counter", "Revocations received from the feed.", ("url",)),
        ("s2sgw_revocation_feed_seq", "gauge", "Newest revocation sequence number seen on the feed.", ("url",)),
        ("s2sgw_status_cache_entries", "gauge", "Status answers held in the cache.", ()),
    },
    "crl": {
        ("s2sgw_crl_expiry_seconds", "gauge", "Seconds until the loaded CRL's nextUpdate (negative: stale).", ()),
        ("s2sgw_crl_number", "gauge", "CRL number of the loaded CRL.", ()),
        ("s2sgw_crl_expiry_timestamp_seconds", "gauge", "Unix time of the loaded CRL's nextUpdate.", ()),
    },
    "off": set(),
}  # fmt: skip

STATUS = {
    "ocsp": '[status]\nmode = "ocsp"\nurl = "http://127.0.0.1:1/ocsp"\n',
    "crl": '[status]\nmode = "crl"\ncrl = "ca.crl"\ncrl_url = "http://127.0.0.1:1/crl"\n',
    "off": '[status]\nmode = "off"\n',
}

GATEWAY = """
[admin]
listen = "tcp:0:interface=127.0.0.1"
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  listen = "tcp:0:interface=127.0.0.1"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users"]
  [[service.outbound]]
  name = "orders-to-users"
  listen = "tcp:0:interface=127.0.0.1"
  remote = "tcp:127.0.0.1:1"
  peer = "users"
"""


class Reactor(InlineThreads, MemoryReactorClock):
    """Sockets in memory, a clock at the wall time, and "threads" that run at once (trust loading)."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(time.time())


def _gateway(directory: Path, mode: str, registry: CollectorRegistry) -> MultiService:
    """A gateway with one inbound and one outbound route and an admin endpoint, built, not started."""
    if not (directory / "gateway.toml").exists():
        ca = TestCA.create()
        (directory / "bundle.pem").write_bytes(ca.bundle_pem())
        ca.issue("orders").write(directory, "orders")
        (directory / "ca.crl").write_bytes(ca.crl(number=5).public_bytes(serialization.Encoding.PEM))
        (directory / "gateway.toml").write_text('trust = "bundle.pem"\n' + STATUS[mode] + GATEWAY)
    reactor = Reactor()
    config = load_config(directory / "gateway.toml")
    store = TrustStore.load(config, reactor, threadpool=reactor)
    top, _ = build_gateway(config, store, reactor, registry)
    return top


def _families(registry: CollectorRegistry) -> list[Family]:
    """What ``/metrics`` would list: every family once, with its type, help and label names."""
    declared: dict[str, tuple[str, ...]] = {}
    # Label names of labelled metrics without a sample yet are only kept privately by prometheus.
    for collector in registry._collector_to_names:
        for member in getattr(collector, "members", ()):
            for description in member.describe():
                declared[description.name] = tuple(getattr(member, "_labelnames", ()))
    found = []
    for family in registry.collect():
        labels = set(declared.get(family.name, ()))
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        found.append((family.name, family.type, family.documentation, tuple(sorted(labels))))
    return sorted(found)


def _stop(top: MultiService) -> None:
    results: list[Any] = []
    top.stopService().addBoth(results.append)
    assert results and all(ok for ok, _ in results[0]), results


def test_importing_every_module_registers_no_metric() -> None:
    """Importing s2sgw, all its modules and the twistd plugins adds nothing to prometheus' default registry."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil
        from prometheus_client import REGISTRY

        def names():
            return {family.name for family in REGISTRY.collect()}

        before = names()
        import s2sgw
        for module in pkgutil.walk_packages(s2sgw.__path__, "s2sgw."):
            importlib.import_module(module.name)
        import twisted.plugins.s2sgw_plugin
        print(sorted(names() - before))
        """
    )
    root = Path(s2sgw.__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_holds_a_metric_object() -> None:
    """No module-level Counter, Gauge, Histogram, Summary, Info or Enum anywhere in s2sgw."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    found = []
    for path in sorted(Path(s2sgw.__file__).parent.rglob("*.py")):
        for statement in ast.parse(path.read_text()).body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if name in kinds:
                        found.append(f"{path.name}:{node.lineno} {name}")
    assert found == []


@pytest.mark.parametrize("mode", ["ocsp", "crl", "off"])
def test_a_running_gateway_exposes_the_metric_families_it_always_did(tmp_path: Path, mode: str) -> None:
    """Same names, types, help texts and label names as before, on the registry the gateway is given."""
    registry = CollectorRegistry()
    top = _gateway(tmp_path, mode, registry)
    assert _families(registry) == []  # built, not started: nothing registered yet
    top.startService()
    try:
        assert _families(registry) == sorted(ALWAYS | BY_MODE[mode])
    finally:
        _stop(top)
    assert _families(registry) == []  # stopped: everything unregistered


def test_a_gateway_stopped_and_built_again_in_one_process_registers_again(tmp_path: Path) -> None:
    """Restarting a gateway, or building a second one after stopping the first, on one registry
    raises no "Duplicated timeseries" and shows every family once."""
    registry = CollectorRegistry()
    expected = sorted(ALWAYS | BY_MODE["ocsp"])
    first = _gateway(tmp_path, "ocsp", registry)
    for _ in range(2):
        first.startService()
        found = _families(registry)
        # Once restarted, the monitor also shows its last probe of the CA (s2sgw_status_server_up).
        assert set(expected) <= set(found)
        assert len({name for name, *_ in found}) == len(found)
        _stop(first)
        assert _families(registry) == []
    second = _gateway(tmp_path, "ocsp", registry)
    second.startService()
    try:
        assert _families(registry) == expected
    finally:
        _stop(second)
    assert _families(registry) == []
