"""The EST (RFC 7030) message formats both the CA and the enrolling gateway use.

EST carries certificates as base64 "certs-only" PKCS#7 and requests as base64 PKCS#10
(sections 4.1.3 and 4.2). Both sides also agree on which keys a certificate may carry and
on how a root is pinned by its SHA-256 fingerprint (as ``step ca bootstrap --fingerprint``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

WELL_KNOWN = "/.well-known/est"
CACERTS = "cacerts"
SIMPLEENROLL = "simpleenroll"
SIMPLEREENROLL = "simplereenroll"

# RFC 7030 section 4.1.3 (cacerts) and 4.2.3 (enrollment responses); 4.2.1 (requests).
CERTS_ONLY_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CACERTS_CONTENT_TYPE = "application/pkcs7-mime"
CSR_CONTENT_TYPE = "application/pkcs10"
TRANSFER_ENCODING = "base64"

MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class WireFormatError(ValueError):
    """A body that is not the EST message it claims to be."""


def _unbase64(body: bytes) -> bytes:
    compact = b"".join(body.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise WireFormatError(f"not base64: {error}") from None


def encode_certs_only(certificates: list[x509.Certificate]) -> bytes:
    """Base64 of a degenerate (certs-only) PKCS#7 holding ``certificates``, lines of 76.

    Lines end in LF alone: base64 readers skip line breaks either way, but ``base64 -d``
    (coreutils) refuses the CR of CRLF.
    """
    der = pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)
    return base64.encodebytes(der)


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """The certificates of a base64 certs-only PKCS#7; raises ``WireFormatError``."""
    der = _unbase64(body)
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as error:
        raise WireFormatError(f"not a PKCS#7 certs-only message: {error}") from None
    if not certificates:
        raise WireFormatError("the PKCS#7 message holds no certificate")
    return certificates


def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """Base64 of a PKCS#10 request in DER, the body of simpleenroll and simplereenroll."""
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def decode_csr(body: bytes) -> x509.CertificateSigningRequest:
    """The PKCS#10 request of a base64 body; raises ``WireFormatError``. Signature not checked."""
    der = _unbase64(body)
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as error:
        raise WireFormatError(f"not a PKCS#10 request: {error}") from None


def key_policy_problem(public_key: object) -> str | None:
    """Why a key may not be certified, or None: P-256/P-384, Ed25519 or RSA of 2048 bits or more."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ALLOWED_CURVES):
            return None
        return f"EC curve {public_key.curve.name} is not allowed (P-256 or P-384)"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= MIN_RSA_BITS:
            return None
        return f"RSA key of {public_key.key_size} bits is too small (at least {MIN_RSA_BITS})"
    return f"{type(public_key).__name__} keys are not allowed"


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex without separators."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


_FINGERPRINT = re.compile(r"^(?:sha256:)?([0-9a-f]{2}(?::?[0-9a-f]{2}){31})$")


def normalize_fingerprint(text: str) -> str:
    """Accept ``ab:cd:...``, ``ABCD...`` or ``sha256:abcd...``; return plain lower-case hex."""
    match = _FINGERPRINT.match(text.strip().lower())
    if match is None:
        raise WireFormatError("a SHA-256 fingerprint is 64 hex digits (colons allowed)")
    return match.group(1).replace(":", "")


# -- reading a certs-only answer ----------------------------------------------------------------
# PKCS#7 keeps no order: the leaf is found by its key, roots by being self-signed.


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_self_signed(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` is a root: its own issuer, with a signature its own key verifies."""
    return _issued_by(certificate, certificate)


def roots_in(certificates: list[x509.Certificate]) -> list[x509.Certificate]:
    """The self-signed certificates of an answer, in the answer's order."""
    return [certificate for certificate in certificates if is_self_signed(certificate)]


def certificate_for_key(certificates: list[x509.Certificate], public_key: object) -> x509.Certificate | None:
    """The certificate in ``certificates`` that certifies ``public_key`` (the new leaf), if any."""
    wanted = _spki(public_key)
    for certificate in certificates:
        if not is_self_signed(certificate) and _spki(certificate.public_key()) == wanted:
            return certificate
    return None


def chain_for(leaf: x509.Certificate, certificates: list[x509.Certificate]) -> list[x509.Certificate]:
    """``leaf`` and then each issuer found in ``certificates``, up to but not including a root."""
    chain = [leaf]
    candidates = [c for c in certificates if c is not leaf and not is_self_signed(c)]
    while len(chain) <= len(certificates):
        issuer = next((c for c in candidates if c not in chain and _issued_by(chain[-1], c)), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain
