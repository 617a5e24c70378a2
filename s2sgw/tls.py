"""TLS contexts for mutual authentication, and connection creators that follow reloads.

Every context is built fresh from loaded material and never changed afterwards (pyOpenSSL
>= 26.2 refuses setters on a context that made a connection); a reload builds new contexts and
the creators below pick up whichever is current when a handshake starts.

OpenSSL verifies the chain against our bundle only; our verify callback adds the checks
OpenSSL does not make (a SAN, the right EKU, no CA leaf), fails closed on any exception and
records why on the TLS protocol object as ``s2sgw_chain_error`` (a :class:`Reason` code), so
the audit log can say why a handshake failed. Peer *identity* is the authorizer's job after the
handshake; that is why the client side does not use ``optionsForClientTLS``.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ssl_ffi
from OpenSSL._util import lib as _ssl_lib
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from s2sgw import pki, tlsalert, tlspolicy
from s2sgw.interfaces import Reason
from s2sgw.verify.strict import StrictVerifier

CHAIN_ERROR = "s2sgw_chain_error"  # attribute on the TLS protocol: first Reason code from verification
CHAIN_ERROR_DETAIL = "s2sgw_chain_error_detail"  # plain words for the log
STAPLE = "s2sgw_ocsp_staple"  # attribute on the TLS protocol: the OCSP answer the server stapled

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all AEAD + (EC)DHE.
# SECLEVEL 2: RSA/DH keys >= 2048 bits, EC >= 224, no SHA-1 signatures, anywhere in either chain.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:@SECLEVEL=2"
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
VERIFY_DEPTH = 6
_SESSION_ID = b"s2sgw"

# OpenSSL X509_V_ERR_* codes -> our reasons. Unlisted codes count as an untrusted chain.
_X509_ERRORS: dict[int, tuple[str, str]] = {
    2: (Reason.UNTRUSTED_CHAIN, "unable to get issuer certificate"),
    3: (Reason.STATUS_UNKNOWN, "unable to get CRL"),
    4: (Reason.UNTRUSTED_CHAIN, "unable to decrypt certificate signature"),
    6: (Reason.UNTRUSTED_CHAIN, "unable to decode issuer public key"),
    7: (Reason.UNTRUSTED_CHAIN, "certificate signature failure"),
    8: (Reason.STATUS_INVALID, "CRL signature failure"),
    9: (Reason.NOT_YET_VALID, "certificate is not yet valid"),
    10: (Reason.EXPIRED, "certificate has expired"),
    11: (Reason.STATUS_INVALID, "CRL is not yet valid"),
    12: (Reason.STATUS_INVALID, "CRL has expired"),
    13: (Reason.BAD_CERTIFICATE, "format error in certificate's notBefore field"),
    14: (Reason.BAD_CERTIFICATE, "format error in certificate's notAfter field"),
    18: (Reason.UNTRUSTED_CHAIN, "self-signed certificate"),
    19: (Reason.UNTRUSTED_CHAIN, "self-signed certificate in certificate chain"),
    20: (Reason.UNTRUSTED_CHAIN, "unable to get local issuer certificate"),
    21: (Reason.UNTRUSTED_CHAIN, "unable to verify the first certificate"),
    22: (Reason.UNTRUSTED_CHAIN, "certificate chain too long"),
    23: (Reason.REVOKED, "certificate revoked"),
    24: (Reason.UNTRUSTED_CHAIN, "invalid CA certificate"),
    25: (Reason.UNTRUSTED_CHAIN, "path length constraint exceeded"),
    26: (Reason.BAD_CERTIFICATE, "unsuitable certificate purpose"),
    27: (Reason.UNTRUSTED_CHAIN, "certificate not trusted"),
    28: (Reason.UNTRUSTED_CHAIN, "certificate rejected"),
    32: (Reason.UNTRUSTED_CHAIN, "key usage does not include certificate signing"),
    34: (Reason.BAD_CERTIFICATE, "unhandled critical extension"),
    66: (Reason.BAD_CERTIFICATE, "EE certificate key too weak"),
    67: (Reason.UNTRUSTED_CHAIN, "CA certificate key too weak"),
    68: (Reason.BAD_CERTIFICATE, "CA signature digest algorithm too weak"),
}

_log = Logger(namespace="s2sgw.tls")


def reason_for_verify_error(errno: int) -> tuple[str, str]:
    """A Reason code and words for an OpenSSL X509_V_ERR_* number (OpenSSL's words if not ours)."""
    known = _X509_ERRORS.get(errno)
    if known is not None:
        return known
    try:
        words = _ssl_ffi.string(_ssl_lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:
        words = ""
    return Reason.UNTRUSTED_CHAIN, f"{words or 'certificate verify error'} (error {errno})"


# -- verification ----------------------------------------------------------------------------


def _record(connection: SSL.Connection, reason: str, detail: str) -> None:
    """Remember the first verification failure on the TLS protocol (the connection's app data)."""
    target = connection.get_app_data()
    if target is None:
        return
    if getattr(target, CHAIN_ERROR, None) is None:
        setattr(target, CHAIN_ERROR, reason)
        setattr(target, CHAIN_ERROR_DETAIL, detail)


def _subject(certificate: Any) -> str:
    try:
        return _subject_of(certificate.to_cryptography())
    except Exception:
        return "?"


def _subject_of(certificate: x509.Certificate) -> str:
    try:
        return certificate.subject.rfc4514_string() or "(empty subject)"
    except Exception:
        return "?"


def leaf_problem(leaf: x509.Certificate, usage: x509.ObjectIdentifier) -> tuple[str, str] | None:
    """What OpenSSL lets through but we refuse in a peer's leaf certificate, if anything."""
    if not pki.has_san(leaf):
        return Reason.NO_IDENTITY, "certificate has no subjectAltName"
    if pki.is_ca(leaf):
        return Reason.BAD_CERTIFICATE, "leaf certificate is a CA (basicConstraints CA:TRUE)"
    weak = _weak_key(leaf)
    if weak is not None:
        return Reason.BAD_CERTIFICATE, weak
    usages = pki.extended_key_usages(leaf)
    if usages is None or usage not in usages:
        name = "clientAuth" if usage == ExtendedKeyUsageOID.CLIENT_AUTH else "serverAuth"
        return Reason.BAD_CERTIFICATE, f"extendedKeyUsage lacks {name}"
    return None


def _weak_key(certificate: x509.Certificate) -> str | None:
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"RSA key of {key.key_size} bits is too small"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        return f"EC key on {key.curve.name} is too small"
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA keys are not accepted"
    return None


@attrs.frozen
class _Verifier:
    """The verify callback for one side: ``usage`` is the EKU the *peer's* leaf must carry.

    OpenSSL calls it once per certificate of the path it built, trust anchor first and leaf
    last. It keeps those certificates per connection; at the leaf, after our leaf checks,
    ``strict`` (our rules and the second verifier) must accept the whole path too.
    """

    usage: x509.ObjectIdentifier
    strict: StrictVerifier | None = None
    _paths: weakref.WeakKeyDictionary[SSL.Connection, dict[int, x509.Certificate]] = attrs.field(
        factory=weakref.WeakKeyDictionary, eq=False, repr=False
    )

    def __call__(self, connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        try:
            if not ok:
                self._paths.pop(connection, None)
                reason, words = reason_for_verify_error(errno)
                _record(connection, reason, f"{words} (depth {depth}: {_subject(certificate)})")
                return False
            path = self._paths.setdefault(connection, {})
            if path and depth >= min(path):  # a new verification of this connection starts over
                path.clear()
            path[depth] = certificate.to_cryptography()
            if depth == 0:
                self._paths.pop(connection, None)
                return self._judge_leaf(connection, path)
            return True
        except BaseException as error:  # fail closed; pyOpenSSL would re-raise it mid-handshake
            try:
                _record(connection, Reason.BAD_CERTIFICATE, f"verification failed: {error!r}")
                _log.warn("certificate verification raised {error!r}; refusing", error=error)
            except BaseException:
                pass
            return False

    def _judge_leaf(self, connection: SSL.Connection, path: dict[int, x509.Certificate]) -> bool:
        leaf = path[0]
        problem = leaf_problem(leaf, self.usage)
        if problem is None and self.strict is not None:
            if sorted(path) != list(range(len(path))):
                problem = Reason.UNTRUSTED_CHAIN, f"incomplete path from OpenSSL (depths {sorted(path)})"
            else:
                problem = self.strict.check([path[depth] for depth in range(len(path))])
                if problem is not None:
                    _record(connection, *problem)
                    return False
        if problem is not None:
            reason, words = problem
            _record(connection, reason, f"{words} ({_subject_of(leaf)})")
            return False
        return True


def _context(
    chain: Sequence[x509.Certificate],
    key: pki.PrivateKey,
    roots: Sequence[x509.Certificate],
    verify_mode: int,
    peer_usage: x509.ObjectIdentifier,
) -> SSL.Context:
    if not chain:
        raise ValueError("empty certificate chain")
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_TICKET  # no resumption: every connection proves its certificate against current trust
        | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_session_id(_SESSION_ID)
    context.set_cipher_list(TLS12_CIPHERS)
    tlspolicy.pin(context)  # groups and signature algorithms stated, not inherited
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(key)
    context.check_privatekey()
    store = context.get_cert_store()  # empty: no system roots are ever loaded
    assert store is not None
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    strict = StrictVerifier(tuple(roots), peer_usage, VERIFY_DEPTH)
    # Judge our own chain once now, while the process may still read everything: OpenSSL looks up
    # some of what signature checks need on first use, and twistd may drop privileges after this.
    strict.second_opinion([*chain, *(root for root in roots if root.subject == chain[-1].issuer)])
    context.set_verify(verify_mode, _Verifier(peer_usage, strict))
    context.set_verify_depth(VERIFY_DEPTH)
    return context


def server_context(
    chain: Sequence[x509.Certificate],
    key: pki.PrivateKey,
    roots: Sequence[x509.Certificate],
    *,
    staple: Callable[[], bytes] | None = None,
) -> SSL.Context:
    """A context for inbound listeners: a client certificate chaining to ``roots`` is required.

    ``staple`` returns the OCSP answer (DER) to staple when a client asks, or b"" for none; it
    runs inside the handshake, so it must only read a cache.
    """
    context = _context(
        chain,
        key,
        roots,
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    for root in roots:  # tells clients such as openssl s_client which certificate to send
        context.add_client_ca(root)
    if staple is not None:
        context.set_ocsp_server_callback(_StapleServer(staple))
    # Keeps the secret a refusal alert after the handshake is sealed with (see s2sgw.tlsalert).
    context.set_keylog_callback(tlsalert.keep_server_secret)
    return context


def client_context(
    chain: Sequence[x509.Certificate],
    key: pki.PrivateKey,
    roots: Sequence[x509.Certificate],
    *,
    staples: bool = False,
) -> SSL.Context:
    """A context for outbound connections: presents our chain, verifies the server's against ``roots``.

    With ``staples`` an OCSP answer stapled by the server (asked for by the connection creator)
    is kept on the TLS protocol as ``s2sgw_ocsp_staple`` for the authorizer to verify later.
    """
    context = _context(chain, key, roots, SSL.VERIFY_PEER, ExtendedKeyUsageOID.SERVER_AUTH)
    if staples:
        context.set_ocsp_client_callback(_keep_staple)
    return context


# -- OCSP stapling -----------------------------------------------------------------------------


@attrs.frozen
class _StapleServer:
    """The server's OCSP callback: hand OpenSSL the cached answer; never fail the handshake."""

    staple: Callable[[], bytes]

    def __call__(self, connection: SSL.Connection, data: Any) -> bytes:
        try:
            der = self.staple()
            return der if type(der) is bytes else b""
        except BaseException as error:  # pyOpenSSL would turn it into a fatal alert
            try:
                _log.warn("OCSP staple lookup raised {error!r}; stapling nothing", error=error)
            except BaseException:
                pass
            return b""


def _keep_staple(connection: SSL.Connection, der: bytes, data: Any) -> bool:
    """The client's OCSP callback: only store the staple (the chain is verified later, by us).

    It never rejects: a missing or bad staple just means the status is asked for as usual.
    """
    try:
        target = connection.get_app_data()
        if target is not None and der:
            setattr(target, STAPLE, bytes(der))
    except BaseException:
        pass
    return True


def received_staple(tls_protocol: Any) -> bytes | None:
    """The OCSP answer the server stapled to this connection's handshake, if any."""
    staple = getattr(tls_protocol, STAPLE, None)
    return staple if isinstance(staple, bytes) and staple else None


# -- connection creators -----------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class ServerConnectionCreator:
    """Makes each inbound connection from whatever context ``current`` returns at that moment."""

    current: Callable[[], SSL.Context]

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.current(), None)
        connection.set_app_data(tlsProtocol)
        connection.set_accept_state()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class ClientConnectionCreator:
    """Makes each outbound connection from the current context and sends SNI for ``hostname``.

    The chain is verified by OpenSSL; the remote's identity is checked by the authorizer once
    the handshake completes.
    """

    current: Callable[[], SSL.Context]
    hostname: str
    request_staple: bool = False  # ask the server to staple its OCSP answer (status_request)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.current(), None)
        connection.set_app_data(tlsProtocol)
        name = sni_name(self.hostname)
        if name is not None:
            connection.set_tlsext_host_name(name)
        if self.request_staple:
            connection.request_ocsp()
        connection.set_connect_state()
        return connection


def sni_name(hostname: str) -> bytes | None:
    """The SNI bytes for ``hostname``; None for IP addresses and empty names (SNI forbids them)."""
    hostname = hostname.strip().rstrip(".")
    if not hostname:
        return None
    try:
        ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        pass
    else:
        return None
    try:
        return hostname.encode("idna")
    except UnicodeError:
        return None
