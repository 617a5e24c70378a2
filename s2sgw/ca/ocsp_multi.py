"""OCSP requests about several certificates in one (RFC 6960 allows a list; RFC 5019 clients send one).

cryptography parses and builds single-certificate requests and answers only. So a request with
several is split into single-certificate requests (same extensions: the nonce), each is answered
the usual way (cached, looked up, signed), and the answers' SingleResponses are joined into one
``tbsResponseData`` signed once more by the same signer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509 import ocsp

from s2sgw.ca.ocsp import (
    MALFORMED_ANSWER,
    TRY_LATER_ANSWER,
    UNAUTHORIZED_ANSWER,
    Answer,
    _header,
    _tlv,
)

MAX_CERTIFICATES = 20  # per request: more is refused as malformed (each costs a lookup)


def _elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, offset, end) of each DER element in ``data[start:end]``."""
    found = []
    offset = start
    while offset < end:
        _, content_end = _header(data, offset)
        found.append((data[offset], offset, content_end))
        offset = content_end
    if offset != end:
        raise ValueError("DER elements overrun their container")
    return found


def split_request(body: bytes) -> list[bytes] | None:
    """Single-certificate requests for each certificate ``body`` asks about, when it asks about
    several; None for a one-certificate request (or anything else: the usual parser judges it).

    Raises ValueError for a list longer than :data:`MAX_CERTIFICATES`.
    """
    try:
        # OCSPRequest ::= SEQUENCE { tbsRequest TBSRequest, optionalSignature [0] EXPLICIT ... }
        start, end = _header(body, 0)
        if body[0] != 0x30 or end != len(body):
            return None
        (tag, tbs, tbs_end), *_ = _elements(body, start, end)
        # TBSRequest ::= SEQUENCE { version [0], requestorName [1], requestList SEQUENCE OF
        #     Request, requestExtensions [2] EXPLICIT Extensions OPTIONAL }
        tbs_start, _ = _header(body, tbs)
        fields = _elements(body, tbs_start, tbs_end)
        lists = [(offset, field_end) for field_tag, offset, field_end in fields if field_tag == 0x30]
        if tag != 0x30 or len(lists) != 1:
            return None
        list_offset, list_end = lists[0]
        list_start, _ = _header(body, list_offset)
        requests = _elements(body, list_start, list_end)
    except (IndexError, ValueError):
        return None
    if len(requests) < 2:
        return None
    if len(requests) > MAX_CERTIFICATES:
        raise ValueError(f"more than {MAX_CERTIFICATES} certificates in one request")
    singles = []
    for _, offset, request_end in requests:
        rebuilt = b"".join(
            _tlv(0x30, body[offset:request_end]) if field_offset == list_offset else body[field_offset:field_end]
            for _, field_offset, field_end in fields
        )
        singles.append(_tlv(0x30, _tlv(0x30, rebuilt)))
    return singles


def _unwrap(answer: bytes) -> tuple[bytes, bytes, bytes, list[tuple[int, int, int]]]:
    """(responseStatus, responseType OID, BasicOCSPResponse, its fields) of a signed answer.

    OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT SEQUENCE {
    responseType OID, response OCTET STRING (BasicOCSPResponse) } }
    """
    start, _ = _header(answer, 0)
    _, status_end = _header(answer, start)
    explicit_start, _ = _header(answer, status_end)
    bytes_start, _ = _header(answer, explicit_start)
    _, oid_end = _header(answer, bytes_start)
    octets_start, octets_end = _header(answer, oid_end)
    basic = answer[octets_start:octets_end]
    basic_start, basic_end = _header(basic, 0)
    return answer[start:status_end], answer[bytes_start:oid_end], basic, _elements(basic, basic_start, basic_end)


def _single_responses(answer: bytes) -> tuple[bytes, list[bytes]]:
    """(tbsResponseData, its SingleResponses) of a signed answer."""
    _, _, basic, fields = _unwrap(answer)
    _, tbs_offset, tbs_end = fields[0]
    tbs = basic[tbs_offset:tbs_end]
    tbs_start, _ = _header(tbs, 0)
    for tag, offset, end in _elements(tbs, tbs_start, len(tbs)):
        if tag == 0x30:  # responses SEQUENCE OF SingleResponse (the only untagged SEQUENCE)
            list_start, _ = _header(tbs, offset)
            return tbs, [tbs[o:e] for _, o, e in _elements(tbs, list_start, end)]
    raise ValueError("no responses in the answer")


def _sign(key: CertificateIssuerPrivateKeyTypes, data: bytes) -> bytes:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(f"cannot sign with a {type(key).__name__}")


def combine(
    answers: list[Answer], signers: Sequence[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]]
) -> Answer:
    """One answer holding the SingleResponses of ``answers`` (signed single answers, in request
    order), signed anew by the delegated signer that signed them (found among ``signers``).

    The first unsuccessful answer if any is; ``unauthorized`` when the certificates belong to
    issuing CAs with different signers (one answer has one signer); ``tryLater`` when the signer
    was replaced meanwhile.
    """
    for answer in answers:
        if answer.status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return answer
    unwrapped = [_unwrap(answer.der) for answer in answers]
    signed_by = {basic[fields[3][1] : fields[3][2]] for _, _, basic, fields in unwrapped if len(fields) > 3}
    if len(signed_by) != 1 or any(len(fields) < 4 for *_, fields in unwrapped):
        return UNAUTHORIZED_ANSWER
    (certs,) = signed_by
    keys = {_tlv(0xA0, _tlv(0x30, cert.public_bytes(serialization.Encoding.DER))): key for cert, key in signers}
    signer_key = keys.get(certs)
    if signer_key is None:
        return TRY_LATER_ANSWER
    first = answers[0].der
    tbs, _ = _single_responses(first)
    singles = [single for answer in answers for single in _single_responses(answer.der)[1]]
    tbs_start, _ = _header(tbs, 0)
    parts = []
    for tag, offset, end in _elements(tbs, tbs_start, len(tbs)):
        parts.append(_tlv(0x30, b"".join(singles)) if tag == 0x30 else tbs[offset:end])
    new_tbs = _tlv(0x30, b"".join(parts))
    status, oid, basic, fields = unwrapped[0]
    # BasicOCSPResponse ::= SEQUENCE { tbsResponseData, signatureAlgorithm, signature BIT STRING,
    #     certs [0] EXPLICIT SEQUENCE OF Certificate OPTIONAL }
    algorithm = basic[fields[1][1] : fields[1][2]]
    signature = _tlv(0x03, b"\x00" + _sign(signer_key, new_tbs))
    new_basic = _tlv(0x30, new_tbs + algorithm + signature + certs)
    der = _tlv(0x30, status + _tlv(0xA0, _tlv(0x30, oid + _tlv(0x04, new_basic))))
    return Answer(
        der=der,
        status=ocsp.OCSPResponseStatus.SUCCESSFUL,
        this_update=min(a.this_update for a in answers if a.this_update is not None),
        next_update=min(a.next_update for a in answers if a.next_update is not None),
        nonce=answers[0].nonce,
        etag='"' + hashlib.sha256(der).hexdigest()[:32] + '"',
    )


def answer_each(
    body: bytes, answer_one: Callable[[bytes], object]
) -> list[object] | Answer | None:
    """``answer_one`` for each certificate of a several-certificate request; None for a
    one-certificate request; the malformed answer for a list too long."""
    try:
        singles = split_request(body)
    except ValueError:
        return MALFORMED_ANSWER
    if singles is None:
        return None
    return [answer_one(single) for single in singles]


