"""Helpers for reload tests against real gateways: config text, log waits, a bounded client loop."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.python.failure import Failure

from s2sgw.config import load_config
from s2sgw.truststore import TrustStore
from tests.doubles import FakeReactor, FakeThreadPool
from tests.e2e import Processes
from tests.pkifactory import Identity, TestCA

ANSWER = b'{"id": 1, "name": "John Doe"}'


def config_text(
    trust: Path,
    certs: Path,
    services: dict[str, str],
    *,
    status: str = 'mode = "off"',
) -> str:
    """A gateway config trusting ``trust``; ``services`` maps a name (NAME.pem/.key in ``certs``) to routes."""
    text = f'trust = "{trust}"\n[status]\n{status}\n[timeouts]\nhandshake = 5\ndrain = 2\n'
    for name, routes in services.items():
        text += f'\n[[service]]\nname = "{name}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n'
        text += routes
    return text


def inbound(name: str, port: int, backend: int, allow: list[str]) -> str:
    listed = ", ".join(f'"{a}"' for a in allow)
    return (
        f'[[service.inbound]]\nname = "{name}"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'backend = "tcp:127.0.0.1:{backend}"\nallow = [{listed}]\n'
    )


def outbound(name: str, port: int, remote: int, peer: str) -> str:
    return (
        f'[[service.outbound]]\nname = "{name}"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'remote = "tcp:127.0.0.1:{remote}"\npeer = "{peer}"\n'
    )


def count_in_log(procs: Processes, name: str, needle: str) -> int:
    return procs.log(name).count(needle)


def wait_log_count(procs: Processes, name: str, needle: str, count: int, timeout: float = 15.0) -> str:
    """Wait until ``needle`` occurs at least ``count`` times in ``name``'s log; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = procs.log(name)
        if log.count(needle) >= count:
            return log
        process = procs.running[name]
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{procs.output(name)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not seen {count} times in {name} after {timeout} s:\n{log[-4000:]}")
        time.sleep(0.05)


def reloaded(procs: Processes, name: str, generation: int) -> None:
    wait_log_count(procs, name, f"trust material reloaded: generation {generation},", 1)


def get(port: int, path: str = "/api/users/1", timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection through a gateway's local port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@attrs.define(eq=False)
class ClientLoop:
    """A thread making requests on new connections back to back until stopped (or a deadline)."""

    port: int
    deadline: float = 120.0
    max_requests: int = 100_000
    ok: int = 0
    failures: list[str] = attrs.Factory(list)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="client-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.deadline
        while not self._stop.is_set() and time.monotonic() < end and self.ok + len(self.failures) < self.max_requests:
            try:
                status, body = get(self.port)
            except Exception as error:  # any failed connection counts
                self.failures.append(f"{type(error).__name__}: {error}")
                continue
            if status == 200 and body == ANSWER:
                self.ok += 1
            else:
                self.failures.append(f"HTTP {status}: {body[:80]!r}")

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` more requests have succeeded."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"client made {self.ok} requests, wanted {target}; failures: {self.failures[:5]}")
            if self._thread is not None and not self._thread.is_alive():
                raise AssertionError(f"client loop ended early after {self.ok} requests")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


TRUSTSTORE_CONFIG = """
trust = "bundle.pem"
[status]
mode = "{mode}"
url = "http://127.0.0.1:8080/ocsp"
crl = "ca.crl"
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  listen = "tcp:0:interface=127.0.0.1"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users"]
  [[service.outbound]]
  listen = "tcp:0:interface=127.0.0.1"
  remote = "tcp:127.0.0.1:8443"
  peer = "users"
"""

CRL_REFRESH_CONFIG = """
trust = "bundle.pem"
[status]
mode = "crl"
crl = "ca.crl"
crl_url = "{url}"
crl_refresh = 60
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  listen = "tcp:0:interface=127.0.0.1"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users"]
"""


def make_setup(directory: Path, mode: str = "off") -> Setup:
    ca = TestCA.create()
    (directory / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(directory, "orders")
    config_path = directory / "gateway.toml"
    config_path.write_text(TRUSTSTORE_CONFIG.format(mode=mode))
    if mode == "crl":
        (directory / "ca.crl").write_bytes(ca.crl(number=5).public_bytes(serialization.Encoding.PEM))
    return Setup(directory, ca, config_path, FakeReactor(), FakeThreadPool())


@attrs.define
class Setup:
    directory: Path
    ca: TestCA
    config_path: Path
    reactor: FakeReactor
    pool: FakeThreadPool

    def store(self) -> TrustStore:
        return TrustStore.load(load_config(self.config_path), self.reactor, threadpool=self.pool)

    def write_identity(self, name: str, identity: Identity) -> None:
        identity.write(self.directory, name)

    def reload(self, store: TrustStore) -> tuple[Any, Failure | None]:
        """Run one reload to its end; return (result, failure)."""
        outcome: list[Any] = []
        store.reload().addBoth(outcome.append)
        self.pool.run()
        assert outcome, "reload did not finish"
        result = outcome[0]
        return (None, result) if isinstance(result, Failure) else (result, None)
