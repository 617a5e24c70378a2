"""Hostile protocol behaviour against a real gateway and real ``openssl s_client``.

Old protocol versions, weak ciphers, non-TLS bytes, truncated and stalled handshakes,
renegotiation and connection floods: each is refused with its reason, nothing reaches the
backend, and allowed clients are served throughout. One ``twistd s2sgw`` with a 1 s handshake
timeout serves ``users-in`` (no cap) and ``capped-in`` (4 connections), each in front of its own
recording echo backend.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from tests.hostile import (
    HOSTILE,
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    assert_refused,
    client_context,
    client_hello,
    free_port,
    gateway_toml,
    inbound_toml,
    marker,
    metric,
    plain_exchange,
    roundtrip,
    s_client,
    s_client_supports,
    service_toml,
    tls_exchange,
)

pytestmark = pytest.mark.e2e

CAP = 4


@attrs.define
class World:
    pki: Pki
    procs: Processes
    gateway: Gateway
    backend: RecordingBackend
    capped_backend: RecordingBackend
    port: int
    capped_port: int
    admin_port: int

    @property
    def orders(self) -> Path:
        return self.pki.certs / "orders.pem"

    @property
    def allowed(self) -> ssl.SSLContext:
        return client_context(self.orders, self.orders.with_suffix(".key"), self.pki.bundle)

    def identity_args(self) -> list[str]:
        return ["-cert", str(self.orders), "-cert_chain", str(self.orders), "-key", str(self.orders.with_suffix(".key"))]

    def serve(self, route: str, port: int) -> None:
        """An allowed round trip, and its audit line: the connection has ended in the gateway too."""
        mark = self.gateway.mark()
        roundtrip(port, self.allowed)
        self.gateway.wait_audit(mark, route, "outcome=closed ")

    def assert_still_serving(self) -> None:
        self.serve("users-in", self.port)
        self.serve("capped-in", self.capped_port)

    def refusals(self, reason: str, route: str = "users-in") -> float:
        value = metric(self.admin_port, "s2sgw_connections_total", route=route, outcome="refused", reason=reason)
        assert value is not None, "the admin endpoint does not answer"
        return value

    def expect_refusal(self, mark: int, before: tuple[int, int], reason: str, route: str = "users-in") -> str:
        line = self.gateway.wait_audit(mark, route, "outcome=refused ", f"reason={reason} ")
        refused = [x for x in self.gateway.audits_since(mark, route) if "outcome=refused " in x]
        assert len(refused) == 1, refused
        assert self.refusals(reason, route) >= 1
        self.backend.assert_untouched_since(before)
        self.assert_still_serving()
        return line


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-protocol")
    pki = Pki.create(root, None, ("users", "orders"))
    procs = Processes(root)
    backend = RecordingBackend(root / "backend.bytes")
    capped_backend = RecordingBackend(root / "capped-backend.bytes")
    port, capped_port, admin_port = free_port(), free_port(), free_port()
    try:
        services = service_toml(
            "users", pki.certs / "users.pem", pki.certs / "users.key",
            inbound_toml("users-in", port, backend.port, ["orders"])
            + inbound_toml("capped-in", capped_port, capped_backend.port, ["orders"], max_connections=CAP, max_pending=CAP),
        )  # fmt: skip
        admin = f'[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"'
        toml = gateway_toml(pki.bundle, services, extra=admin)
        gateway = Gateway.start(procs, "gateway", toml, [port, capped_port, admin_port])
        world = World(pki, procs, gateway, backend, capped_backend, port, capped_port, admin_port)
        world.assert_still_serving()
        yield world
    finally:
        procs.stop_all()
        backend.stop()
        capped_backend.stop()


# ---------------------------------------------------------------------------------------------
# Versions and ciphers, with openssl s_client


@pytest.mark.parametrize(
    ("option", "words"),
    [("-ssl3", "ssl3"), ("-tls1", "tls1.0"), ("-tls1_1", "tls1.1")],
)
def test_old_protocol_versions_are_refused(world: World, option: str, words: str) -> None:
    """The client offers only an old version (with our allowed certificate): tls_error."""
    if not s_client_supports(option):
        pytest.skip(f"this openssl s_client has no {option} (compiled out)")
    mark, before = world.gateway.mark(), world.backend.snapshot()
    result = s_client(
        world.port, option, "-cipher", "DEFAULT:@SECLEVEL=0", *world.identity_args(), stdin=marker(words)
    )
    assert b"echo:" not in result.stdout
    line = world.expect_refusal(mark, before, "tls_error")
    assert "unsupported protocol" in line or "version" in line, line


@pytest.mark.parametrize(
    "cipher",
    [
        "ECDHE-ECDSA-AES128-SHA",  # CBC, SHA-1 MAC
        "ECDHE-ECDSA-AES256-SHA384",  # CBC
        "AES128-SHA",  # RSA key exchange: no forward secrecy
        "AES256-GCM-SHA384",  # AEAD but RSA key exchange
        "ECDHE-ECDSA-NULL-SHA",  # no encryption at all
        "EXP-RC4-MD5",  # export grade
        "DES-CBC3-SHA",
        "ECDHE-ECDSA-RC4-SHA",
    ],
)
def test_weak_tls12_ciphers_offered_alone_are_refused(world: World, cipher: str) -> None:
    mark, before = world.gateway.mark(), world.backend.snapshot()
    result = s_client(
        world.port, "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0", *world.identity_args(), stdin=marker(cipher)
    )
    if b"no cipher match" in result.stderr or b"Error with command" in result.stderr:
        pytest.skip(f"this openssl cannot offer {cipher} at all")
    assert b"echo:" not in result.stdout
    line = world.expect_refusal(mark, before, "tls_error")
    assert "no shared cipher" in line, line


def test_tls12_with_an_aead_ecdhe_cipher_is_served(world: World) -> None:
    """The control case: TLS 1.2 itself is fine with a strong suite."""
    result = s_client(
        world.port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", "-ign_eof", *world.identity_args(),
        stdin=b"tls12 control\n", linger=2,
    )  # fmt: skip
    assert b"echo:tls12 control" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# Bytes that are not TLS


def test_plain_http_to_the_mtls_port_is_refused(world: World) -> None:
    mark, before = world.gateway.mark(), world.backend.snapshot()
    exchange = plain_exchange(world.port, b"GET / HTTP/1.1\r\nHost: users\r\nX-Case: " + HOSTILE + b"\r\n\r\n")
    assert b"HTTP/" not in exchange.received and b"echo:" not in exchange.received
    assert exchange.seconds < 3
    world.expect_refusal(mark, before, "tls_error")


@pytest.mark.parametrize(
    ("size", "reason"),
    [(1, "handshake_timeout"), (5, "tls_error"), (4096, "tls_error"), (100_000, "tls_error")],
)
def test_random_bytes_are_refused(world: World, size: int, reason: str) -> None:
    """Garbage is a TLS error as soon as OpenSSL can tell (a record header); one byte waits for
    the handshake timeout."""
    mark, before = world.gateway.mark(), world.backend.snapshot()
    exchange = plain_exchange(world.port, b"\x00" + os.urandom(size - 1))
    assert b"echo:" not in exchange.received
    assert exchange.seconds < 3
    world.expect_refusal(mark, before, reason)


def test_a_truncated_client_hello_then_close_is_refused(world: World) -> None:
    hello = client_hello()
    mark, before = world.gateway.mark(), world.backend.snapshot()
    with socket.create_connection(("127.0.0.1", world.port), timeout=5) as sock:
        sock.sendall(hello[: len(hello) // 2])
    world.expect_refusal(mark, before, "closed_before_handshake")


def test_a_client_hello_with_a_lying_length_is_refused(world: World) -> None:
    """The record header promises more than the hello holds, and the rest is garbage."""
    hello = bytearray(client_hello())
    hello[3:5] = (len(hello) - 5 + 500).to_bytes(2, "big")
    mark, before = world.gateway.mark(), world.backend.snapshot()
    exchange = plain_exchange(world.port, bytes(hello) + os.urandom(500))
    assert b"echo:" not in exchange.received
    assert exchange.seconds < 0.9  # refused on sight, not at the handshake timeout
    world.expect_refusal(mark, before, "tls_error")


# ---------------------------------------------------------------------------------------------
# Stalled handshakes and floods


def _stall(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def _seconds_until_closed(sock: socket.socket) -> float:
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return time.monotonic() - started


def test_a_handshake_that_stops_half_way_is_dropped_at_the_handshake_timeout(world: World) -> None:
    hello = client_hello()
    mark, before = world.gateway.mark(), world.backend.snapshot()
    started = time.monotonic()
    with _stall(world.port, hello[: len(hello) // 2]) as sock:
        _seconds_until_closed(sock)
    waited = time.monotonic() - started
    assert 0.8 < waited < 3, waited
    world.expect_refusal(mark, before, "handshake_timeout")


def test_slowloris_fills_the_cap_then_the_timeout_frees_every_slot(world: World) -> None:
    """CAP stalled handshakes hold the capped route's pending slots (max_pending); newcomers are
    refused at once; 1 s later all slots are free again and an allowed client is served."""
    hello = client_hello()
    mark, before = world.gateway.mark(), world.capped_backend.snapshot()
    stalled = [_stall(world.capped_port, hello[:20]) for _ in range(CAP)]
    try:
        time.sleep(0.2)
        newcomer = tls_exchange(world.capped_port, world.allowed, marker("over-cap"))
        assert_refused(newcomer, within=0.5)
        world.gateway.wait_audit(mark, "capped-in", "reason=too_many_pending ")
        with ThreadPoolExecutor(CAP) as pool:
            waits = list(pool.map(_seconds_until_closed, stalled))
        assert all(w < 3 for w in waits), waits
    finally:
        for sock in stalled:
            sock.close()
    timeouts = world.gateway.wait_audits(mark, "capped-in", "reason=handshake_timeout ", CAP)
    assert len(timeouts) == CAP, timeouts
    world.capped_backend.assert_untouched_since(before)
    world.assert_still_serving()


def test_connections_beyond_the_cap_are_refused_quickly_and_the_admitted_ones_keep_working(world: World) -> None:
    mark, before = world.gateway.mark(), world.capped_backend.snapshot()
    admitted = []
    for i in range(CAP):
        sock = world.allowed.wrap_socket(socket.create_connection(("127.0.0.1", world.capped_port), timeout=5))
        sock.sendall(b"admitted %d\n" % i)
        assert sock.recv(100) == b"echo:admitted %d\n" % i
        admitted.append(sock)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            refused = list(pool.map(lambda _: plain_exchange(world.capped_port, marker("flood")), range(50)))
        assert all(e.received == b"" for e in refused)
        assert time.monotonic() - started < 5
        assert max(e.seconds for e in refused) < 1.0
        roundtrip(world.port, world.allowed)  # the other route does not notice
        for i, sock in enumerate(admitted):
            sock.sendall(b"again %d\n" % i)
            assert sock.recv(100) == b"again %d\n" % i
    finally:
        for sock in admitted:
            sock.close()
    assert len(world.gateway.wait_audits(mark, "capped-in", "reason=too_many_connections ", 50)) == 50
    assert world.refusals("too_many_connections", "capped-in") >= 50
    received = world.capped_backend.received()
    assert HOSTILE not in received
    assert world.capped_backend.snapshot()[0] == before[0] + CAP
    deadline = time.monotonic() + 5
    while True:  # the admitted connections end, and the slots are free again
        try:
            roundtrip(world.capped_port, world.allowed)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Renegotiation


def test_client_initiated_tls12_renegotiation_is_refused(world: World) -> None:
    """``R`` in s_client asks for a renegotiation; the gateway refuses it, and bytes sent after
    it never reach the backend."""
    mark, before = world.gateway.mark(), world.backend.snapshot()
    process = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{world.port}", "-tls1_2", "-legacy_renegotiation",
         *world.identity_args()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None
    try:
        time.sleep(0.5)
        for line in (b"R\n", marker("after-renegotiation")):
            try:
                process.stdin.write(line)
                process.stdin.flush()
            except BrokenPipeError:
                break
            time.sleep(0.5)
        try:
            out, err = process.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert b"RENEGOTIATING" in err, (out, err)
    assert b"no renegotiation" in err, (out, err)  # our no_renegotiation alert ends the client
    line = world.gateway.wait_audit(mark, "users-in", "outcome=")
    assert "outcome=closed reason=tls_error " in line and "tls=TLSv1.2 " in line, line
    assert "bytes_in=0 " in line
    # admitted (an allowed identity), so the backend was dialed; but not one byte arrived
    world.backend.assert_untouched_since((before[0] + 1, before[1]))
    world.assert_still_serving()


# ---------------------------------------------------------------------------------------------
# A scanner's view (opt-in)


def _sslyze(world: World, tmp_path: Path, name: str, *args: str, outcome: list | None = None) -> dict:
    import json
    import shutil

    sslyze = os.environ.get("S2SGW_SSLYZE") or shutil.which("sslyze")
    if not sslyze:
        pytest.skip("sslyze not found: install it in its own virtualenv (it pins an older cryptography) "
                    "and set S2SGW_SSLYZE to its executable")  # fmt: skip
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sslyze, f"--json_out={out}", *args, f"127.0.0.1:{world.port}"], capture_output=True, timeout=300
    )
    assert out.exists(), result.stdout.decode()[-2000:] + result.stderr.decode()[-2000:]
    if outcome is not None:
        outcome.append(result)
    report = json.loads(out.read_text())["server_scan_results"][0]
    assert report["scan_status"] == "COMPLETED", report
    return report["scan_result"]


@pytest.mark.slow
def test_sslyze_finds_only_modern_tls_on_an_inbound_listener(world: World, tmp_path: Path, request) -> None:
    """sslyze's protocol, cipher and vulnerability scans (no client certificate needed for those),
    then its renegotiation scan with an allowed client certificate."""
    from tests.hostile import opt_in_slow

    opt_in_slow(request)
    scan = _sslyze(world, tmp_path, "scan")
    for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert scan[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"] == [], version
    tls12 = [s["cipher_suite"]["openssl_name"] for s in scan["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]]
    assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in tls12), tls12
    assert scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]
    assert scan["tls_compression"]["result"]["supports_compression"] is False
    assert scan["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
    assert scan["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"] is False
    assert scan["robot"]["result"]["robot_result"].startswith("NOT_VULNERABLE")
    assert scan["tls_fallback_scsv"]["result"]["supports_fallback_scsv"] is True
    assert scan["tls_extended_master_secret"]["result"]["supports_ems_extension"] is True
    key = str(world.orders.with_suffix(".key"))
    reneg = _sslyze(world, tmp_path, "reneg", "--reneg", f"--cert={world.orders}", f"--key={key}")
    result = reneg["session_renegotiation"]["result"]
    assert result["is_vulnerable_to_client_renegotiation_dos"] is False
    assert world.gateway.alive()
    world.assert_still_serving()


def _mozilla_intermediate(sslyze: str) -> dict:
    """Mozilla's "intermediate" configuration as the sslyze in use ships it (its newest version)."""
    import json

    script = (
        "import importlib.resources as r, json; d = r.files('sslyze.mozilla_tls_profile'); "
        "newest = max((p for p in d.iterdir() if p.name.endswith('.json')), "
        "key=lambda p: tuple(int(n) for n in p.name[:-5].split('.'))); "
        "print(json.dumps(json.loads(newest.read_text())['configurations']['intermediate']))"
    )
    python = Path(sslyze).resolve().with_name("python")
    result = subprocess.run([str(python), "-c", script], capture_output=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"cannot read sslyze's Mozilla profiles: {result.stderr.decode()[-300:]}")
    return json.loads(result.stdout)


