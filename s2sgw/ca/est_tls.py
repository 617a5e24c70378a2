"""The EST listener: HTTPS with a certificate the CA issues to itself and renews on its own.

The server certificate (serverAuth only, no service identity, so it can never pass as a
service) names each ``--est-name``; its key lives only in memory, and a fresh one comes with
every renewal, at two thirds of the certificate's lifetime. Each renewal builds a new
``SSL.Context`` and swaps it in: new handshakes use it, live connections keep theirs.

Clients may present a certificate (simplereenroll needs one) but need not (simpleenroll and
cacerts do not). The verify callback therefore accepts every chain and only *records* what
OpenSSL thought of it: the refusal of a foreign or broken certificate is an HTTP 403 with a
logged reason, not a bare TLS alert. Whether the certificate is really ours (the exact DER in
the store, unrevoked, unexpired) is decided by :class:`~s2sgw.ca.enroll.Enroller`.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from s2sgw.ca.authority import CertificateAuthority, validate_dns_name, validate_ip
from s2sgw.ca.enroll import PeerCertificate
from s2sgw.ca.publisher import InThread
from s2sgw.ca.store import EST_SERVER, Row
from s2sgw.serials import serial_text

DEFAULT_NAMES = ("localhost", "127.0.0.1")
DEFAULT_SERVER_LIFETIME = datetime.timedelta(hours=24)
RENEW_AT = 2 / 3
RETRY_FIRST, RETRY_MAX = 5.0, 300.0

# TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites all are).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:@SECLEVEL=2"
CHAIN_STATE = "s2sgw_est_chain"  # attribute on the TLS protocol: what verification found


def san_for(name: str) -> x509.GeneralName:
    """An IP address becomes an IP SAN, anything else a DNS SAN (validated either way)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return x509.DNSName(validate_dns_name(name))
    return x509.IPAddress(validate_ip(name))


@attrs.frozen
class Material:
    """One generation of the listener's identity, and the context built from it."""

    certificate: x509.Certificate
    context: SSL.Context


def issue_server_certificate(
    ca: CertificateAuthority, names: Sequence[str], lifetime: datetime.timedelta, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Sign and record (kind ``est-server``) a new server certificate with a new key. Blocking."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [san_for(name) for name in names]
    now = now.replace(microsecond=0)
    not_before = now - min(datetime.timedelta(minutes=5), lifetime / 10)
    intermediate = ca.intermediate_cert
    issuer_ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{ca.trust_domain} EST server")]))
        .issuer_name(intermediate.subject)
        .public_key(key.public_key())
        .serial_number(ca.serial_source())
        .not_valid_before(not_before)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        .sign(ca.intermediate_key, ca.hash_algorithm)
    )
    ca.store.insert(
        Row(
            serial=certificate.serial_number,
            kind=EST_SERVER,
            name=EST_SERVER,
            sans=tuple(f"{'IP' if isinstance(s, x509.IPAddress) else 'DNS'}:{s.value}" for s in sans),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            pem=certificate.public_bytes(serialization.Encoding.PEM),
            revoked_at=None,
            reason=None,
            revocation_seq=None,
        )
    )
    return certificate, key


