"""Backends and peers that fail or misbehave, against a real gateway.

One ``twistd s2sgw`` (connect timeout 1 s, idle timeout 3 s) with inbound routes in front of
backends that are down, that never accept, that reset, that never read and that flood; outbound
routes to a remote gateway that is down or never accepts; and an echo route to show that everyone
else is served throughout. Backends record every byte they read.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import attrs
import pytest

from tests.hostile import (
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    assert_refused,
    client_context,
    free_port,
    gateway_toml,
    inbound_toml,
    marker,
    outbound_toml,
    plain_exchange,
    roundtrip,
    service_toml,
    tls_exchange,
)

pytestmark = pytest.mark.e2e

IDLE = 3


class Blackhole:
    """A listening socket that never accepts, its queue already full: SYNs go unanswered."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)
        time.sleep(0.2)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.listener.close()


@attrs.define
class World:
    pki: Pki
    procs: Processes
    gateway: Gateway
    backends: dict[str, RecordingBackend]
    ports: dict[str, int]

    @property
    def allowed(self) -> ssl.SSLContext:
        certs = self.pki.certs
        return client_context(certs / "orders.pem", certs / "orders.key", self.pki.bundle)

    def assert_still_serving(self) -> None:
        mark = self.gateway.mark()
        roundtrip(self.ports["echo-in"], self.allowed)
        payload = b"through the outbound route\n"
        exchange = plain_exchange(self.ports["to-echo"], payload, expect=len(payload) + 5)
        assert exchange.received == b"echo:" + payload, exchange
        self.gateway.wait_audit(mark, "to-echo", "outcome=closed ")
        self.gateway.wait_audit(mark, "echo-in", "outcome=closed ")

    def untouched(self) -> dict[str, tuple[int, int]]:
        return {name: backend.snapshot() for name, backend in self.backends.items()}

    def assert_untouched(self, before: dict[str, tuple[int, int]]) -> None:
        for name, backend in self.backends.items():
            backend.assert_untouched_since(before[name])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-backend")
    pki = Pki.create(root, None, ("users", "orders"))
    procs = Processes(root)
    backends = {mode: RecordingBackend(root / f"backend-{mode}.bytes", mode) for mode in ("echo", "silent", "flood", "reset")}
    blackhole = Blackhole()
    down = free_port()
    names = (
        "echo-in", "silent-in", "flood-in", "reset-in", "down-in", "blackhole-in",
        "to-echo", "to-flood", "to-down", "to-blackhole",
    )  # fmt: skip
    ports = {name: free_port() for name in names}
    try:
        inbound = "".join(
            inbound_toml(name, ports[name], backend_port, ["orders"])
            for name, backend_port in (
                ("echo-in", backends["echo"].port),
                ("silent-in", backends["silent"].port),
                ("flood-in", backends["flood"].port),
                ("reset-in", backends["reset"].port),
                ("down-in", down),
                ("blackhole-in", blackhole.port),
            )
        )
        outbound = "".join(
            outbound_toml(name, ports[name], remote, "users")
            for name, remote in (
                ("to-echo", ports["echo-in"]),
                ("to-flood", ports["flood-in"]),
                ("to-down", down),
                ("to-blackhole", blackhole.port),
            )
        )
        services = service_toml("users", pki.certs / "users.pem", pki.certs / "users.key", inbound) + service_toml(
            "orders", pki.certs / "orders.pem", pki.certs / "orders.key", outbound
        )
        gateway = Gateway.start(procs, "gateway", gateway_toml(pki.bundle, services, idle=IDLE), list(ports.values()))
        world = World(pki, procs, gateway, backends, ports)
        world.assert_still_serving()
        yield world
    finally:
        procs.stop_all()
        blackhole.close()
        for backend in backends.values():
            backend.stop()


# ---------------------------------------------------------------------------------------------
# Backends that are not there


@pytest.mark.parametrize(("route", "words"), [("down-in", "Connection was refused"), ("blackhole-in", "connect timed out after 1s")])
def test_an_unreachable_backend_closes_the_peer_with_backend_unreachable(world: World, route: str, words: str) -> None:
    mark, before = world.gateway.mark(), world.untouched()
    exchange = tls_exchange(world.ports[route], world.allowed, marker(route))
    assert_refused(exchange, within=3)
    line = world.gateway.wait_audit(mark, route, "outcome=refused ", "reason=backend_unreachable ")
    assert words in line, line
    assert "peer=spiffe://e2e.s2sgw.test/orders " in line
    world.assert_untouched(before)
    world.assert_still_serving()


@pytest.mark.parametrize(("route", "words"), [("to-down", "Connection was refused"), ("to-blackhole", "connect timed out after 1s")])
def test_an_unreachable_remote_gateway_closes_the_local_client_with_remote_unreachable(
    world: World, route: str, words: str
) -> None:
    mark, before = world.gateway.mark(), world.untouched()
    exchange = plain_exchange(world.ports[route], marker(route))
    assert_refused(exchange, within=3)
    line = world.gateway.wait_audit(mark, route, "outcome=refused ", "reason=remote_unreachable ")
    assert words in line, line
    world.assert_untouched(before)
    world.assert_still_serving()


