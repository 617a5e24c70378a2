"""Shared pieces of the hostile-peer suite (tests/test_hostile_*.py).

- :class:`RecordingBackend`: a TCP backend in a thread that records every byte it receives (in
  memory and in a file), so a test can prove that nothing of a refused peer got through.
- :class:`Gateway`: one real ``twistd s2sgw`` process with short timeouts, and a tail of its
  audit log that only looks at lines written after a mark.
- TLS clients that misbehave on purpose: Python's ``ssl`` (OpenSSL underneath) for certificate
  cases, ``openssl s_client`` for protocol cases, and a pyOpenSSL client that presents a
  certificate without holding its key.

Every refusal case follows the same shape: mark the audit log and snapshot the backend, misbehave,
wait for the audit line with the expected reason, check the backend saw nothing new, and check that
an allowed client is still served.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import socket
import ssl
import struct
import subprocess
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e import BIN, TRUST_DOMAIN, Pki, Processes, free_port, rss_kib

__all__ = ["BIN", "TRUST_DOMAIN", "Pki", "Processes", "free_port", "rss_kib"]  # re-exported from tests.e2e

UTC = datetime.UTC
HOSTILE = b"HOSTILE-BYTES "  # every hostile client sends this; no backend may ever see it


def marker(case: str) -> bytes:
    return HOSTILE + case.encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# Backends


@attrs.define(eq=False)
class BackendConnection:
    index: int
    data: bytearray = attrs.Factory(bytearray)
    closed: threading.Event = attrs.Factory(threading.Event)
    sent: int = 0


class RecordingBackend:
    """A TCP backend in daemon threads that records every byte it receives.

    Modes: ``echo`` answers ``echo:`` then echoes every byte; ``silent`` accepts and never reads
    (notices only the peer going away); ``flood`` never reads and sends until the peer is gone;
    ``reset`` closes each connection at once with a TCP RST.
    """

    def __init__(self, log_path: Path, mode: str = "echo") -> None:
        self.mode = mode
        self.log_path = log_path
        self.connections: list[BackendConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"backend-{mode}", daemon=True)
        self._thread.start()

    # -- what it saw

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return len(self.connections), sum(len(c.data) for c in self.connections)

    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.data) for c in self.connections)

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self.connections if not c.closed.is_set())

    def assert_untouched_since(self, before: tuple[int, int]) -> None:
        """No new connection and no new byte since ``before`` (a :meth:`snapshot`)."""
        now = self.snapshot()
        assert now == before, f"the backend was reached: (connections, bytes) {before} -> {now}"
        assert HOSTILE not in self.received()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    # -- serving

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                connection = BackendConnection(len(self.connections))
                self.connections.append(connection)
            threading.Thread(target=self._serve, args=(sock, connection), daemon=True).start()

    def _record(self, connection: BackendConnection, data: bytes) -> None:
        with self._lock:
            connection.data += data
            with open(self.log_path, "ab") as out:
                out.write(b"%d %d %r\n" % (connection.index, len(data), data[:200]))

    def _serve(self, sock: socket.socket, connection: BackendConnection) -> None:
        try:
            with sock:
                getattr(self, f"_serve_{self.mode}")(sock, connection)
        except OSError:
            pass
        finally:
            connection.closed.set()

    def _serve_echo(self, sock: socket.socket, connection: BackendConnection) -> None:
        sock.settimeout(0.2)
        greeted = False
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            self._record(connection, data)
            sock.sendall(data if greeted else b"echo:" + data)
            greeted = True

    def _serve_silent(self, sock: socket.socket, connection: BackendConnection) -> None:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not self._stop.is_set():
            if poller.poll(200):
                return

    def _serve_flood(self, sock: socket.socket, connection: BackendConnection) -> None:
        chunk = os.urandom(64 * 1024)
        sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                connection.sent += sock.send(chunk)
            except TimeoutError:
                continue

    def _serve_reset(self, sock: socket.socket, connection: BackendConnection) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---------------------------------------------------------------------------------------------
# Gateways


def gateway_toml(
    trust: Path,
    services: str,
    *,
    status: str = 'mode = "off"',
    handshake: float = 1,
    connect: float = 1,
    idle: float = 30,
    drain: float = 1,
    extra: str = "",
) -> str:
    return (
        f'trust = "{trust}"\n{extra}\n'
        + f"[status]\n{status}\n"
        + f"[timeouts]\nhandshake = {handshake}\nconnect = {connect}\nidle = {idle}\ndrain = {drain}\n"
        + textwrap.dedent(services)
    )


def service_toml(name: str, cert: Path, key: Path, routes: str) -> str:
    return f'\n[[service]]\nname = "{name}"\ncert = "{cert}"\nkey = "{key}"\n' + textwrap.dedent(routes)


def inbound_toml(
    name: str, port: int, backend_port: int, allow: list[str], max_connections: int = 1024, max_pending: int = 1024
) -> str:
    allowed = ", ".join(f'"{a}"' for a in allow)
    return (
        f'\n[[service.inbound]]\nname = "{name}"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'backend = "tcp:127.0.0.1:{backend_port}"\nallow = [{allowed}]\nmax_connections = {max_connections}\n'
        f"max_pending = {max_pending}\n"
    )


def outbound_toml(name: str, port: int, remote_port: int, peer: str) -> str:
    return (
        f'\n[[service.outbound]]\nname = "{name}"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'remote = "tcp:127.0.0.1:{remote_port}"\npeer = "{peer}"\n'
    )


@attrs.define(eq=False)
class Gateway:
    """One ``twistd s2sgw`` process of a test module."""

    procs: Processes
    name: str
    config: Path
    ports: list[int]

    @classmethod
    def start(cls, procs: Processes, name: str, toml: str, ports: list[int], *extra: str) -> Gateway:
        config = procs.directory / f"{name}.toml"
        config.write_text(toml)
        # Logs to stdout (NAME.out): a log file would rotate at 1 MB under the mark's feet.
        procs.start(
            name,
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", *extra, "s2sgw", "--config", str(config)],
        )
        gateway = cls(procs, name, config, ports)
        for port in ports:
            procs.wait_port(port)
        return gateway

    @property
    def pid(self) -> int:
        return self.procs.running[self.name].pid

    def alive(self) -> bool:
        return self.procs.running[self.name].poll() is None

    def log(self) -> str:
        """The complete lines logged so far (a line being written is left for the next read)."""
        path = self.procs.directory / f"{self.name}.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[: text.rfind("\n") + 1]

    def audit_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "s2sgw.audit" in line]

    def mark(self) -> int:
        """A position in the log; :meth:`wait_audit` only looks at lines after it."""
        return len(self.log().splitlines())

    def lines_since(self, mark: int) -> list[str]:
        return self.log().splitlines()[mark:]

    def wait_log(self, mark: int, *needles: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines_since(mark):
                if all(needle in line for needle in needles):
                    return line
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines_since(mark)[-40:])
                raise AssertionError(f"no log line with {needles} in {self.name} after the mark:\n{tail}")
            time.sleep(0.05)

    def wait_audit(self, mark: int, route: str, *needles: str, timeout: float = 10.0) -> str:
        return self.wait_log(mark, "s2sgw.audit", f"route={route} ", *needles, timeout=timeout)

    def wait_audits(self, mark: int, route: str, needle: str, count: int, timeout: float = 10.0) -> list[str]:
        """Wait for ``count`` audit lines of ``route`` containing ``needle`` after the mark; return them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.audits_since(mark, route) if needle in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def audits_since(self, mark: int, route: str) -> list[str]:
        return [line for line in self.lines_since(mark) if "s2sgw.audit" in line and f"route={route} " in line]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def reason_of(line: str) -> str:
    return line.split(" reason=", 1)[1].split(" ", 1)[0]


