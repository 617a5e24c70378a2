"""The signed revocation-feed document, as the CA writes it and a gateway reads it.

The CA signs each answer to ``GET /revocations?since=N`` with its OCSP signing key, so a gateway
trusts it exactly as far as it trusts OCSP answers, and can tell a gap or a rollback from a quiet
CA::

    {"payload": base64(JSON), "signature": base64, "hash": "sha256" | null, "signer": base64(DER)}

    payload = {"type": "s2sgw-revocations", "version": 1, "issuer": hex(SHA-1 of the issuer key),
               "since": N, "seq": M, "latest": L, "more": false, "time": ISO 8601 UTC,
               "revocations": [{"seq", "serial" (hex), "revoked_at", "reason"}, ...]}

``revocations`` holds every revocation with ``since < seq <= M`` in order (sequence numbers are
contiguous, starting at 1); ``latest`` is the newest the CA knows; ``more`` says that the batch
was cut and the asker should come straight back with ``since = M``."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from s2sgw.wire.ocsp import (
    DEFAULT_LEEWAY,
    StatusInvalid,
    _check_delegate,
    key_hash,
    verify_signature,
)

DOCUMENT_TYPE = "s2sgw-revocations"


DOCUMENT_VERSION = 1


FEED_CONTENT_TYPE = b"application/json"


DEFAULT_HOLD = 25.0


@attrs.frozen
class FeedEntry:
    """One revocation as the feed tells it."""

    seq: int
    serial: int
    revoked_at: datetime.datetime
    reason: str | None = None

    @classmethod
    def from_record(cls, record: Any) -> FeedEntry | None:
        """A CertRecord with a revocation sequence number -> an entry (None otherwise)."""
        if record.revocation_seq is None or record.revoked_at is None:
            return None
        return cls(record.revocation_seq, record.serial, record.revoked_at, record.reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "serial": f"{self.serial:x}",
            "revoked_at": _iso(self.revoked_at),
            "reason": self.reason,
        }


@attrs.frozen
class FeedDocument:
    """The payload of one feed answer."""

    issuer_key_hash: bytes
    since: int
    seq: int
    latest: int
    time: datetime.datetime
    revocations: tuple[FeedEntry, ...] = ()
    more: bool = False

    def payload(self) -> bytes:
        """Canonical JSON bytes: what is signed."""
        body = {
            "type": DOCUMENT_TYPE,
            "version": DOCUMENT_VERSION,
            "issuer": self.issuer_key_hash.hex(),
            "since": self.since,
            "seq": self.seq,
            "latest": self.latest,
            "more": self.more,
            "time": _iso(self.time),
            "revocations": [entry.to_json() for entry in self.revocations],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _signing_hash(key: Any) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def sign(payload: bytes, key: Any, signer_der: bytes) -> bytes:
    """The envelope for ``payload``: detached signature plus the signer's certificate."""
    algorithm = _signing_hash(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert algorithm is not None
        signature = key.sign(payload, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPrivateKey):
        assert algorithm is not None
        signature = key.sign(payload, padding.PKCS1v15(), algorithm)
    elif isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        signature = key.sign(payload)
    else:
        raise TypeError(f"cannot sign with a {type(key).__name__}")
    envelope = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
        "hash": algorithm.name if algorithm is not None else None,
        "signer": base64.b64encode(signer_der).decode("ascii"),
    }
    return json.dumps(envelope, sort_keys=True).encode("utf-8") + b"\n"


DEFAULT_MAX_AGE = datetime.timedelta(seconds=120)


_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def _field(payload: dict[str, Any], name: str, kind: type) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StatusInvalid(f"feed document field {name!r} is missing or not a {kind.__name__}")
    return value


def _count(payload: dict[str, Any], name: str) -> int:
    value = _field(payload, name, int)
    if value < 0:
        raise StatusInvalid(f"feed document field {name!r} is negative")
    return value


