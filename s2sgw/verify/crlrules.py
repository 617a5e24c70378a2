"""What a CRL must be before anyone is judged by it, beyond a signature that verifies.

RFC 5280 section 5 asks for a CRL number (non-critical), an issuer entitled to sign CRLs
(keyUsage cRLSign), one signature algorithm named inside and outside the signed part, and a
nextUpdate after thisUpdate. A CRL that breaks any of these is refused where CRLs are loaded,
reloaded or fetched (the material keeps the CRL it had) and where mode ``crl`` judges a peer.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import (
    CRLEntryExtensionOID,
    ExtensionOID,
    SignatureAlgorithmOID,
)

from s2sgw.serials import serial_text
from s2sgw.verify import der

MAX_LIFETIME = datetime.timedelta(days=31)  # thisUpdate to nextUpdate; the CA's own limit is lower

_ALGORITHMS_FOR_KEY: tuple[tuple[type, str, frozenset[x509.ObjectIdentifier]], ...] = (
    (
        ec.EllipticCurvePublicKey,
        "ECDSA",
        frozenset(
            {
                SignatureAlgorithmOID.ECDSA_WITH_SHA256,
                SignatureAlgorithmOID.ECDSA_WITH_SHA384,
                SignatureAlgorithmOID.ECDSA_WITH_SHA512,
            }
        ),
    ),
    (
        rsa.RSAPublicKey,
        "RSA",
        frozenset(
            {
                SignatureAlgorithmOID.RSA_WITH_SHA256,
                SignatureAlgorithmOID.RSA_WITH_SHA384,
                SignatureAlgorithmOID.RSA_WITH_SHA512,
                SignatureAlgorithmOID.RSASSA_PSS,
            }
        ),
    ),
    (ed25519.Ed25519PublicKey, "Ed25519", frozenset({SignatureAlgorithmOID.ED25519})),
)
# The one critical CRL extension we act on (and refuse when it makes a CRL indirect or partial).
_UNDERSTOOD_CRITICAL = frozenset({ExtensionOID.ISSUING_DISTRIBUTION_POINT})


def crl_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    """Why ``crl``, whose signature ``issuer`` verified, must not be used; None if it may."""
    try:
        return _number(crl) or _issuer(issuer) or _algorithm(crl, issuer) or _times(crl) or _extensions(crl)
    except Exception as error:  # a CRL we cannot read is not one to judge by
        return f"cannot be checked: {error}"


def _number(crl: x509.CertificateRevocationList) -> str | None:
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound:
        return "has no CRLNumber"
    if number.critical:
        return "CRLNumber is marked critical"
    return None


def _issuer(issuer: x509.Certificate) -> str | None:
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return f"issuer {issuer.subject.rfc4514_string()} has no keyUsage (cRLSign is required)"
    if not usage.crl_sign:
        return f"issuer {issuer.subject.rfc4514_string()} keyUsage lacks cRLSign"
    return None


def _algorithm(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    inner, outer = der.signature_algorithms(crl.public_bytes(serialization.Encoding.DER))
    if inner != outer:
        return "signature algorithm inside the CRL differs from the one outside"
    algorithm = crl.signature_algorithm_oid
    key = issuer.public_key()
    label, allowed = next(
        ((label, oids) for kind, label, oids in _ALGORITHMS_FOR_KEY if isinstance(key, kind)),
        ("unsupported", frozenset()),
    )
    if algorithm not in allowed:
        name = getattr(algorithm, "_name", None) or algorithm.dotted_string
        return f"signature algorithm {name} does not fit the issuer's {label} key"
    return None


def _times(crl: x509.CertificateRevocationList) -> str | None:
    this_update, next_update = crl.last_update_utc, crl.next_update_utc
    if next_update is None:
        return "has no nextUpdate"
    if next_update <= this_update:
        return f"nextUpdate {next_update.isoformat()} is not after thisUpdate {this_update.isoformat()}"
    if next_update - this_update > MAX_LIFETIME:
        return f"is valid for {(next_update - this_update).days} days (at most {MAX_LIFETIME.days})"
    return None


def _extensions(crl: x509.CertificateRevocationList) -> str | None:
    for extension in crl.extensions:
        if extension.oid == ExtensionOID.DELTA_CRL_INDICATOR:
            return "is a delta CRL (only complete CRLs are used)"
        if extension.oid == ExtensionOID.ISSUING_DISTRIBUTION_POINT:
            scope = extension.value
            if scope.indirect_crl or scope.only_some_reasons or scope.only_contains_attribute_certs:
                return "issuingDistributionPoint makes it indirect or partial (not supported)"
        if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            return f"critical extension not understood: {extension.oid.dotted_string}"
    for entry in crl:
        for extension in entry.extensions:
            if extension.oid == CRLEntryExtensionOID.CERTIFICATE_ISSUER:
                return "is an indirect CRL (certificateIssuer entries are not supported)"
            if extension.critical:
                return f"entry {serial_text(entry.serial_number)} has a critical extension: {extension.oid.dotted_string}"
    return None
