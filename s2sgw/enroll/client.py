"""An EST client (RFC 7030) over treq whose only trust is one root pinned by its fingerprint.

Two TLS policies that are never mixed. :class:`BootstrapTLS` verifies nothing; it serves one
request only, the first ``GET /cacerts`` of ``s2sgw enroll``, whose answer counts only if a root
in it has the pinned SHA-256 fingerprint (as ``step ca bootstrap --fingerprint``). :class:`PinnedTLS`
trusts that root alone, checks the server's certificate against the URL's host (DNS name or IP
address) with our own verify callback that fails closed, and, for renewal, presents the current
certificate. A token or a client certificate only ever travels under :class:`PinnedTLS`.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from s2sgw import pki, tls
from s2sgw.errors import S2sgwError
from s2sgw.wire import est
from s2sgw.wire.failover import Failover
from s2sgw.wire.http import read_limited

MAX_ANSWER_BYTES = 256 * 1024
DEFAULT_TIMEOUT = 30.0
KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa3072", "ed25519")

UNREACHABLE, REFUSED, INVALID = "unreachable", "refused", "invalid"


class ESTError(S2sgwError):
    """An EST exchange failed. ``kind``: ``unreachable`` (connection, TLS or timeout: the next
    URL is tried), ``refused`` (the server answered with an error status) or ``invalid`` (an
    answer we must not use)."""

    def __init__(self, message: str, kind: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


# -- keys and requests -----------------------------------------------------------------------------


def new_key(key_type: str = "ecdsa-p256") -> pki.PrivateKey:
    """A fresh private key. Blocking (RSA takes a while): call it in a thread on a reactor."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")


