"""The EST message formats round-trip, and reject what is not theirs."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from s2sgw.wire import est


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_certs_only_round_trip() -> None:
    """PKCS#7 holds a SET of certificates: readers must not rely on their order."""
    first, second = (_self_signed(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
    body = est.encode_certs_only([first, second])
    assert sorted(est.decode_certs_only(body), key=est.fingerprint) == sorted([first, second], key=est.fingerprint)


def test_csr_round_trip() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    assert est.decode_csr(est.encode_csr(csr)) == csr


@pytest.mark.parametrize("body", [b"***", base64.b64encode(b"not der"), b""])
def test_garbage_is_a_wire_format_error(body: bytes) -> None:
    with pytest.raises(est.WireFormatError):
        est.decode_certs_only(body)
    with pytest.raises(est.WireFormatError):
        est.decode_csr(body)


def test_key_policy() -> None:
    assert est.key_policy_problem(ec.generate_private_key(ec.SECP384R1()).public_key()) is None
    assert est.key_policy_problem(ed25519.Ed25519PrivateKey.generate().public_key()) is None
    assert "curve" in est.key_policy_problem(ec.generate_private_key(ec.SECP256K1()).public_key())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    assert "1024 bits" in est.key_policy_problem(small)


def test_fingerprint_spellings() -> None:
    plain = "ab" * 32
    assert est.normalize_fingerprint(":".join(["AB"] * 32)) == plain
    assert est.normalize_fingerprint("sha256:" + plain.upper()) == plain
    with pytest.raises(est.WireFormatError):
        est.normalize_fingerprint("ab" * 20)
