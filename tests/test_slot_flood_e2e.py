"""A client that opens TCP connections and never starts TLS cannot starve authorized callers.

One ``twistd s2sgw`` (status off) in front of an echo backend, ``max_connections = 16``. An
attacker bound to 127.0.0.2 holds twice that many idle TCP connections and reopens each one the
gateway closes (refused at accept, or cut by the handshake timeout); meanwhile an allowed client on
127.0.0.1 makes 100 requests, each on a new connection.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.hostile import (
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    client_context,
    free_port,
    gateway_toml,
    reason_of,
    roundtrip,
    service_toml,
)

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 16


class Flood:
    """Holds ``count`` idle TCP connections from ``source`` and reopens each one that is closed."""

    def __init__(self, port: int, source: str, count: int) -> None:
        self.port, self.source, self.count = port, source, count
        self.opened = 0
        self.closed_by_gateway = 0
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _open(self) -> None:
        sock = socket.socket()
        sock.bind((self.source, 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError:  # reset by a gateway that refused it at once: try again
            sock.close()
            self.closed_by_gateway += 1
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            while self.held() < self.count and not self._stop.is_set():
                self._open()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(sock)
                    sock.close()
                    self.closed_by_gateway += 1

    def start(self) -> None:
        self._thread.start()

    def held(self) -> int:
        return len(self._selector.get_map())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()


@pytest.fixture
def gateway(tmp_path) -> Iterator[tuple[Gateway, Pki, int]]:
    port = free_port()
    pki = Pki.create(tmp_path, None, ("users", "orders"))
    procs = Processes(tmp_path)
    backend = RecordingBackend(tmp_path / "backend.bytes")
    try:
        route = (
            f'\n[[service.inbound]]\nname = "users-in"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
            f'backend = "tcp:127.0.0.1:{backend.port}"\nallow = ["orders"]\nmax_connections = {MAX_CONNECTIONS}\n'
            "max_pending = 16\nmax_pending_per_source = 8\n"
        )
        services = service_toml("users", pki.certs / "users.pem", pki.certs / "users.key", route)
        gateway = Gateway.start(procs, "gateway", gateway_toml(pki.bundle, services, handshake=1), [port])
        yield gateway, pki, port
    finally:
        procs.stop_all()
        backend.stop()


def test_an_attacker_holding_and_reopening_idle_connections_starves_no_allowed_request(gateway) -> None:
    gateway, pki, port = gateway
    context = client_context(pki.certs / "orders.pem", pki.certs / "orders.key", pki.bundle)
    flood = Flood(port, "127.0.0.2", 2 * MAX_CONNECTIONS)
    mark = gateway.mark()
    flood.start()
    served = 0
    try:
        deadline = time.monotonic() + 10
        while flood.opened < 2 * MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert flood.held() == 2 * MAX_CONNECTIONS
        started = time.monotonic()
        for _ in range(100):
            roundtrip(port, context)  # raises unless answered through the backend
            served += 1
        elapsed = time.monotonic() - started
        time.sleep(1.5)  # past the 1 s handshake timeout: held slots are cut and reopened
        roundtrip(port, context)
    finally:
        flood.stop()
    assert served == 100
    reasons = {reason_of(line) for line in gateway.audits_since(mark, "users-in") if "outcome=refused" in line}
    assert {"too_many_pending_from_source", "handshake_timeout"} <= reasons, reasons
    assert flood.closed_by_gateway > 2 * MAX_CONNECTIONS  # it was cut and came back
    print(f"slot flood: 100 of 100 allowed requests served in {elapsed:.2f}s; attacker reopened {flood.opened}")
