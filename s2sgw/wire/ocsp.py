"""OCSP as both sides speak it: the status value, building queries and verifying answers.

``cryptography.x509.ocsp`` builds and parses OCSP messages but verifies nothing, so this module
checks what an answer must prove before it is trusted: who signed it (the CA, or a responder
certificate the CA issued for OCSP signing), that the signature holds, that it answers the
question (CertID), that it is current (thisUpdate/nextUpdate) and, if it echoes a nonce, that
the nonce is ours.

Nonce policy: every query carries a fresh nonce. The CA's responder may answer from a cache of
nonce-less answers (RFC 5019 style), so an answer *without* a nonce extension is accepted and its
freshness rests on thisUpdate/nextUpdate (and, without nextUpdate, on a maximum age). An answer
*with* a nonce must carry ours."""

from __future__ import annotations

import datetime
import os
from typing import Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from s2sgw.errors import S2sgwError
from s2sgw.serials import serial_text

CertState = Literal["good", "revoked", "unknown"]



@attrs.frozen
class CertStatus:
    """A verified status answer for one certificate."""

    state: CertState
    this_update: datetime.datetime
    next_update: datetime.datetime | None
    revoked_at: datetime.datetime | None = None
    revocation_reason: str | None = None  # e.g. "keyCompromise" (x509.ReasonFlags value)



class StatusUnavailable(S2sgwError):
    """The CA could not be asked (unreachable, timeout, HTTP error, tryLater)."""



class StatusInvalid(S2sgwError):
    """The CA's answer failed verification (signature, signer, CertID, time window, nonce)."""


OCSP_REQUEST_TYPE = b"application/ocsp-request"


DEFAULT_LEEWAY = datetime.timedelta(seconds=60)


# Hashes we accept for signatures on answers; MD5 and SHA-1 are forgeable.
_SIGNATURE_HASHES = ("sha224", "sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512")


_UNAVAILABLE_STATUSES = {
    ocsp.OCSPResponseStatus.TRY_LATER,
    ocsp.OCSPResponseStatus.INTERNAL_ERROR,
}


@attrs.frozen
class OCSPQuery:
    """One OCSP request as sent, with what its answer must match."""

    der: bytes
    serial: int
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    hash_algorithm: str  # e.g. "sha1"
    nonce: bytes | None


def new_nonce(size: int = 16) -> bytes:
    """A fresh random nonce (RFC 8954 allows 1..32 bytes; 16 is what OpenSSL sends)."""
    if not 1 <= size <= 32:
        raise ValueError("nonce size must be 1..32 bytes")
    return os.urandom(size)


