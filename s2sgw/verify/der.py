"""Just enough DER to read what ``cryptography`` does not expose: the signature algorithm written
inside a certificate's or a CRL's signed part, next to the one written outside it.

RFC 5280 requires the two to be identical (4.1.1.2, 5.1.1.2); a signer or a forger that makes
them differ says one thing to the verifier and another to whoever reads the signed data.
"""

from __future__ import annotations


class DERError(ValueError):
    """The bytes are not the DER structure expected."""


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``at``; definite lengths only."""
    if at + 2 > len(data):
        raise DERError("truncated element")
    tag, first = data[at], data[at + 1]
    start = at + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise DERError("unsupported or truncated length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise DERError("element runs past the end")
    return tag, start, end


_SEQUENCE = 0x30
_INTEGER = 0x02
_VERSION = 0xA0  # [0] EXPLICIT Version, certificates only


def signature_algorithms(signed: bytes) -> tuple[bytes, bytes]:
    """(inner, outer) AlgorithmIdentifier encodings of a certificate or CRL in DER.

    ``SEQUENCE { tbs SEQUENCE { [version], [serial], signature AlgorithmIdentifier, ... },
    signatureAlgorithm AlgorithmIdentifier, signatureValue BIT STRING }``: a certificate's TBS
    starts with an explicit [0] version and the serial number, a CRL's with an optional INTEGER
    version.
    """
    tag, start, end = _element(signed, 0)
    if tag != _SEQUENCE:
        raise DERError("not a SEQUENCE")
    tag, tbs_start, tbs_end = _element(signed, start)
    if tag != _SEQUENCE:
        raise DERError("signed part is not a SEQUENCE")
    at = tbs_start
    tag, _, after = _element(signed, at)
    if tag == _VERSION:  # certificate: [0] version, then the serial number
        at = after
        tag, _, after = _element(signed, at)
        if tag != _INTEGER:
            raise DERError("no serial number after the version")
        at = after
    elif tag == _INTEGER:  # CRL: optional version
        at = after
    tag, _, inner_end = _element(signed, at)
    if tag != _SEQUENCE:
        raise DERError("no inner AlgorithmIdentifier")
    inner = signed[at:inner_end]
    tag, _, outer_end = _element(signed, tbs_end)
    if tag != _SEQUENCE:
        raise DERError("no outer AlgorithmIdentifier")
    return inner, signed[tbs_end:outer_end]