def _time(text: Any, name: str) -> datetime.datetime:
    if not isinstance(text, str):
        raise StatusInvalid(f"feed document field {name!r} is not a time")
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise StatusInvalid(f"feed document field {name!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise StatusInvalid(f"feed document field {name!r} has no time zone")
    return moment.astimezone(datetime.UTC)


def _entry(item: Any) -> FeedEntry:
    if not isinstance(item, dict):
        raise StatusInvalid("feed revocation is not an object")
    serial_text = _field(item, "serial", str)
    try:
        serial = int(serial_text, 16)
    except ValueError:
        raise StatusInvalid(f"feed revocation serial {serial_text!r} is not hex") from None
    reason = item.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise StatusInvalid("feed revocation reason is not a string")
    return FeedEntry(_count(item, "seq"), serial, _time(item.get("revoked_at"), "revoked_at"), reason)


def open_document(
    data: bytes,
    issuers: Sequence[x509.Certificate],
    *,
    now: datetime.datetime,
    leeway: datetime.timedelta = DEFAULT_LEEWAY,
    max_age: datetime.timedelta = DEFAULT_MAX_AGE,
) -> FeedDocument:
    """Verify a feed answer and return its payload; raise StatusInvalid if anything is wrong.

    ``issuers`` are the CA certificates this gateway trusts (roots and the intermediates of its
    own chains); the document must name one of them by key hash and be signed by it or by a
    certificate it issued with extendedKeyUsage OCSPSigning. Its time must be within
    ``max_age`` (plus ``leeway``) of ``now``, so an old answer replayed cannot hide news.
    """
    try:
        envelope = json.loads(data)
        if not isinstance(envelope, dict):
            raise StatusInvalid("feed answer is not a JSON object")
        payload_bytes = base64.b64decode(_field(envelope, "payload", str), validate=True)
        signature = base64.b64decode(_field(envelope, "signature", str), validate=True)
        signer = x509.load_der_x509_certificate(base64.b64decode(_field(envelope, "signer", str), validate=True))
        payload = json.loads(payload_bytes)
    except StatusInvalid:
        raise
    except (ValueError, TypeError, binascii.Error) as error:
        raise StatusInvalid(f"feed answer is not a signed document: {error}") from None
    if not isinstance(payload, dict):
        raise StatusInvalid("feed payload is not an object")
    if payload.get("type") != DOCUMENT_TYPE or payload.get("version") != DOCUMENT_VERSION:
        raise StatusInvalid("feed payload is not a version 1 revocation document")
    issuer_hex = _field(payload, "issuer", str)
    issuer = next((c for c in issuers if key_hash(c).hex() == issuer_hex.lower()), None)
    if issuer is None:
        raise StatusInvalid(f"feed issuer {issuer_hex} is not a CA this gateway trusts")
    if signer != issuer:
        _check_delegate(signer, issuer, now, leeway)
    hash_name = envelope.get("hash")
    if hash_name is not None and hash_name not in _HASHES:
        raise StatusInvalid(f"feed signature hash {hash_name!r} is not accepted")
    verify_signature(signer.public_key(), signature, payload_bytes, _HASHES.get(hash_name) if hash_name else None)
    moment = _time(payload.get("time"), "time")
    if moment > now + leeway:
        raise StatusInvalid(f"feed document time {moment.isoformat()} is in the future")
    if moment + max_age + leeway < now:
        raise StatusInvalid(f"feed document from {moment.isoformat()} is too old (replayed?)")
    revocations = payload.get("revocations")
    if not isinstance(revocations, list):
        raise StatusInvalid("feed document field 'revocations' is not a list")
    return FeedDocument(
        issuer_key_hash=bytes.fromhex(issuer_hex),
        since=_count(payload, "since"),
        seq=_count(payload, "seq"),
        latest=_count(payload, "latest"),
        time=moment,
        revocations=tuple(_entry(item) for item in revocations),
        more=bool(payload.get("more", False)),
    )


class FeedGap(StatusInvalid):
    """A feed answer skips sequence numbers, or answers another question than ours."""


class FeedRollback(Exception):
    """The CA's sequence went below ours: its store was restored or replaced."""


def check_sequence(document: FeedDocument, since: int) -> None:
    """Raise FeedRollback or FeedGap unless ``document`` continues exactly after ``since``."""
    if document.since != since:
        raise FeedGap(f"answer is for since={document.since}, we asked since={since}")
    if document.latest < since or document.seq < since:
        raise FeedRollback(f"the CA's latest revocation is {document.latest}, we have seen {since}")
    expected = since
    for entry in document.revocations:
        expected += 1
        if entry.seq != expected:
            raise FeedGap(f"revocation {entry.seq} follows {expected - 1}")
    if document.seq != expected or document.latest < document.seq:
        raise FeedGap(f"answer claims seq {document.seq} after {len(document.revocations)} revocations from {since}")