def _record_chain(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    """Note OpenSSL's verdict on the client's chain on the TLS protocol; never fail the handshake."""
    state = getattr(connection.get_app_data(), CHAIN_STATE, None)
    if state is not None:
        if not ok:
            state["errors"].append(f"verify error {errno} at depth {depth}")
        elif depth == 0:
            state["leaf_ok"] = True
    return True


def server_context(
    chain: Sequence[x509.Certificate], key: Any, trusted: Sequence[x509.Certificate]
) -> SSL.Context:
    """TLS 1.2+, a client certificate asked for (not required) and checked against ``trusted``."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every connection proves its certificate anew
    context.set_session_id(b"s2sgw-est")
    context.set_cipher_list(CIPHERS)
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(key)
    context.check_privatekey()
    store = context.get_cert_store()  # empty: no system roots
    assert store is not None
    for certificate in trusted:
        store.add_cert(crypto.X509.from_cryptography(certificate))
        if certificate.issuer == certificate.subject:
            context.add_client_ca(certificate)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _record_chain)
    return context


def build_material(
    ca: CertificateAuthority, names: Sequence[str], lifetime: datetime.timedelta, now: datetime.datetime
) -> Material:
    """A new certificate and the context serving it, the bundle's roots trusted. Blocking."""
    certificate, key = issue_server_certificate(ca, names, lifetime, now)
    roots = x509.load_pem_x509_certificates((ca.directory / "bundle.pem").read_bytes())
    context = server_context([certificate, ca.intermediate_cert], key, [*roots, ca.intermediate_cert])
    return Material(certificate, context)


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class _CurrentContext:
    """Each connection starts from whatever context the listener holds at that moment."""

    listener: EstListener

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        material = self.listener.material
        assert material is not None  # the port opens only once there is material
        setattr(tls_protocol, CHAIN_STATE, {"errors": [], "leaf_ok": False})
        connection = SSL.Connection(material.context, None)
        connection.set_app_data(tls_protocol)
        connection.set_accept_state()
        return connection


def tls_peer(request: server.Request) -> PeerCertificate | None:
    """The client certificate of the connection ``request`` came on, with OpenSSL's verdict."""
    tls = request.channel.transport
    certificate = tls.getHandle().get_peer_certificate(as_cryptography=True)
    if certificate is None:
        return None
    state = getattr(tls, CHAIN_STATE, None) or {"errors": ["not verified"], "leaf_ok": False}
    chain_ok = bool(state["leaf_ok"]) and not state["errors"]
    return PeerCertificate(certificate, chain_ok, "; ".join(state["errors"]))


@attrs.define(eq=False, slots=False)
class EstListener(Service):
    """Issues its certificate, then listens; renews at two thirds of each certificate's life."""

    ca: CertificateAuthority
    names: tuple[str, ...]
    endpoint: IStreamServerEndpoint
    site: server.Site
    clock: IReactorTime
    in_thread: InThread
    lifetime: datetime.timedelta = DEFAULT_SERVER_LIFETIME

    material: Material | None = None
    port: Any = None
    _calls: dict[str, Any] = attrs.field(factory=dict)  # "renew" and "listen": pending delayed calls
    _retry: dict[str, float] = attrs.field(factory=dict)
    _binding: bool = False
    _stopped: bool = False

    _log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        self._stopped = False
        # Issuing writes to the store all day: keep it open (see CAStore.keep_open).
        self.in_thread(self.ca.store.keep_open).addErrback(
            lambda failure: self._log.failure("keeping the CA store open failed", failure)
        )
        self._renew()

    def stopService(self) -> Any:
        Service.stopService(self)
        self._stopped = True
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def _later(self, what: str, delay: float, f: Any) -> None:
        self._calls[what] = self.clock.callLater(delay, f)

    def _backoff(self, what: str) -> float:
        """5 s, then twice as long each time, at most 5 minutes; reset by a success."""
        delay = self._retry.get(what, RETRY_FIRST)
        self._retry[what] = min(RETRY_MAX, delay * 2)
        return delay

    def _renew(self) -> None:
        self._calls.pop("renew", None)
        d = self.in_thread(build_material, self.ca, self.names, self.lifetime, self._now())
        d.addCallbacks(self._renewed, self._renew_failed)
        d.addErrback(lambda failure: self._log.failure("EST listener renewal step failed", failure))

    def _renewed(self, material: Material) -> None:
        if self._stopped:
            return
        self.material = material
        self._retry.pop("renew", None)
        certificate = material.certificate
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        renew_at = start + (end - start) * RENEW_AT
        delay = max(1.0, (renew_at - self._now()).total_seconds())
        self._later("renew", delay, self._renew)
        self._log.info(
            "EST server certificate serial {serial} valid until {not_after}, renewed in {delay:.0f}s",
            serial=serial_text(certificate.serial_number),
            not_after=end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            delay=delay,
        )
        if self.port is None and not self._binding:
            self._listen()

    def _renew_failed(self, failure: Failure) -> None:
        if self._stopped:
            return
        retry = self._backoff("renew")
        self._log.failure("EST server certificate not issued; retrying in {retry:g}s", failure, retry=retry)
        self._later("renew", retry, self._renew)

    def _listen(self) -> None:
        """Open the port (once there is a certificate); a failure to bind is retried, not fatal."""
        self._calls.pop("listen", None)
        self._binding = True
        d = self.endpoint.listen(TLSMemoryBIOFactory(_CurrentContext(self), False, self.site))
        d.addCallbacks(self._listening, self._listen_failed)

    def _listening(self, port: Any) -> None:
        self._binding = False
        if self._stopped:
            port.stopListening()
            return
        self.port = port
        self._retry.pop("listen", None)
        self._log.info("EST listening on port {port}", port=port.getHost().port)

    def _listen_failed(self, failure: Failure) -> None:
        self._binding = False
        if self._stopped:
            return
        retry = self._backoff("listen")
        self._log.failure("EST listener cannot listen; retrying in {retry:g}s", failure, retry=retry)
        self._later("listen", retry, self._listen)


def est_service(
    ca: CertificateAuthority,
    *,
    endpoint: str,
    names: Sequence[str],
    lifetime: datetime.timedelta,
    server_lifetime: datetime.timedelta,
    rate_limit: int,
    max_body: int,
    timeout: float,
    in_thread: InThread,
    reactor: Any,
) -> EstListener:
    """Everything ``--est`` adds to the CA server, wired."""
    from s2sgw.ca.enroll import Enroller, RateLimiter
    from s2sgw.ca.est import EstSite, build_est_root
    from s2sgw.ca.tokens import TokenBook

    enroller = Enroller(ca, TokenBook(ca.store), lifetime=lifetime, limiter=RateLimiter(limit=rate_limit))
    root = build_est_root(enroller, in_thread, reactor, tls_peer)
    site = EstSite(root, max_body=max_body, timeout=timeout, reactor=reactor)
    return EstListener(
        ca=ca,
        names=tuple(names),
        endpoint=endpoint_for(reactor, endpoint),
        site=site,
        clock=reactor,
        in_thread=in_thread,
        lifetime=server_lifetime,
    )


def endpoint_for(reactor: Any, description: str) -> IStreamServerEndpoint:
    return endpoints.serverFromString(reactor, description)