def build_request(
    leaf: x509.Certificate, issuer: x509.Certificate, *, nonce: bytes | None
) -> OCSPQuery:
    """An OCSP request for ``leaf`` with a SHA-1 CertID, as RFC 5019 responders expect."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    request = builder.build()
    return OCSPQuery(
        der=request.public_bytes(serialization.Encoding.DER),
        serial=request.serial_number,
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        hash_algorithm=request.hash_algorithm.name,
        nonce=nonce,
    )


def verify_signature(
    public_key: object,
    signature: bytes,
    data: bytes,
    hash_algorithm: hashes.HashAlgorithm | None,
) -> None:
    """Check ``signature`` over ``data``: ECDSA, RSA PKCS#1 v1.5, Ed25519 or Ed448.

    Raises StatusInvalid on a bad signature, an unsupported key type or a weak hash.
    """
    try:
        if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
            return
        if hash_algorithm is None or hash_algorithm.name not in _SIGNATURE_HASHES:
            name = hash_algorithm.name if hash_algorithm is not None else "none"
            raise StatusInvalid(f"signature hash {name} is not accepted")
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
        else:
            raise StatusInvalid(f"unsupported signer key type {type(public_key).__name__}")
    except InvalidSignature:
        raise StatusInvalid("signature does not verify") from None


def key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits: the byKey responder ID (RFC 6960 4.2.1)."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _names_signer(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == certificate.subject
    return response.responder_key_hash == key_hash(certificate)


def _check_delegate(
    signer: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime, leeway: datetime.timedelta
) -> None:
    """A delegated responder must be issued by the CA that issued the leaf, for OCSP signing."""
    try:
        signer.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise StatusInvalid(f"responder certificate is not issued by the leaf's issuer: {e}") from None
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise StatusInvalid("responder certificate has no extendedKeyUsage") from None
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise StatusInvalid("responder certificate lacks extendedKeyUsage OCSPSigning")
    if now + leeway < signer.not_valid_before_utc or now > signer.not_valid_after_utc:
        raise StatusInvalid("responder certificate is outside its validity period")


def _find_signer(
    response: ocsp.OCSPResponse,
    issuer: x509.Certificate,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> x509.Certificate:
    if _names_signer(response, issuer):
        return issuer
    candidates = [c for c in response.certificates if _names_signer(response, c)]
    if not candidates:
        raise StatusInvalid("responder is neither the issuer nor a certificate in the answer")
    _check_delegate(candidates[0], issuer, now, leeway)
    return candidates[0]


def _reason_text(reason: x509.ReasonFlags | None) -> str | None:
    return reason.value if reason is not None else None


def verify_response(
    der: bytes,
    query: OCSPQuery,
    issuer: x509.Certificate,
    *,
    now: datetime.datetime,
    leeway: datetime.timedelta = DEFAULT_LEEWAY,
    max_age: datetime.timedelta = datetime.timedelta(minutes=5),
) -> CertStatus:
    """Parse and verify an OCSP answer to ``query``; return the certificate's status.

    ``leeway`` absorbs clock differences on thisUpdate/nextUpdate; ``max_age`` bounds the age of
    an answer without nextUpdate. Raises StatusUnavailable (tryLater, internalError) or
    StatusInvalid (anything that does not verify).
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise StatusInvalid(f"answer is not an OCSP response: {e}") from None
    status = response.response_status
    if status in _UNAVAILABLE_STATUSES:
        raise StatusUnavailable(f"responder answered {status.name}")
    if status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise StatusInvalid(f"responder answered {status.name}")

    try:
        signer = _find_signer(response, issuer, now, leeway)
        verify_signature(
            signer.public_key(),
            response.signature,
            response.tbs_response_bytes,
            response.signature_hash_algorithm,
        )
        single = _matching_single(response, query)
        this_update = single.this_update_utc
        next_update = single.next_update_utc
        if this_update > now + leeway:
            raise StatusInvalid(f"answer thisUpdate {this_update.isoformat()} is in the future")
        if next_update is not None:
            if next_update < this_update:
                raise StatusInvalid("answer nextUpdate precedes thisUpdate")
            if next_update + leeway < now:
                raise StatusInvalid(f"answer is stale: nextUpdate {next_update.isoformat()} has passed")
        elif this_update + max_age + leeway < now:
            raise StatusInvalid(f"answer without nextUpdate is older than {max_age}")
        if query.nonce is not None:
            _check_nonce(response, query.nonce)
        cert_status = single.certificate_status
        if cert_status == ocsp.OCSPCertStatus.GOOD:
            return CertStatus("good", this_update, next_update)
        if cert_status == ocsp.OCSPCertStatus.REVOKED:
            return CertStatus(
                "revoked",
                this_update,
                next_update,
                revoked_at=single.revocation_time_utc,
                revocation_reason=_reason_text(single.revocation_reason),
            )
        return CertStatus("unknown", this_update, next_update)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # cryptography raises these for malformed fields met lazily (extensions, times, keys).
        raise StatusInvalid(f"malformed OCSP response: {e}") from None


def _matching_single(response: ocsp.OCSPResponse, query: OCSPQuery) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if (
            single.serial_number == query.serial
            and single.hash_algorithm.name == query.hash_algorithm
            and single.issuer_name_hash == query.issuer_name_hash
            and single.issuer_key_hash == query.issuer_key_hash
        ):
            return single
    raise StatusInvalid(f"answer has no status for serial {serial_text(query.serial)} from this issuer")


def _check_nonce(response: ocsp.OCSPResponse, nonce: bytes) -> None:
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return  # a cached, nonce-less answer: freshness rests on the time window
    if echoed != nonce:
        raise StatusInvalid("answer nonce does not match the request")
