"""The real `twistd s2sgw-ca` process, asked by the real `openssl ocsp` and `curl` over loopback."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TIMEOUT = 20


def run(*args: str | Path, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def s2sgw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "s2sgw", *args)


@attrs.frozen
class Server:
    root: Path
    ca: Path
    certs: Path
    foreign: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ocsp(self, name: str, *extra: str, issuer: Path | None = None, certs: Path | None = None) -> str:
        result = run(
            "openssl", "ocsp",
            "-issuer", issuer or self.ca / "intermediate.pem",
            "-cert", (certs or self.certs) / f"{name}.pem",
            "-url", f"{self.url}/ocsp",
            "-CAfile", self.ca / "bundle.pem",
            *extra,
            check=False,
        )  # fmt: skip
        return result.stdout + result.stderr

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run("curl", "-sS", "--max-time", "10", *args, check=False)


def _listening_port(log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"StatusSite starting on (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            pytest.fail("twistd exited early:\n" + log.read_text(errors="replace"))
        time.sleep(0.05)
    pytest.fail("twistd did not start listening:\n" + log.read_text(errors="replace"))


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                     f"{url}/healthz", check=False)  # fmt: skip
        if result.stdout == "200":
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail("status server never became healthy:\n" + log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ca-e2e")
    ca, certs, foreign = root / "ca", root / "certs", root / "foreign"
    s2sgw("ca", "init", "--dir", ca, "--trust-domain", "example.org")
    for name in ("alice", "bob", "carol"):
        s2sgw("ca", "issue", "--dir", ca, "--out", certs, name)
    s2sgw("ca", "init", "--dir", foreign, "--trust-domain", "example.org")
    s2sgw("ca", "issue", "--dir", foreign, "--out", foreign / "certs", "mallory")

    log = root / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "s2sgw-ca", "--dir", str(ca),
             "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=root,
        )  # fmt: skip
    try:
        port = _listening_port(log, process)
        server = Server(root, ca, certs, foreign, port, log)
        _wait_healthy(server.url, process, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


def test_openssl_with_a_nonce_gets_a_verified_good(server: Server) -> None:
    """`openssl ocsp` (nonce by default) verifies the signed answer and its echoed nonce."""
    out = server.ocsp("alice")
    assert "Response verify OK" in out
    assert "alice.pem: good" in out
    assert "nonce" not in out.lower()  # "WARNING: no nonce in response" / "Nonce Verify error"


def test_openssl_without_a_nonce_gets_a_verified_good(server: Server) -> None:
    out = server.ocsp("alice", "-no_nonce")
    assert "Response verify OK" in out
    assert "alice.pem: good" in out


def test_revocation_shows_within_a_second_without_restart(server: Server) -> None:
    """`s2sgw ca revoke` on the running server's CA is answered `revoked` with its reason within 1 s."""
    assert "bob.pem: good" in server.ocsp("bob", "-no_nonce")  # now cached as good

    s2sgw("ca", "revoke", "--dir", server.ca, "bob", "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    while True:
        # Time when the query that shows it was sent: the openssl process's own run time is not ours.
        elapsed = time.monotonic() - revoked_at
        out = server.ocsp("bob", "-no_nonce")
        if "bob.pem: revoked" in out or elapsed > 3:
            break
        time.sleep(0.05)
    assert "bob.pem: revoked" in out, out
    assert elapsed < 1.0, f"revocation took {elapsed:.2f} s to show"
    assert "Response verify OK" in out
    assert "Reason: keyCompromise" in out
    assert "bob.pem: revoked" in server.ocsp("bob")  # nonce answers agree

    crl_path = server.root / "after.crl"
    assert server.curl("-o", str(crl_path), f"{server.url}/crl").returncode == 0
    chain = server.root / "chain.pem"
    chain.write_bytes((server.ca / "intermediate.pem").read_bytes() + (server.ca / "root.pem").read_bytes())
    verified = run("openssl", "crl", "-inform", "DER", "-in", crl_path, "-CAfile", chain, "-noout", check=False)
    assert "verify OK" in verified.stdout + verified.stderr
    bob = x509.load_pem_x509_certificate((server.certs / "bob.pem").read_bytes())
    assert x509.load_der_x509_crl(crl_path.read_bytes()).get_revoked_certificate_by_serial_number(
        bob.serial_number
    ) is not None


@pytest.mark.parametrize("nonce", ["-nonce", "-no_nonce"])
def test_one_request_about_several_certificates_is_answered_about_each(server: Server, nonce: str) -> None:
    """RFC 6960 lets a request list several certificates: `openssl ocsp` with three gets one signed
    answer about all three, each with its own status (bob was revoked above, or now)."""
    run(BIN / "s2sgw", "ca", "revoke", "--dir", server.ca, "bob", "--reason", "keyCompromise", check=False)
    deadline = time.monotonic() + 5
    while "bob.pem: revoked" not in server.ocsp("bob", "-no_nonce") and time.monotonic() < deadline:
        time.sleep(0.05)
    out = server.ocsp("alice", nonce, "-cert", server.certs / "bob.pem", "-cert", server.certs / "carol.pem")
    assert "Response verify OK" in out, out
    assert "alice.pem: good" in out and "bob.pem: revoked" in out and "carol.pem: good" in out, out
    assert "nonce" not in out.lower(), out
    foreign = server.ocsp("alice", "-cert", server.foreign / "certs" / "mallory.pem")
    assert "alice.pem: good" in foreign and "mallory.pem: unknown" in foreign, foreign


def test_foreign_certificate_is_never_good(server: Server) -> None:
    """Another CA's certificate is `unauthorized` under its issuer and `unknown` under ours (same names)."""
    foreign_certs = server.foreign / "certs"
    out = server.ocsp("mallory", issuer=server.foreign / "intermediate.pem", certs=foreign_certs)
    assert "Responder Error: unauthorized" in out
    out = server.ocsp("mallory", certs=foreign_certs)  # CertID of our intermediate, a serial we never issued
    assert "mallory.pem: unknown" in out
    assert "Response verify OK" in out


def test_get_request_is_answered_with_cache_headers(server: Server) -> None:
    """A request saved by openssl and fetched with curl as GET /ocsp/{base64} verifies as `good`."""
    request, response = server.root / "carol.req", server.root / "carol.resp"
    run("openssl", "ocsp", "-issuer", server.ca / "intermediate.pem", "-cert", server.certs / "carol.pem",
        "-no_nonce", "-reqout", request)  # fmt: skip
    encoded = urllib.parse.quote(base64.b64encode(request.read_bytes()).decode(), safe="")

    fetched = server.curl("-D", "-", "-o", str(response), f"{server.url}/ocsp/{encoded}")

    headers = fetched.stdout.lower()
    assert fetched.returncode == 0 and headers.startswith("http/1.1 200")
    assert "content-type: application/ocsp-response" in headers
    assert re.search(r"cache-control: max-age=\d+", headers)
    assert "etag: " in headers and "last-modified: " in headers and "expires: " in headers
    out = run("openssl", "ocsp", "-respin", response, "-issuer", server.ca / "intermediate.pem",
              "-cert", server.certs / "carol.pem", "-CAfile", server.ca / "bundle.pem", check=False)  # fmt: skip
    assert "Response verify OK" in out.stdout + out.stderr
    assert "carol.pem: good" in out.stdout


def test_slow_clients_and_garbage_do_not_stop_answers(server: Server) -> None:
    """A stalled half request, random bytes and an oversized body leave other clients served."""
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /ocsp HTTP/1.1\r\nHost: ca\r\nContent-Length: 5000\r\n\r\n0")

        garbage = server.root / "garbage.bin"
        garbage.write_bytes(os.urandom(700))
        out = server.root / "garbage.resp"
        posted = server.curl("-o", str(out), "--data-binary", f"@{garbage}",
                             "-H", "Content-Type: application/ocsp-request", f"{server.url}/ocsp")  # fmt: skip
        assert posted.returncode == 0
        parsed = run("openssl", "ocsp", "-respin", out, "-resp_text", "-noverify", check=False)
        assert "malformedrequest" in (parsed.stdout + parsed.stderr).lower()

        big = server.root / "big.bin"
        big.write_bytes(b"\x30" * (1 << 20))
        refused = server.curl("-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{big}",
                              f"{server.url}/ocsp")  # fmt: skip
        assert refused.stdout.startswith("413")

        answer = server.ocsp("carol")
        assert "Response verify OK" in answer and "carol.pem: good" in answer
    finally:
        for sock in stalled:
            sock.close()


def test_bundle_and_health_are_served(server: Server) -> None:
    bundle = server.curl(f"{server.url}/bundle.pem")
    assert bundle.stdout == (server.ca / "bundle.pem").read_text()
    health = server.curl(f"{server.url}/healthz")
    assert '"status": "ok"' in health.stdout


def test_twistd_refuses_a_directory_that_is_not_a_ca(tmp_path: Path) -> None:
    """A wrong --dir stops twistd before it starts, with a message naming the problem."""
    result = run(BIN / "twistd", "-n", "--pidfile=", "s2sgw-ca", "--dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "not a usable CA directory" in result.stdout + result.stderr
