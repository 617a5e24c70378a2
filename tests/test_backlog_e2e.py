"""A burst of new connections is not stalled by a short listen backlog.

Twisted listens with a backlog of 50: past it the kernel drops SYNs and the client sends again a
second later. The gateway's tcp: listeners default to 511 (``backlog=`` in the endpoint string
still wins). 400 connections opened at once to a real ``twistd s2sgw`` all connect within well
under a second.
"""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path

import pytest

from tests.hostile import Gateway, Pki, Processes, free_port, gateway_toml, service_toml

pytestmark = pytest.mark.e2e

BURST = 400


def _burst(port: int, count: int) -> list[float]:
    """Open ``count`` connections at once (non-blocking); seconds until each one connected."""
    selector = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    took: list[float] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            started[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 10
        while len(took) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                selector.unregister(sock)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                took.append(time.monotonic() - started[sock])
    finally:
        for sock in started:
            sock.close()
    assert len(took) == count, f"{len(took)} of {count} connected"
    return took


def test_a_burst_of_400_new_connections_connects_without_a_one_second_stall(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path, None, ("users",))
    procs = Processes(tmp_path)
    port = free_port()
    route = (
        f'\n[[service.inbound]]\nname = "users-in"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        'backend = "tcp:127.0.0.1:1"\nallow = ["orders"]\nmax_pending_per_source = 512\n'
    )
    services = service_toml("users", pki.certs / "users.pem", pki.certs / "users.key", route)
    try:
        Gateway.start(procs, "gateway", gateway_toml(pki.bundle, services), [port])
        time.sleep(0.5)
        took = _burst(port, BURST)
    finally:
        procs.stop_all()
    took.sort()
    print(f"burst of {BURST}: median {took[len(took) // 2] * 1000:.1f} ms, slowest {took[-1] * 1000:.1f} ms")
    assert took[-1] < 0.9, took[-10:]