@pytest.mark.slow
def test_sslyze_finds_the_pinned_groups_no_resumption_and_mozillas_intermediate_profile(
    world: World, tmp_path: Path, request
) -> None:
    """Key exchange groups are X25519, P-256 and P-384 only; no session is ever resumed (with an
    allowed client certificate); and what sslyze finds fits Mozilla's "intermediate" configuration:
    versions, TLS 1.2 ciphers, TLS 1.3 suites, key exchange groups, the certificate's key, curve,
    signature and lifespan. (sslyze's own compliance check cannot run here: it needs a
    renegotiation scan, which needs a client certificate, with which its SSL 2.0 scan fails.)"""
    import shutil

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import SignatureAlgorithmOID

    from tests.hostile import opt_in_slow

    opt_in_slow(request)
    scan = _sslyze(world, tmp_path, "profile")
    curves = scan["elliptic_curves"]["result"]
    assert sorted(c["name"] for c in curves["supported_curves"]) == ["X25519", "secp256r1", "secp384r1"]
    assert "secp521r1" in {c["name"] for c in curves["rejected_curves"]}
    key = str(world.orders.with_suffix(".key"))
    resumption = _sslyze(world, tmp_path, "resum", "--resum", f"--cert={world.orders}", f"--key={key}")
    result = resumption["session_resumption"]["result"]
    assert (result["session_id_resumption_result"], result["tls_ticket_resumption_result"]) == (
        "NOT_SUPPORTED",
        "NOT_SUPPORTED",
    ), result
    assert result["session_id_successful_resumptions_count"] == result["tls_ticket_successful_resumptions_count"] == 0

    profile = _mozilla_intermediate(os.environ.get("S2SGW_SSLYZE") or shutil.which("sslyze") or "sslyze")
    versions = {"tls_1_2": "TLSv1.2", "tls_1_3": "TLSv1.3", "tls_1_1": "TLSv1.1", "tls_1_0": "TLSv1", "ssl_3_0": "SSLv3"}
    offered = {name for key_, name in versions.items() if scan[f"{key_}_cipher_suites"]["result"]["accepted_cipher_suites"]}
    assert offered == set(profile["tls_versions"]), offered
    tls12 = {s["cipher_suite"]["openssl_name"] for s in scan["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]}
    assert tls12 and tls12 <= set(profile["ciphers"]["openssl"]), tls12
    tls13 = {s["cipher_suite"]["name"] for s in scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]}
    assert tls13 and tls13 <= set(profile["ciphersuites"]), tls13
    groups = {{"secp256r1": "prime256v1"}.get(c["name"], c["name"]) for c in curves["supported_curves"]}
    assert groups <= set(profile["tls_curves"]), groups
    deployment = scan["certificate_info"]["result"]["certificate_deployments"][0]
    leaf = x509.load_pem_x509_certificate(deployment["received_certificate_chain"][0]["as_pem"].encode())
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and "ecdsa" in profile["certificate_types"]
    assert {"secp256r1": "prime256v1"}.get(public_key.curve.name, public_key.curve.name) in profile["certificate_curves"]
    signatures = {
        SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
        SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
        SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
        SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    }
    assert signatures.get(leaf.signature_algorithm_oid) in profile["certificate_signatures"]
    lifespan = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifespan.days <= profile["maximum_certificate_lifespan"]
    assert world.gateway.alive()
    world.assert_still_serving()