def key_type_of(key: pki.PrivateKey) -> str:
    """The key type to renew ``key`` with: the same kind, at least the policy's minimum size."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return "ecdsa-p384"
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa3072"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return "ecdsa-p256"


def make_csr(key: pki.PrivateKey, name: str | None) -> x509.CertificateSigningRequest:
    """A PKCS#10 request with CN=``name`` (or an empty subject) and no extensions: the CA decides
    every name the certificate carries."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    algorithm: hashes.HashAlgorithm | None = hashes.SHA256()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = None
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        algorithm = hashes.SHA384()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def key_pem(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certs_pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


# -- reading answers -------------------------------------------------------------------------------


def display_fingerprint(fingerprint: str) -> str:
    """``AB:CD:...``: a fingerprint the way ``openssl x509 -noout -fingerprint -sha256`` prints it."""
    return ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()


def pinned_root(certificates: Sequence[x509.Certificate], fingerprint: str) -> x509.Certificate:
    """The root of a ``/cacerts`` answer whose SHA-256 fingerprint is ``fingerprint``; ESTError if none."""
    roots = est.roots_in(list(certificates))
    for root in roots:
        if est.fingerprint(root) == fingerprint:
            return root
    offered = ", ".join(display_fingerprint(est.fingerprint(root)) for root in roots) or "no root at all"
    raise ESTError(
        f"no root in the CA's /cacerts answer has the pinned fingerprint {display_fingerprint(fingerprint)} "
        f"(offered: {offered})",
        INVALID,
    )


def issued_chain(
    certificates: Sequence[x509.Certificate],
    key: pki.PrivateKey,
    roots: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> list[x509.Certificate]:
    """Leaf (the certificate for ``key``) + intermediates of an enrollment answer, verified
    against ``roots``; ESTError (invalid) when the answer is not a usable certificate for us."""
    leaf = est.certificate_for_key(list(certificates), key.public_key())
    if leaf is None:
        raise ESTError("the CA's answer holds no certificate for the key we sent", INVALID)
    chain = est.chain_for(leaf, list(certificates))
    try:
        pki.verify_chain(chain, roots, now)
    except pki.PKIError as error:
        raise ESTError(f"the issued certificate does not verify against the pinned root: {error}", INVALID) from None
    if not pki.has_san(leaf) or pki.is_ca(leaf):
        raise ESTError("the issued certificate is not a service certificate (no SAN, or a CA)", INVALID)
    return chain


# -- TLS ---------------------------------------------------------------------------------------------


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(tls.TLS12_CIPHERS)
    return context


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class _Creator:
    context: SSL.Context
    host: str

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        name = tls.sni_name(self.host)
        if name is not None:
            connection.set_tlsext_host_name(name)
        connection.set_connect_state()
        return connection


def _host(hostname: bytes | str) -> str:
    text = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
    return text.strip("[]")


@attrs.frozen
class _ServerCheck:
    """Verify callback: OpenSSL's chain verdict against the pinned root, then the server's name
    against the host we dialled. Any exception refuses; the reason is kept for the error message."""

    host: str
    problems: list[str]

    def __call__(self, connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        try:
            if not ok:
                _, words = tls.reason_for_verify_error(errno)
                self.problems.append(f"the EST server's certificate does not verify against the pinned root: {words}")
                return False
            if depth == 0:
                leaf = certificate.to_cryptography()
                try:
                    address = ipaddress.ip_address(self.host)
                except ValueError:
                    verify_certificate_hostname(leaf, self.host)
                else:
                    verify_certificate_ip_address(leaf, str(address))
            return True
        except BaseException as error:
            try:
                self.problems.append(f"the EST server's certificate is not valid for {self.host} ({type(error).__name__})")
            except BaseException:
                pass
            return False


@implementer(IPolicyForHTTPS)
@attrs.frozen
class PinnedTLS:
    """Trust ``roots`` only (the pinned root), check the host name; present ``chain``/``key`` if given."""

    roots: tuple[x509.Certificate, ...]
    chain: tuple[x509.Certificate, ...] = ()
    key: Any = attrs.field(default=None, repr=False)
    problems: list[str] = attrs.field(factory=list, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.roots:
            raise ValueError("PinnedTLS needs the pinned root")

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = _host(hostname)
        context = _base_context()
        store = context.get_cert_store()  # empty: no system roots
        assert store is not None
        for root in self.roots:
            store.add_cert(crypto.X509.from_cryptography(root))
        context.set_verify(SSL.VERIFY_PEER, _ServerCheck(host, self.problems))
        context.set_verify_depth(tls.VERIFY_DEPTH)
        if self.chain:
            context.use_certificate(self.chain[0])
            for intermediate in self.chain[1:]:
                context.add_extra_chain_cert(intermediate)
            context.use_privatekey(self.key)
            context.check_privatekey()
        return _Creator(context, host)


@implementer(IPolicyForHTTPS)
@attrs.frozen
class BootstrapTLS:
    """No verification at all. Only for the first ``/cacerts`` of an enrollment, which is then
    judged by the pinned fingerprint; :class:`ESTClient` never sends a secret under it."""

    problems: list[str] = attrs.field(factory=list, eq=False, repr=False)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        context = _base_context()
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        return _Creator(context, _host(hostname))


# -- requests ----------------------------------------------------------------------------------------


def operation_url(base: str, operation: str) -> str:
    """``https://host:port`` + ``/.well-known/est/OPERATION`` (a base already ending in the
    well-known path, perhaps with a CA label, is kept as it is)."""
    parts = urllib.parse.urlsplit(base)
    path = parts.path.rstrip("/")
    if est.WELL_KNOWN not in path:
        path += est.WELL_KNOWN
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{path}/{operation}", "", ""))


def default_http(reactor: Any, policy: Any, timeout: float) -> Any:
    """A treq client that dials with ``policy`` and keeps no connection for later."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=timeout))


@attrs.define(eq=False)
class ESTClient:
    """EST requests to ``urls`` (tried in order while they are unreachable) under ``tls``.

    ``http(policy)`` returns a treq-like client (``request``); by default a real one over
    ``reactor``. Every request gets ``timeout`` seconds. ``servers``, when given, is the
    :class:`~s2sgw.wire.failover.Failover` over ``urls`` kept by a long-lived caller (renewal):
    requests start at the server in use and it moves on and back like the status servers'.
    """

    urls: tuple[str, ...]
    reactor: Any
    tls: PinnedTLS | BootstrapTLS
    timeout: float = DEFAULT_TIMEOUT
    http: Callable[[Any], Any] | None = None
    servers: Failover | None = None

    def cacerts(self) -> Deferred[list[x509.Certificate]]:
        """The CA's certificates (roots and issuing intermediates)."""
        return defer.ensureDeferred(self._fetch(est.CACERTS, None, {}))

    def simpleenroll(self, csr: x509.CertificateSigningRequest, name: str, token: str) -> Deferred[list[x509.Certificate]]:
        """A first certificate, authorized by a one-time token (HTTP Basic ``NAME:TOKEN``)."""
        if not isinstance(self.tls, PinnedTLS):
            return defer.fail(ESTError("refusing to send a token before the CA's root is pinned", INVALID))
        basic = base64.b64encode(f"{name}:{token}".encode()).decode("ascii")
        headers = {"Authorization": [f"Basic {basic}"]}
        return defer.ensureDeferred(self._fetch(est.SIMPLEENROLL, est.encode_csr(csr), headers))

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> Deferred[list[x509.Certificate]]:
        """A renewed certificate, authorized by the TLS client certificate of ``tls``."""
        if not isinstance(self.tls, PinnedTLS) or not self.tls.chain:
            return defer.fail(ESTError("renewal needs the pinned root and the current certificate", INVALID))
        return defer.ensureDeferred(self._fetch(est.SIMPLEREENROLL, est.encode_csr(csr), {}))

    async def _fetch(self, operation: str, body: bytes | None, headers: dict[str, list[str]]) -> list[x509.Certificate]:
        if not self.urls:
            raise ESTError("no EST server configured", UNREACHABLE)
        servers = self.servers if self.servers is not None else Failover(self.urls, self.reactor, label="EST server")
        unreachable: list[str] = []

        async def once(base: str) -> list[x509.Certificate]:
            try:
                return await self._once(operation_url(base, operation), body, headers)
            except ESTError as error:
                if error.kind == UNREACHABLE:
                    unreachable.append(f"{base}: {error}")
                raise

        def unreachable_only(failure: Failure) -> bool:
            return failure.check(ESTError) is not None and failure.value.kind == UNREACHABLE

        try:
            return await servers.request(lambda base: defer.ensureDeferred(once(base)), unreachable_only)
        except ESTError as error:
            if error.kind != UNREACHABLE:
                raise
            raise ESTError("; ".join(unreachable), UNREACHABLE) from None
        finally:
            if servers is not self.servers:
                servers.stop()  # this one lives for one request: no background check

    async def _once(self, url: str, body: bytes | None, headers: dict[str, list[str]]) -> list[x509.Certificate]:
        http = self.http(self.tls) if self.http is not None else default_http(self.reactor, self.tls, self.timeout)
        sent = dict(headers)
        if body is not None:
            sent["Content-Type"] = [est.CSR_CONTENT_TYPE]
            sent["Content-Transfer-Encoding"] = [est.TRANSFER_ENCODING]
        del self.tls.problems[:]
        d = defer.maybeDeferred(http.request, "POST" if body is not None else "GET", url, data=body, headers=sent)
        d.addCallback(_answer)
        d.addTimeout(self.timeout, self.reactor)
        try:
            code, answer, retry_after = await d
        except ESTError:
            raise
        except defer.TimeoutError:
            raise ESTError(f"no answer within {self.timeout:g} s", UNREACHABLE) from None
        except Exception:
            problem = self.tls.problems[0] if self.tls.problems else _describe(Failure())
            raise ESTError(problem, UNREACHABLE) from None
        if code != 200:
            raise ESTError(
                f"HTTP {code} from {url}{_said(answer)}", REFUSED, status=code, retry_after=retry_after
            )
        try:
            return est.decode_certs_only(answer)
        except est.WireFormatError as error:
            raise ESTError(f"unusable answer from {url}: {error}", INVALID) from None


def _answer(response: Any) -> Deferred[tuple[int, bytes, float | None]]:
    retry_after = _retry_after(response.headers.getRawHeaders(b"Retry-After", [b""])[0])
    code = response.code
    return read_limited(response, MAX_ANSWER_BYTES).addCallback(lambda body: (code, body, retry_after))


def _retry_after(value: bytes | str) -> float | None:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        seconds = float(text.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _said(body: bytes) -> str:
    """The first line of an error answer, printable and short, for the error message."""
    line = body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    line = "".join(ch if ch.isprintable() else "?" for ch in line)[:200]
    return f": {line}" if line else ""


def _describe(failure: Failure) -> str:
    """One line for a transport failure (Agent wraps its causes in a list of Failures)."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    if failure.check(SSL.Error):
        return f"TLS handshake failed: {tls._ssl_error_text(failure.value)}"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}".rstrip(": ")
