"""OCSP responder logic (RFC 6960, RFC 5019 profile): request bytes in, signed response bytes out.

Pure and synchronous: no reactor, no store, no clock of its own. The server looks statuses up
(off the reactor) and passes them in with the current time. Signing costs CPU, so answers to
nonce-less queries are kept signed per serial and CertID hash: a repeated query costs a dict
lookup, and the server re-signs them before ``nextUpdate`` and at once when a serial changes.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509 import ocsp

if TYPE_CHECKING:
    from s2sgw.ca.records import CertRecord

#: CertID hash algorithms a request may use (the ones cryptography can build and parse).
CERT_ID_HASHES: tuple[type[hashes.HashAlgorithm], ...] = (
    hashes.SHA1,
    hashes.SHA224,
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
)

#: RFC 9654: a nonce is 1 to 32 octets; anything else is a malformed request.
MIN_NONCE = 1
MAX_NONCE = 32

DEFAULT_VALIDITY = datetime.timedelta(seconds=300)

State = Literal["good", "revoked", "unknown"]


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


#: Unsigned error answers are constants: building them per request would be wasted work.
MALFORMED_REQUEST = _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
INTERNAL_ERROR = _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER = _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


@attrs.frozen
class Query:
    """One parsed single-certificate request (RFC 5019 clients ask for one at a time)."""

    serial: int
    algorithm: hashes.HashAlgorithm  # the CertID hash, echoed in the answer
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    nonce: bytes | None = None

    @property
    def cache_key(self) -> tuple[int, str]:
        return (self.serial, self.algorithm.name)


@attrs.frozen
class SerialStatus:
    """What the store says about one serial, reduced to what an OCSP answer carries."""

    state: State
    revoked_at: datetime.datetime | None = None
    reason: x509.ReasonFlags | None = None

    @classmethod
    def from_record(cls, record: CertRecord | None) -> SerialStatus:
        """Map a CertRecord (or None: not ours) to a status.

        An expired but unrevoked certificate stays ``good``: OCSP speaks of revocation, and
        every relying party checks validity dates itself (RFC 6960 section 2.2).
        """
        if record is None:
            return UNKNOWN
        revoked_at = record.revoked_at
        if revoked_at is None:
            return GOOD
        reason_text = record.reason
        try:
            reason = x509.ReasonFlags(reason_text) if reason_text else None
        except ValueError:
            reason = x509.ReasonFlags.unspecified
        if reason is x509.ReasonFlags.remove_from_crl:
            reason = x509.ReasonFlags.unspecified
        return cls("revoked", revoked_at, reason)


GOOD = SerialStatus("good")
UNKNOWN = SerialStatus("unknown")


@attrs.frozen
class Answer:
    """Response bytes plus what HTTP caching headers need (RFC 5019 section 6.2)."""

    der: bytes
    status: ocsp.OCSPResponseStatus
    this_update: datetime.datetime | None = None
    next_update: datetime.datetime | None = None
    nonce: bool = False
    cert_status: State | None = None
    serial: int | None = None
    etag: str | None = None

    @property
    def cacheable(self) -> bool:
        """Only successful nonce-less answers may be shared between clients and HTTP caches."""
        return self.status is ocsp.OCSPResponseStatus.SUCCESSFUL and not self.nonce


def _rejection(der: bytes, status: ocsp.OCSPResponseStatus) -> Answer:
    return Answer(der=der, status=status)


MALFORMED_ANSWER = _rejection(MALFORMED_REQUEST, ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED_ANSWER = _rejection(UNAUTHORIZED, ocsp.OCSPResponseStatus.UNAUTHORIZED)
INTERNAL_ERROR_ANSWER = _rejection(INTERNAL_ERROR, ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER_ANSWER = _rejection(TRY_LATER, ocsp.OCSPResponseStatus.TRY_LATER)


@attrs.frozen
class _Entry:
    query: Query
    status: SerialStatus
    answer: Answer


def _signing_hash(key: object) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _issuer_hashes(issuer: x509.Certificate, any_cert: x509.Certificate) -> dict[str, tuple[bytes, bytes]]:
    """(name hash, key hash) of the issuer under every CertID hash, as a request computes them."""
    result = {}
    for algorithm in CERT_ID_HASHES:
        request = ocsp.OCSPRequestBuilder().add_certificate(any_cert, issuer, algorithm()).build()
        result[algorithm.name] = (request.issuer_name_hash, request.issuer_key_hash)
    return result


def _header(data: bytes, offset: int) -> tuple[int, int]:
    """(start of content, end of content) of the DER TLV at ``offset``."""
    first = data[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    size = first & 0x7F
    length = int.from_bytes(data[offset + 2 : offset + 2 + size], "big")
    start = offset + 2 + size
    return start, start + length


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _with_certificate(response: bytes, cert: bytes) -> bytes:
    """Add ``certs [0] EXPLICIT SEQUENCE OF Certificate`` to a signed BasicOCSPResponse.

    The signature covers tbsResponseData only, so the signer's certificate can be appended after
    signing. cryptography's builder spends more time copying the certificate in than the
    ECDSA signature itself takes; this splice costs microseconds.
    """
    # OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT SEQUENCE {
    #     responseType OID, response OCTET STRING (BasicOCSPResponse) } }
    start, end = _header(response, 0)
    _, status_end = _header(response, start)
    status = response[start:status_end]
    explicit_start, _ = _header(response, status_end)
    bytes_start, _ = _header(response, explicit_start)
    _, oid_end = _header(response, bytes_start)
    oid = response[bytes_start:oid_end]
    octets_start, octets_end = _header(response, oid_end)
    basic = response[octets_start:octets_end]
    basic_start, basic_end = _header(basic, 0)
    new_basic = _tlv(0x30, basic[basic_start:basic_end] + _tlv(0xA0, _tlv(0x30, cert)))
    return _tlv(0x30, status + _tlv(0xA0, _tlv(0x30, oid + _tlv(0x04, new_basic))))


@attrs.define(eq=False)
class Responder:
    """Parses requests for one issuer and signs answers with its delegated OCSP signer.

    ``signatures`` counts every signature made, so tests and metrics can see cache hits cost none.
    """

    issuer: x509.Certificate
    signer_cert: x509.Certificate
    signer_key: CertificateIssuerPrivateKeyTypes
    validity: datetime.timedelta = DEFAULT_VALIDITY
    max_cached: int = 100_000
    signatures: int = 0
    _hashes: dict[str, tuple[bytes, bytes]] = attrs.field(init=False)
    _signing_algorithm: hashes.HashAlgorithm | None = attrs.field(init=False)
    _signer_der: bytes = attrs.field(init=False)
    _cache: dict[tuple[int, str], _Entry] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._hashes = _issuer_hashes(self.issuer, self.signer_cert)
        self._signing_algorithm = _signing_hash(self.signer_key)
        self._signer_der = self.signer_cert.public_bytes(serialization.Encoding.DER)

    # -- parsing -------------------------------------------------------------------------

    def parse(self, body: bytes) -> Query | Answer:
        """A Query for our issuer, or the error Answer to send back (never raises)."""
        try:
            request = ocsp.load_der_ocsp_request(body)
            algorithm = request.hash_algorithm
            serial = request.serial_number
            name_hash = request.issuer_name_hash
            key_hash = request.issuer_key_hash
            extensions = request.extensions
        except Exception:
            # cryptography raises ValueError, UnsupportedAlgorithm, NotImplementedError... for
            # garbage, several requests in one, unknown hashes or broken extensions.
            return MALFORMED_ANSWER
        nonce: bytes | None = None
        try:
            nonce_ext = extensions.get_extension_for_class(x509.OCSPNonce)
        except x509.ExtensionNotFound:
            pass
        except Exception:
            return MALFORMED_ANSWER
        else:
            nonce = nonce_ext.value.nonce
            if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
                return MALFORMED_ANSWER
        expected = self._hashes.get(algorithm.name)
        if expected is None or serial < 0:  # serials are positive (RFC 5280 4.1.2.2)
            return MALFORMED_ANSWER
        if (name_hash, key_hash) != expected:
            return UNAUTHORIZED_ANSWER
        return Query(serial, algorithm, name_hash, key_hash, nonce)

    def replace_signer(self, cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> int:
        """Sign from now on with a renewed delegated signer (same issuer); return how many cached
        answers were dropped. They were signed by the old one, which expires soon: the next
        asker gets a fresh answer."""
        self.signer_cert, self.signer_key = cert, key
        self._signing_algorithm = _signing_hash(key)
        self._signer_der = cert.public_bytes(serialization.Encoding.DER)
        dropped = len(self._cache)
        self._cache.clear()
        return dropped

    def answers(self, query: Query) -> bool:
        """Whether ``query`` names this responder's issuer."""
        return self._hashes.get(query.algorithm.name) == (query.issuer_name_hash, query.issuer_key_hash)

    # -- answering -----------------------------------------------------------------------

    def cached(self, query: Query, now: datetime.datetime) -> Answer | None:
        """The pre-signed answer for a nonce-less query, if it is still fresh enough to hand out."""
        if query.nonce is not None:
            return None
        entry = self._cache.get(query.cache_key)
        if entry is None or now >= self.refresh_point(entry.answer):
            return None
        return entry.answer

    def respond(
        self, query: Query, status: SerialStatus, now: datetime.datetime, *, cache: bool = True
    ) -> Answer:
        """Sign an answer; nonce-less ones are kept for the next asker (unless ``cache`` is off)."""
        answer = self._sign(query, status, now)
        if cache and query.nonce is None:
            self._store(_Entry(query, status, answer))
        return answer

    def answer(
        self, body: bytes, now: datetime.datetime, lookup: Callable[[int], SerialStatus]
    ) -> Answer:
        """The whole path for a synchronous status source: parse, cache, look up, sign."""
        parsed = self.parse(body)
        if isinstance(parsed, Answer):
            return parsed
        hit = self.cached(parsed, now)
        if hit is not None:
            return hit
        return self.respond(parsed, lookup(parsed.serial), now)

    def refresh_point(self, answer: Answer) -> datetime.datetime:
        """After this an answer is re-signed rather than served: half its validity left."""
        assert answer.this_update is not None
        if answer.next_update is None:
            return answer.this_update + self.validity / 2
        return answer.this_update + (answer.next_update - answer.this_update) / 2

    # -- the cache -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._cache)

    def update(self, serial: int, status: SerialStatus, now: datetime.datetime) -> int:
        """A serial's status changed: re-sign its cached answers at once; return how many."""
        count = 0
        for algorithm in CERT_ID_HASHES:
            entry = self._cache.get((serial, algorithm.name))
            if entry is not None:
                self._cache[entry.query.cache_key] = _Entry(
                    entry.query, status, self._sign(entry.query, status, now)
                )
                count += 1
        return count

    def forget(self, serials: Iterable[int]) -> None:
        """Drop the cached answers of these serials (the next query signs afresh)."""
        for serial in serials:
            for algorithm in CERT_ID_HASHES:
                self._cache.pop((serial, algorithm.name), None)

    def forget_unknown(self) -> int:
        """Drop every cached ``unknown``: a serial nobody knew may have been issued since."""
        doomed = [key for key, entry in self._cache.items() if entry.status.state == "unknown"]
        for key in doomed:
            del self._cache[key]
        return len(doomed)

    def refresh(self, now: datetime.datetime, *, lead: float = 0.2, budget: int = 1000) -> int:
        """Re-sign up to ``budget`` cached answers that reach their refresh point soon.

        ``lead`` is the fraction of the validity before the refresh point at which the
        background refresh starts, so askers keep finding pre-signed answers.
        """
        horizon = now + self.validity * lead
        due = [
            key
            for key, entry in self._cache.items()
            if horizon >= self.refresh_point(entry.answer)
        ]
        for key in due[:budget]:
            entry = self._cache[key]
            self._cache[key] = _Entry(entry.query, entry.status, self._sign(entry.query, entry.status, now))
        return min(len(due), budget)

    def _store(self, entry: _Entry) -> None:
        key = entry.query.cache_key
        self._cache.pop(key, None)
        while len(self._cache) >= self.max_cached:
            # Oldest insertion first: dicts keep order, and refreshes re-insert nothing.
            del self._cache[next(iter(self._cache))]
        self._cache[key] = entry

    def _sign(self, query: Query, status: SerialStatus, now: datetime.datetime) -> Answer:
        this_update = now.replace(microsecond=0)
        next_update = this_update + self.validity
        signer_end = self.signer_cert.not_valid_after_utc
        if this_update < signer_end < next_update:
            # Not beyond the signer's own life: after that no gateway accepts its signature.
            next_update = signer_end
        cert_status = {
            "good": ocsp.OCSPCertStatus.GOOD,
            "revoked": ocsp.OCSPCertStatus.REVOKED,
            "unknown": ocsp.OCSPCertStatus.UNKNOWN,
        }[status.state]
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=query.issuer_name_hash,
            issuer_key_hash=query.issuer_key_hash,
            serial_number=query.serial,
            algorithm=query.algorithm,
            cert_status=cert_status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=status.revoked_at if status.state == "revoked" else None,
            revocation_reason=status.reason if status.state == "revoked" else None,
        )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.signer_cert)
        if query.nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(query.nonce), critical=False)
        response = builder.sign(self.signer_key, self._signing_algorithm)
        self.signatures += 1
        der = _with_certificate(response.public_bytes(serialization.Encoding.DER), self._signer_der)
        return Answer(
            der=der,
            status=ocsp.OCSPResponseStatus.SUCCESSFUL,
            this_update=this_update,
            next_update=next_update,
            nonce=query.nonce is not None,
            cert_status=status.state,
            serial=query.serial,
            etag='"' + hashlib.sha256(der).hexdigest()[:32] + '"',
        )