def test_a_backend_that_resets_at_once_ends_the_peers_connection(world: World) -> None:
    """The backend accepts and resets without reading: the peer is closed, nothing was read."""
    mark = world.gateway.mark()
    exchange = tls_exchange(world.ports["reset-in"], world.allowed, marker("reset"))
    assert exchange.received == b"" and exchange.seconds < 3, exchange
    line = world.gateway.wait_audit(mark, "reset-in", "outcome=")
    assert "reason=backend_closed " in line or "reason=backend_unreachable " in line, line
    assert world.backends["reset"].received() == b""
    world.assert_still_serving()


# ---------------------------------------------------------------------------------------------
# Backends and clients that misbehave mid-stream


def _sample_rss(gateway: Gateway, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], gateway.rss_kib())
        time.sleep(0.02)


def test_a_backend_that_never_reads_stops_the_client_with_bounded_gateway_memory(world: World) -> None:
    """The client keeps sending; flow control pushes back to it instead of filling the gateway."""
    gateway = world.gateway
    idle_fds, idle_rss = gateway.fds(), gateway.rss_kib()
    peak = [idle_rss]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(gateway, stop, peak))
    sampler.start()
    sent = 0
    mark = gateway.mark()
    chunk = b"\xa5" * 65536
    try:
        sock = socket.create_connection(("127.0.0.1", world.ports["silent-in"]), timeout=1)
        tls = world.allowed.wrap_socket(sock, server_hostname="users")
        deadline = time.monotonic() + 4
        try:
            while time.monotonic() < deadline:
                sent += tls.send(chunk)
        except (TimeoutError, ssl.SSLError, OSError):
            pass  # the send blocked for a second: pushed back
        stalled_after = sent
        time.sleep(1)
        # the client disappears with its data unsent; the gateway must let go of the backend
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()
    finally:
        stop.set()
        sampler.join()
    growth_mib = (peak[0] - idle_rss) / 1024
    assert stalled_after < 64 * 1024 * 1024, f"{stalled_after} bytes accepted from a client whose backend never reads"
    assert growth_mib < 16, f"gateway grew by {growth_mib:.1f} MiB"
    silent = world.backends["silent"].connections[-1]
    assert silent.closed.wait(IDLE + 5), "the gateway kept the backend connection of a vanished client"
    assert world.backends["silent"].received() == b""
    line = gateway.wait_audit(mark, "silent-in", "outcome=closed ")
    assert "peer=spiffe://e2e.s2sgw.test/orders " in line
    _wait_for_fds(gateway, idle_fds)
    world.assert_still_serving()


def test_a_client_that_disappears_mid_transfer_closes_the_backend_side(world: World) -> None:
    gateway = world.gateway
    idle_fds = gateway.fds()
    mark = gateway.mark()
    sock = socket.create_connection(("127.0.0.1", world.ports["flood-in"]), timeout=5)
    tls = world.allowed.wrap_socket(sock, server_hostname="users")
    tls.sendall(b"go\n")
    received = 0
    while received < 4 * 1024 * 1024:
        received += len(tls.recv(65536))
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()  # gone, with a reset, in the middle of the download
    flood = world.backends["flood"].connections[-1]
    assert flood.closed.wait(5), "the backend side stayed open after the client vanished"
    line = gateway.wait_audit(mark, "flood-in", "outcome=closed ")
    bytes_out = int(line.split(" bytes_out=")[1].split(" ")[0])
    assert bytes_out >= received
    _wait_for_fds(gateway, idle_fds)
    world.assert_still_serving()


def test_an_outbound_client_that_disappears_mid_transfer_closes_every_hop(world: World) -> None:
    """Local client -> to-flood -> mTLS -> flood-in -> flooding backend; the local client resets
    mid-download: the mTLS hop and the backend connection are closed too."""
    gateway = world.gateway
    idle_fds = gateway.fds()
    mark = gateway.mark()
    sock = socket.create_connection(("127.0.0.1", world.ports["to-flood"]), timeout=5)
    sock.sendall(b"go\n")
    received = 0
    while received < 4 * 1024 * 1024:
        received += len(sock.recv(65536))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert world.backends["flood"].connections[-1].closed.wait(5)
    gateway.wait_audit(mark, "to-flood", "outcome=closed ")
    gateway.wait_audit(mark, "flood-in", "outcome=closed ")
    _wait_for_fds(gateway, idle_fds)
    world.assert_still_serving()


def _wait_for_fds(gateway: Gateway, expected: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while gateway.fds() > expected:
        if time.monotonic() > deadline:
            entries = sorted(os.readlink(f"/proc/{gateway.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{gateway.pid}/fd"))
            raise AssertionError(f"gateway holds {gateway.fds()} fds, {expected} before: {entries}")
        time.sleep(0.05)