# ---------------------------------------------------------------------------------------------
# TLS clients


def client_context(
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    *,
    weak: bool = False,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context; ``weak`` drops OpenSSL's security level so we may *present* weak material."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca is not None:
        context.load_verify_locations(ca)
    else:
        context.verify_mode = ssl.CERT_NONE
    if weak:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@attrs.frozen
class Exchange:
    handshake: bool  # as far as the client could tell
    received: bytes
    error: str | None
    seconds: float


def tls_exchange(
    port: int,
    context: ssl.SSLContext,
    payload: bytes,
    *,
    expect: int | None = None,
    timeout: float = 5.0,
    server_hostname: str = "users",
) -> Exchange:
    """Connect, handshake, send ``payload``, read until EOF, error, ``expect`` bytes or timeout."""
    started = time.monotonic()
    received = bytearray()
    handshake = False
    error: str | None = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
                handshake = True
                tls.sendall(payload)
                while expect is None or len(received) < expect:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    received += chunk
    except (ssl.SSLError, OSError) as e:  # a reset can come at connect, handshake, send or receive
        error = repr(e)
    return Exchange(handshake, bytes(received), error, time.monotonic() - started)


def assert_refused(exchange: Exchange, within: float = 4.0) -> None:
    """The gateway closed on the client quickly and sent it no application byte."""
    assert exchange.received == b"", exchange
    assert exchange.error is None or "timed out" not in exchange.error, exchange
    assert exchange.seconds < within, exchange


def roundtrip(port: int, context: ssl.SSLContext, *, server_hostname: str = "users") -> None:
    """An allowed client's bytes reach the echo backend and its answer comes back intact."""
    payload = b"allowed " + uuid.uuid4().hex.encode()
    expected = b"echo:" + payload
    exchange = tls_exchange(port, context, payload, expect=len(expected), server_hostname=server_hostname)
    assert exchange.received == expected, exchange


def plain_exchange(port: int, payload: bytes, *, expect: int | None = None, timeout: float = 5.0) -> Exchange:
    """The same over plain TCP (outbound routes' local side, garbage to TLS ports)."""
    started = time.monotonic()
    received = bytearray()
    error = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            while expect is None or len(received) < expect:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    except OSError as e:
        error = repr(e)
    return Exchange(True, bytes(received), error, time.monotonic() - started)


def s_client(
    port: int, *args: str, stdin: bytes = b"", timeout: float = 20, linger: float | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``openssl s_client``; with ``linger`` it is stopped after that many seconds (for
    ``-ign_eof`` sessions the server keeps open) and its output so far is returned."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "users", *args]
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=linger or timeout)
    except subprocess.TimeoutExpired as stopped:
        if linger is None:
            raise
        return subprocess.CompletedProcess(argv, -9, stopped.stdout or b"", stopped.stderr or b"")


def s_client_supports(option: str) -> bool:
    """Whether this ``openssl s_client`` knows ``option`` (e.g. -ssl3 is often compiled out)."""
    result = subprocess.run(["openssl", "s_client", "-help"], capture_output=True, timeout=10)
    return any(line.split()[:1] == [option] for line in result.stderr.decode().splitlines())


def client_hello(server_hostname: str = "users") -> bytes:
    """The bytes of a real TLS ClientHello (OpenSSL's, via a memory BIO)."""
    from OpenSSL import SSL

    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_tlsext_host_name(server_hostname.encode())
    connection.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        connection.do_handshake()
    return connection.bio_read(65536)


def keyless_exchange(port: int, identity_pem: Path, payload: bytes, timeout: float = 5.0) -> Exchange:
    """Present the certificate in ``identity_pem`` while signing with a *different* key.

    OpenSSL refuses to load a key that does not match the certificate, so the context is built
    with a certificate object whose public key is swapped to ours, then swapped back: the wire
    carries the original, validly signed certificate, and CertificateVerify is signed by our key.
    """
    import warnings

    from OpenSSL import SSL, crypto

    chain = x509.load_pem_x509_certificates(identity_pem.read_bytes())
    stranger = ec.generate_private_key(ec.SECP256R1())
    original = crypto.X509.from_cryptography(chain[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        real_key = original.get_pubkey()
        original.set_pubkey(crypto.PKey.from_cryptography_key(stranger.public_key()))
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(original)
        context.use_privatekey(crypto.PKey.from_cryptography_key(stranger))
        original.set_pubkey(real_key)
    for certificate in chain[1:]:
        context.add_extra_chain_cert(certificate)
    started = time.monotonic()
    deadline = started + timeout
    # A socket with a timeout is non-blocking underneath, and OpenSSL reads its descriptor
    # directly: wait for it whenever OpenSSL would block, or the client gives up mid-handshake.
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()

    def waiting(call, *args):
        while True:
            try:
                return call(*args)
            except (SSL.WantReadError, SSL.WantWriteError) as want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the gateway did not answer in time") from None
                readable = isinstance(want, SSL.WantReadError)
                select.select([sock] if readable else [], [] if readable else [sock], [], left)

    received = bytearray()
    error = None
    handshake = False
    try:
        waiting(connection.do_handshake)
        handshake = True
        sent = connection.get_certificate()
        assert sent is not None and sent.to_cryptography() == chain[0], "the swap changed the certificate"
        waiting(connection.sendall, payload)
        while chunk := waiting(connection.recv, 65536):
            received += chunk
    except (SSL.Error, OSError) as e:
        error = repr(e)
    finally:
        sock.close()
    return Exchange(handshake, bytes(received), error, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# Odd certificates signed by the real CA's keys


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def spiffe(name: str, domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{domain}/{name}"


def leaf_builder(
    name: str,
    public_key,
    issuer: x509.Certificate,
    issuer_key,
    *,
    sans: list[x509.GeneralName] | None = None,
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    ca: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    if sans is None:
        sans = [x509.UniformResourceIdentifier(spiffe(name)), x509.DNSName(name)]
    start = not_before or now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or now() + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder


def ca_builder(
    cn: str | x509.Name,
    public_key,
    issuer: x509.Certificate | None,
    issuer_key,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """A CA certificate (pathlen 0) for ``public_key``, signed later by ``issuer_key``; self-issued without ``issuer``."""
    start = not_before or now() - datetime.timedelta(days=1)
    subject = cn if isinstance(cn, x509.Name) else _name(cn)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )


def write_identity(directory: Path, name: str, chain: list[x509.Certificate], key) -> Path:
    """Write NAME.pem (chain) and NAME.key (0600); return the .pem path."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / f"{name}.pem"
    pem.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return pem


def resign_sha1(certificate: x509.Certificate, issuer_key) -> x509.Certificate:
    """``certificate`` signed again with SHA-1 (cryptography refuses to sign SHA-1 itself)."""
    import warnings

    from OpenSSL import crypto

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = crypto.X509.from_cryptography(certificate)
        legacy.sign(crypto.PKey.from_cryptography_key(issuer_key), "sha1")
        return legacy.to_cryptography()


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def sha256() -> hashes.SHA256:
    return hashes.SHA256()


def root_key(pki: Pki):
    return serialization.load_pem_private_key((pki.directory / "ca" / "root.key").read_bytes(), None)


# ---------------------------------------------------------------------------------------------
# Metrics (when the gateway serves an admin endpoint)


def metric(admin_port: int | None, name: str, **labels: str) -> float | None:
    """A sample from the admin endpoint's /metrics, or None when there is no admin endpoint."""
    if admin_port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def opt_in_slow(request: object) -> None:
    """Skip a ``@pytest.mark.slow`` test unless asked for: ``-m slow`` or ``S2SGW_SLOW=1``."""
    import pytest

    expression = request.config.getoption("markexpr") or ""  # type: ignore[attr-defined]
    if "slow" in expression and "not slow" not in expression:
        return
    if os.environ.get("S2SGW_SLOW") == "1":
        return
    pytest.skip("opt-in slow test: run with -m slow or S2SGW_SLOW=1")
