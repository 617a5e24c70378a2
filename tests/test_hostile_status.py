"""A malicious or broken CA status server, against real gateways in fail-closed and fail-open.

A fake OCSP responder runs in a thread of this process with the real CA's OCSP signing key, so it
can answer correctly, or be down, slow, sign with a wrong key, answer for another serial, replay
a stale answer, echo a wrong nonce, say ``unauthorized`` / ``tryLater``, send garbage, or send a
body that never ends. Two ``twistd s2sgw`` processes ask it: one with ``fail = "closed"``, one with
``fail = "open"`` (status timeout 0.5 s). Each case uses a freshly issued certificate, so no
cached answer hides the server's behaviour.
"""

from __future__ import annotations

import datetime
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from tests.hostile import (
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    assert_refused,
    ca_builder,
    client_context,
    free_port,
    gateway_toml,
    inbound_toml,
    marker,
    new_ec_key,
    roundtrip,
    service_toml,
    tls_exchange,
)

pytestmark = pytest.mark.e2e

STATUS_TIMEOUT = 0.5


class FakeOCSP:
    """An OCSP responder on a fixed loopback port whose behaviour a test sets with ``mode``."""

    def __init__(self, pki: Pki, port: int) -> None:
        self.pki = pki
        self.port = port
        self.mode = "good"
        self.requests = 0
        self.endless_sent = 0
        self.endless_done = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    # -- lifecycle ("down" is a closed port)

    def start(self) -> None:
        if self._server is not None:
            return
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: nothing survives a stop

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.requests += 1
                fake.answer(self, body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the gateway hanging up on a slow or endless answer is the point

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- answers

    def answer(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        mode = self.mode
        if mode == "slow":
            time.sleep(STATUS_TIMEOUT * 4)
        if mode == "endless":
            self._endless(handler)
            return
        if mode == "garbage":
            payload = os.urandom(300)
        elif mode in ("unauthorized", "try_later"):
            status = ocsp.OCSPResponseStatus.UNAUTHORIZED if mode == "unauthorized" else ocsp.OCSPResponseStatus.TRY_LATER
            payload = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(_DER)
        else:
            payload = self._signed(ocsp.load_der_ocsp_request(body), mode)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/ocsp-response")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _signed(self, request: ocsp.OCSPRequest, mode: str) -> bytes:
        ca = self.pki.ca
        now = datetime.datetime.now(datetime.UTC)
        this_update, next_update = now - datetime.timedelta(minutes=1), now + datetime.timedelta(hours=1)
        if mode == "stale":  # a genuine answer, replayed after its nextUpdate
            this_update, next_update = now - datetime.timedelta(hours=3), now - datetime.timedelta(hours=2)
        serial = request.serial_number + (1 if mode == "wrong_serial" else 0)
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            nonce = None
        if mode == "wrong_nonce":
            nonce = os.urandom(16)
        signer, key = ca.ocsp_cert, ca.ocsp_key
        if mode == "wrong_key":  # an impostor responder: our responder's name, someone else's key
            key = new_ec_key()
            signer = ca_builder(ca.ocsp_cert.subject, key.public_key(), ca.intermediate_cert, key).sign(key, hashes.SHA256())
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                request.issuer_name_hash, request.issuer_key_hash, serial, request.hash_algorithm,
                ocsp.OCSPCertStatus.GOOD, this_update, next_update, None, None,
            )  # fmt: skip
            .responder_id(ocsp.OCSPResponderEncoding.NAME, signer)
            .certificates([signer])
        )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.sign(key, hashes.SHA256()).public_bytes(_DER)

    def _endless(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/ocsp-response")
        handler.end_headers()
        chunk = b"\x30" * 16384
        try:
            for _ in range(100_000):  # 1.6 GB at most: bounded even if nobody hangs up
                handler.wfile.write(chunk)
                self.endless_sent += len(chunk)
        except OSError:
            pass
        finally:
            self.endless_done.set()


_DER = Encoding.DER


@attrs.define
class World:
    pki: Pki
    procs: Processes
    fake: FakeOCSP
    gateways: dict[str, Gateway]
    backends: dict[str, RecordingBackend]
    ports: dict[str, int]
    odd: Path

    def fresh_identity(self) -> Path:
        """A new certificate for orders: its serial has never been asked about."""
        out = self.odd / f"orders-{len(list(self.odd.glob('*'))) if self.odd.exists() else 0}"
        self.pki.ca.write_identity(self.pki.ca.issue("orders"), out)
        return out / "orders.pem"

    def context(self, pem: Path) -> object:
        return client_context(pem, pem.with_suffix(".key"), self.pki.bundle)

    def assert_still_serving(self) -> None:
        self.fake.mode = "good"
        pem = self.fresh_identity()
        for fail in ("closed", "open"):
            roundtrip(self.ports[fail], self.context(pem))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-status")
    pki = Pki.create(root, None, ("users", "orders"))
    procs = Processes(root)
    fake = FakeOCSP(pki, free_port())
    backends = {fail: RecordingBackend(root / f"backend-{fail}.bytes") for fail in ("closed", "open")}
    ports = {fail: free_port() for fail in ("closed", "open")}
    gateways = {}
    try:
        for fail in ("closed", "open"):
            services = service_toml(
                "users", pki.certs / "users.pem", pki.certs / "users.key",
                inbound_toml("users-in", ports[fail], backends[fail].port, ["orders"]),
            )  # fmt: skip
            status = (
                f'mode = "ocsp"\nurl = "http://127.0.0.1:{fake.port}/ocsp"\nfail = "{fail}"\n'
                f"timeout = {STATUS_TIMEOUT}\nmax_cache_age = 1.0"
            )
            gateways[fail] = Gateway.start(procs, f"gateway-{fail}", gateway_toml(pki.bundle, services, status=status), [ports[fail]])
        world = World(pki, procs, fake, gateways, backends, ports, root / "odd")
        world.assert_still_serving()
        yield world
    finally:
        procs.stop_all()
        fake.stop()
        for backend in backends.values():
            backend.stop()


def _refused_when_closed(world: World, mode: str, reason: str, detail: str, *, down: bool = False) -> None:
    gateway, backend = world.gateways["closed"], world.backends["closed"]
    pem = world.fresh_identity()
    mark, before = gateway.mark(), backend.snapshot()
    asked = world.fake.requests
    world.fake.mode = mode
    exchange = tls_exchange(world.ports["closed"], world.context(pem), marker(f"status-{mode}"))
    assert_refused(exchange)
    line = gateway.wait_audit(mark, "users-in", "outcome=refused ", f"reason={reason} ")
    assert detail in line, line
    assert "peer=spiffe://e2e.s2sgw.test/orders " in line
    backend.assert_untouched_since(before)
    if down:
        world.fake.start()
    else:
        assert world.fake.requests > asked  # the gateway did ask the malicious server
    world.assert_still_serving()


def _admitted_when_open(world: World, mode: str, reason: str) -> None:
    gateway = world.gateways["open"]
    pem = world.fresh_identity()
    mark = gateway.mark()
    world.fake.mode = mode
    roundtrip(world.ports["open"], world.context(pem))
    warning = gateway.wait_log(mark, "admits spiffe://e2e.s2sgw.test/orders", "because fail = open")
    assert f"({reason}:" in warning, warning
    world.assert_still_serving()


CASES = [
    # mode, reason under fail = closed, words in the audit detail
    ("down", "ca_unreachable", "status query failed"),
    ("slow", "ca_unreachable", "timed out"),
    ("try_later", "ca_unreachable", "TRY_LATER"),
    ("wrong_key", "status_invalid", "not issued by the leaf's issuer"),
    ("wrong_serial", "status_invalid", "has no status for serial"),
    ("stale", "status_invalid", "stale"),
    ("wrong_nonce", "status_invalid", "nonce does not match"),
    ("unauthorized", "status_invalid", "UNAUTHORIZED"),
    ("garbage", "status_invalid", "not an OCSP response"),
    ("endless", "status_invalid", "larger than"),
]


@pytest.mark.parametrize(("mode", "reason", "detail"), CASES, ids=[case[0] for case in CASES])
def test_fail_closed_refuses_without_a_valid_answer(world: World, mode: str, reason: str, detail: str) -> None:
    if mode == "down":
        world.fake.stop()
        try:
            _refused_when_closed(world, "good", reason, detail, down=True)
        finally:
            world.fake.start()
        return
    _refused_when_closed(world, mode, reason, detail)


@pytest.mark.parametrize(("mode", "reason", "detail"), CASES, ids=[case[0] for case in CASES])
def test_fail_open_admits_with_a_warning(world: World, mode: str, reason: str, detail: str) -> None:
    """fail = "open" trades revocation for availability: admitted, and the log says why."""
    if mode == "down":
        world.fake.stop()
        try:
            world.fake.mode = "good"
            pem = world.fresh_identity()
            mark = world.gateways["open"].mark()
            roundtrip(world.ports["open"], world.context(pem))
            warning = world.gateways["open"].wait_log(mark, "because fail = open")
            assert "(ca_unreachable:" in warning
        finally:
            world.fake.start()
        world.assert_still_serving()
        return
    _admitted_when_open(world, mode, reason)


def test_an_endless_body_is_cut_off_and_the_connection_dropped(world: World) -> None:
    """The gateway reads at most 64 KiB of an answer and hangs up on the rest."""
    world.fake.endless_done.clear()
    world.fake.endless_sent = 0
    _refused_when_closed(world, "endless", "status_invalid", "larger than")
    assert world.fake.endless_done.wait(10), "the gateway kept reading the endless body"
    assert world.fake.endless_sent < 64 * 1024 * 1024
    assert world.gateways["closed"].alive()


def test_a_slow_server_does_not_hold_other_peers(world: World) -> None:
    """While queries hang, handshakes and refusals of other peers still finish promptly."""
    world.fake.mode = "slow"
    pems = [world.fresh_identity() for _ in range(4)]
    gateway = world.gateways["closed"]
    mark = gateway.mark()
    started = time.monotonic()
    threads = [
        threading.Thread(target=tls_exchange, args=(world.ports["closed"], world.context(p), b"x")) for p in pems
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < STATUS_TIMEOUT * 4
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in gateway.audits_since(mark, "users-in") if "reason=ca_unreachable " in line]
        if len(lines) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 4, lines
    world.assert_still_serving()
