"""EST against the real `twistd s2sgw-ca --est`, driven by `curl` and `openssl`, which nobody here wrote."""

from __future__ import annotations

import base64
import datetime
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from s2sgw.ca.authority import CertificateAuthority

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TIMEOUT = 20
DOMAIN = "example.org"
EST = "/.well-known/est/"


def run(*args: str | Path, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def s2sgw(*args: str | Path) -> str:
    return run(BIN / "s2sgw", *args).stdout


def _wait(pattern: str, log: Path, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in the log:\n" + log.read_text(errors="replace"))


@attrs.define
class CA:
    root: Path
    ca: Path
    port: int
    status_port: int
    log: Path
    counter: int = 0

    def url(self, operation: str) -> str:
        return f"https://127.0.0.1:{self.port}{EST}{operation}"

    def path(self, name: str) -> Path:
        self.counter += 1
        return self.root / f"{self.counter}-{name}"

    def token(self, name: str, *args: str) -> str:
        return s2sgw("ca", "token", "--dir", self.ca, name, *args).strip()

    def csr(self, name: str, *req_args: str, newkey: str = "ec -pkeyopt ec_paramgen_curve:P-256") -> tuple[Path, Path]:
        """(base64 PKCS#10 body, key): `openssl req ... -outform DER | base64`, as an operator would."""
        body, key = self.path(f"{name}.b64"), self.path(f"{name}.key")
        extra = " ".join(req_args)
        run("bash", "-c", f"set -o pipefail; openssl req -new -newkey {newkey} -nodes -subj /CN={name} "
                          f"-keyout {key} {extra} -outform DER | base64 > {body}")  # fmt: skip
        return body, key

    def curl(self, operation: str, body: Path | None, *args: str) -> tuple[int, Path]:
        """(HTTP status, response body file) of `curl` against the EST listener, trusting bundle.pem."""
        out = self.path("response")
        data = ["-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}"] if body else []
        result = run("curl", "-sS", "--max-time", "10", "--cacert", self.ca / "bundle.pem", "-o", out,
                     "-w", "%{http_code}", *data, *args, self.url(operation), check=False)  # fmt: skip
        return int(result.stdout or 0), out

    def certificates(self, response: Path) -> list[x509.Certificate]:
        """`base64 -d | openssl pkcs7 -inform DER -print_certs`, then parsed."""
        pem = run("bash", "-c", f"set -o pipefail; base64 -d {response} | openssl pkcs7 -inform DER -print_certs")
        return x509.load_pem_x509_certificates(pem.stdout.encode())

    def rows(self) -> int:
        return len(CertificateAuthority.open(self.ca).records())

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if f"] {prefix}" in line]

    def wait_line(self, prefix: str, count: int) -> list[str]:
        deadline = time.monotonic() + 5
        while len(found := self.lines(prefix)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return found


def split(certificates: list[x509.Certificate], key: Path | None = None) -> tuple[x509.Certificate, x509.Certificate]:
    """(leaf, intermediate): PKCS#7 keeps no order, so the leaf is the one that is not a CA."""
    leaves = [c for c in certificates if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca]
    others = [c for c in certificates if c not in leaves]
    assert len(leaves) == 1 and len(others) == 1, certificates
    return leaves[0], others[0]


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def start(root: Path, name: str, *flags: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    log = root / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "s2sgw-ca", "--dir", str(root / "ca"),
             "--listen", "tcp:0:interface=127.0.0.1", "--est", "tcp:0:interface=127.0.0.1", *flags],
            stdout=out, stderr=subprocess.STDOUT, cwd=root,
        )  # fmt: skip
    status_port = int(_wait(r"StatusSite starting on (\d+)", log, process).group(1))
    port = int(_wait(r"EST listening on port (\d+)", log, process).group(1))
    return process, port, status_port, log


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def est(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    root = tmp_path_factory.mktemp("est-e2e")
    s2sgw("ca", "init", "--dir", root / "ca", "--trust-domain", DOMAIN)
    process, port, status_port, log = start(
        root, "twistd", "--est-lifetime", "60s", "--est-name", "localhost", "--est-name", "127.0.0.1",
        "--max-body", "16384",
    )  # fmt: skip
    try:
        yield CA(root, root / "ca", port, status_port, log)
    finally:
        stop(process, log)


@attrs.frozen
class Enrolled:
    chain: Path  # leaf then intermediate, for curl --cert
    key: Path
    leaf: x509.Certificate


def enroll(est: CA, name: str, *token_args: str) -> Enrolled:
    body, key = est.csr(name)
    status, response = est.curl("simpleenroll", body, "--user", f"{name}:{est.token(name, *token_args)}")
    assert status == 200, response.read_text()
    leaf, intermediate = split(est.certificates(response))
    return Enrolled(write_pem(est.path(f"{name}.pem"), leaf, intermediate), key, leaf)


# -- real clients get certificates ------------------------------------------------------------------


def test_curl_enrolls_with_a_token_and_openssl_verifies_the_certificate(est: CA) -> None:
    """curl --user NAME:TOKEN with an `openssl req` body; the CA-chosen names; OCSP says good at once."""
    token = est.token("orders", "--dns", "orders.svc.cluster.local")
    body, key = est.csr("orders")

    status, response = est.curl("simpleenroll", body, "--user", f"orders:{token}")

    assert status == 200, response.read_text()
    leaf, intermediate = split(est.certificates(response))
    leaf_pem = write_pem(est.path("leaf.pem"), leaf)
    intermediate_pem = write_pem(est.path("intermediate.pem"), intermediate)
    verified = run("openssl", "verify", "-CAfile", est.ca / "bundle.pem", "-untrusted", intermediate_pem, leaf_pem)
    assert verified.stdout.strip().endswith(": OK")
    shown = run("openssl", "x509", "-in", leaf_pem, "-noout", "-ext", "subjectAltName", "-serial").stdout
    assert (
        f"URI:spiffe://{DOMAIN}/orders, DNS:orders, DNS:orders.{DOMAIN}, DNS:orders.svc.cluster.local" in shown
    )
    serial = re.search(r"serial=([0-9A-F]+)", shown).group(1)
    (line,) = [line for line in est.wait_line("EST issued", 1) if f"serial={serial} " in line]
    assert f"identity=spiffe://{DOMAIN}/orders serial={serial} authorized=token client=127.0.0.1" in line
    answer = run("openssl", "ocsp", "-issuer", intermediate_pem, "-cert", leaf_pem, "-CAfile", est.ca / "bundle.pem",
                 "-url", f"http://127.0.0.1:{est.status_port}/ocsp", check=False)  # fmt: skip
    assert f"{leaf_pem}: good" in answer.stdout, answer.stdout + answer.stderr
    assert "s2sgw_" not in est.log.read_text()  # no token in the log


def test_curl_renews_with_its_current_certificate(est: CA) -> None:
    """curl --cert/--key on simplereenroll: a new serial for the new key, the same identity."""
    current = enroll(est, "billing", "--dns", "billing.svc")
    body, key = est.csr("billing")

    status, response = est.curl("simplereenroll", body, "--cert", str(current.chain), "--key", str(current.key))

    assert status == 200, response.read_text()
    leaf, intermediate = split(est.certificates(response))
    assert leaf.serial_number != current.leaf.serial_number
    assert leaf.subject == current.leaf.subject
    san = x509.SubjectAlternativeName
    assert leaf.extensions.get_extension_for_class(san) == current.leaf.extensions.get_extension_for_class(san)
    leaf_pem, inter_pem = write_pem(est.path("renewed.pem"), leaf), write_pem(est.path("i.pem"), intermediate)
    run("openssl", "verify", "-CAfile", est.ca / "bundle.pem", "-untrusted", inter_pem, leaf_pem)
    key_of_leaf = run("openssl", "x509", "-in", leaf_pem, "-noout", "-pubkey").stdout
    assert key_of_leaf == run("openssl", "pkey", "-in", key, "-pubout").stdout
    record = CertificateAuthority.open(est.ca).lookup(leaf.serial_number)
    assert record is not None and record.issued_via == "renewal"
    assert "authorized=renewal" in est.lines("EST issued")[-1]


def test_cacerts_decodes_with_openssl_and_holds_the_root_and_the_intermediate(est: CA) -> None:
    status, response = est.curl("cacerts", None)
    assert status == 200
    found = est.certificates(response)
    root = x509.load_pem_x509_certificate((est.ca / "root.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate((est.ca / "intermediate.pem").read_bytes())
    assert set(found) == {root, intermediate}
    headers = run("curl", "-sS", "-D", "-", "-o", "/dev/null", "--cacert", est.ca / "bundle.pem",
                  est.url("cacerts")).stdout.lower()  # fmt: skip
    assert "content-type: application/pkcs7-mime" in headers and "content-transfer-encoding: base64" in headers


# -- refusals: the right status, one log line, no certificate ----------------------------------------


def _bad_signature(est: CA, name: str) -> Path:
    body, _ = est.csr(name)
    der = bytearray(base64.b64decode(body.read_bytes()))
    der[-1] ^= 0x01
    body.write_bytes(base64.encodebytes(bytes(der)))
    return body


def _reused(est: CA) -> list[str]:
    token = est.token("reused")
    assert est.curl("simpleenroll", est.csr("reused")[0], "--user", f"reused:{token}")[0] == 200
    return ["simpleenroll", str(est.csr("reused")[0]), "--user", f"reused:{token}"]


def _expired(est: CA) -> list[str]:
    token = est.token("late", "--ttl", "1s")
    time.sleep(1.1)
    return ["simpleenroll", str(est.csr("late")[0]), "--user", f"late:{token}"]


def _revoked(est: CA) -> list[str]:
    current = enroll(est, "revoked")
    s2sgw("ca", "revoke", "--dir", est.ca, "revoked", "--reason", "keyCompromise")
    return ["simplereenroll", str(est.csr("revoked")[0]), "--cert", str(current.chain), "--key", str(current.key)]


def _expired_certificate(est: CA) -> list[str]:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)
    ca = CertificateAuthority.open(est.ca)
    out = est.path("old")
    ca.write_identity(ca.issue("old", hours=1, now=past), out)
    return ["simplereenroll", str(est.csr("old")[0]), "--cert", str(out / "old.pem"), "--key", str(out / "old.key")]


def _foreign(est: CA) -> list[str]:
    other = est.path("other")
    s2sgw("ca", "init", "--dir", other, "--trust-domain", DOMAIN)
    s2sgw("ca", "issue", "--dir", other, "--out", other / "out", "orders")
    return ["simplereenroll", str(est.csr("orders")[0]),
            "--cert", str(other / "out" / "orders.pem"), "--key", str(other / "out" / "orders.key")]  # fmt: skip


def _oversized(est: CA) -> list[str]:
    big = est.path("big.b64")
    big.write_bytes(b"A" * 100_000)
    return ["simpleenroll", str(big), "--user", f"big:{est.token('big')}"]


def _garbage(est: CA) -> list[str]:
    garbage = est.path("garbage.b64")
    garbage.write_bytes(b"%%% this is not base64 %%%\n")
    return ["simpleenroll", str(garbage), "--user", f"junk:{est.token('junk')}"]


REFUSALS = {
    "reused token": (_reused, 401, "token already used"),
    "expired token": (_expired, 401, "token expired"),
    "token for another name": (
        lambda est: ["simpleenroll", str(est.csr("mallory")[0]), "--user", f"mallory:{est.token('victim')}"],
        403, "token is bound to another name",
    ),
    "CSR asking for other names": (
        lambda est: ["simpleenroll", str(est.csr("greedy", "-addext", "subjectAltName=DNS:greedy,DNS:admin.example.org")[0]),
                     "--user", f"greedy:{est.token('greedy')}"],
        400, "names this CA does not issue",
    ),
    "RSA 1024 key": (
        lambda est: ["simpleenroll", str(est.csr("weak", newkey="rsa:1024")[0]), "--user", f"weak:{est.token('weak')}"],
        400, "RSA key of 1024 bits is too small",
    ),
    "secp256k1 key": (
        lambda est: ["simpleenroll", str(est.csr("k1", newkey="ec -pkeyopt ec_paramgen_curve:secp256k1")[0]),
                     "--user", f"k1:{est.token('k1')}"],
        400, "secp256k1 is not allowed",
    ),
    "bad CSR signature": (
        lambda est: ["simpleenroll", str(_bad_signature(est, "forger")), "--user", f"forger:{est.token('forger')}"],
        400, "CSR signature does not verify",
    ),
    "renewal with a revoked certificate": (_revoked, 403, "is revoked (keyCompromise)"),
    "renewal with an expired certificate": (_expired_certificate, 403, "expired: enroll again with a new token"),
    "renewal with another CA's certificate": (_foreign, 403, "does not chain to this CA"),
    "renewal without a client certificate": (
        lambda est: ["simplereenroll", str(est.csr("anonymous")[0])], 403, "no client certificate",
    ),
    "oversized body": (_oversized, 413, "body larger than 16384 bytes"),
    "garbage base64": (_garbage, 400, "not base64"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refusal_has_its_status_a_log_line_and_issues_nothing(est: CA, case: str) -> None:
    prepare, status, reason = REFUSALS[case]
    operation, body, *args = prepare(est)
    rows, refused = est.rows(), len(est.lines("EST refused"))

    got, response = est.curl(operation, Path(body), *args)

    assert got == status, response.read_text() if response.exists() else ""
    lines = est.wait_line("EST refused", refused + 1)
    assert len(lines) == refused + 1
    assert f"EST refused {operation} " in lines[-1] and f"status={status} reason=" in lines[-1] and reason in lines[-1]
    assert est.rows() == rows


def test_ten_concurrent_requests_with_one_token_get_one_certificate(est: CA) -> None:
    token = est.token("racer")
    bodies = [est.csr("racer")[0] for _ in range(10)]
    rows, refused = est.rows(), len(est.lines("EST refused"))
    processes = [
        subprocess.Popen(
            ["curl", "-sS", "--max-time", "15", "--cacert", str(est.ca / "bundle.pem"), "-o", "/dev/null",
             "-w", "%{http_code}", "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}",
             "--user", f"racer:{token}", est.url("simpleenroll")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        for body in bodies
    ]
    statuses = sorted(process.communicate(timeout=TIMEOUT)[0] for process in processes)

    assert statuses == ["200"] + ["401"] * 9
    assert est.rows() == rows + 1
    assert len(est.wait_line("EST refused", refused + 9)) == refused + 9


# -- the listener's own certificate -------------------------------------------------------------------


def _serial_and_cacerts(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    sock.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    serial = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
    return serial, head.split(b"\r\n")[0]


def test_the_listener_renews_its_own_certificate_and_live_connections_carry_on(tmp_path: Path) -> None:
    """A 3-second server certificate is replaced at 2 s; a keep-alive connection opened before keeps working."""
    s2sgw("ca", "init", "--dir", tmp_path / "ca", "--trust-domain", DOMAIN)
    process, port, _, log = start(tmp_path, "short", "--est-server-lifetime", "3s")
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca" / "bundle.pem"))

        def connect() -> ssl.SSLSocket:
            return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")

        with connect() as live:
            first, status = _serial_and_cacerts(live)
            assert status.endswith(b"200 OK")
            _wait(r"(?s)EST server certificate serial .*EST server certificate serial", log, process)
            with connect() as fresh:
                second, _ = _serial_and_cacerts(fresh)
            again, status = _serial_and_cacerts(live)
        assert second != first
        assert (again, status.endswith(b"200 OK")) == (first, True)
        renewed = CertificateAuthority.open(tmp_path / "ca").store.rows(kind="est-server")
        assert {first, second} <= {row.serial for row in renewed}
    finally:
        stop(process, log)
