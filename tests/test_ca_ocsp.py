"""The OCSP responder logic: request bytes in, signed response bytes out, no reactor involved."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.ocsp import (
    GOOD,
    UNKNOWN,
    Answer,
    Query,
    Responder,
    SerialStatus,
)

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
VALIDITY = datetime.timedelta(seconds=300)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ocsp") / "ca", "example.org")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("foreign") / "ca", "example.org")


@pytest.fixture(scope="module")
def alice(ca: CertificateAuthority) -> x509.Certificate:
    return ca.issue("alice").record.certificate()


def responder_for(ca: CertificateAuthority, **kwargs: object) -> Responder:
    return Responder(
        issuer=ca.intermediate_cert, signer_cert=ca.ocsp_cert, signer_key=ca.ocsp_key, **kwargs
    )


def request_for(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def request_by_serial(ca: CertificateAuthority, serial: int) -> bytes:
    template = ocsp.OCSPRequestBuilder().add_certificate(ca.ocsp_cert, ca.intermediate_cert, hashes.SHA1()).build()
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(template.issuer_name_hash, template.issuer_key_hash, serial, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def verify_signed(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    """What a relying party checks: signature by the included delegated signer, responder ID by key hash."""
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificates == [signer]
    assert response.responder_name is None
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
    key = signer.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(response.signature, response.tbs_response_bytes)
    else:  # RSA
        from cryptography.hazmat.primitives.asymmetric import padding

        key.verify(
            response.signature,
            response.tbs_response_bytes,
            padding.PKCS1v15(),
            response.signature_hash_algorithm,
        )


def nonce_of(response: ocsp.OCSPResponse) -> bytes | None:
    try:
        return response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa3072"])
def test_good_answer_is_signed_by_the_delegated_signer(tmp_path: Path, key_type: str) -> None:
    """A certificate we issued and never revoked is `good`, signed by ocsp.pem, valid for `validity`."""
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org", key_type=key_type)
    cert = ca.issue("alice").record.certificate()
    responder = responder_for(ca, validity=VALIDITY)

    answer = responder.answer(request_for(cert, ca.intermediate_cert), NOW, lambda serial: GOOD)

    response = ocsp.load_der_ocsp_response(answer.der)
    verify_signed(response, ca.ocsp_cert)
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == cert.serial_number
    assert response.hash_algorithm.name == "sha1"
    assert response.this_update_utc == NOW
    assert response.next_update_utc == NOW + VALIDITY
    assert nonce_of(response) is None
    assert answer.cacheable and answer.cert_status == "good"


def test_revoked_answer_carries_time_and_reason(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """A revoked serial is answered `revoked` with the store's revocation time and reason."""
    revoked_at = NOW - datetime.timedelta(hours=1)
    status = SerialStatus("revoked", revoked_at, x509.ReasonFlags.key_compromise)

    answer = responder_for(ca).answer(request_for(alice, ca.intermediate_cert), NOW, lambda serial: status)

    response = ocsp.load_der_ocsp_response(answer.der)
    verify_signed(response, ca.ocsp_cert)
    assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == revoked_at
    assert response.revocation_reason is x509.ReasonFlags.key_compromise


def test_status_from_a_store_record(ca: CertificateAuthority) -> None:
    """Store records map to good / revoked (with reason) / unknown (no record)."""
    issued = ca.issue("from-record").record
    assert SerialStatus.from_record(issued) == GOOD
    assert SerialStatus.from_record(None) == UNKNOWN
    [revoked] = ca.revoke(serial=issued.serial, reason="superseded")
    status = SerialStatus.from_record(revoked)
    assert status.state == "revoked"
    assert status.revoked_at == revoked.revoked_at
    assert status.reason is x509.ReasonFlags.superseded


def test_serial_not_in_the_store_is_unknown(ca: CertificateAuthority) -> None:
    """A serial under our issuer that we never issued is answered `unknown`, signed."""
    answer = responder_for(ca).answer(request_by_serial(ca, 12345), NOW, lambda serial: UNKNOWN)

    response = ocsp.load_der_ocsp_response(answer.der)
    verify_signed(response, ca.ocsp_cert)
    assert response.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    assert response.serial_number == 12345


def test_foreign_issuer_is_unauthorized(ca: CertificateAuthority, foreign: CertificateAuthority) -> None:
    """A CertID naming another CA's intermediate (same names, other key) is refused `unauthorized`."""
    cert = foreign.issue("mallory").record.certificate()
    looked_up: list[int] = []

    answer = responder_for(ca).answer(
        request_for(cert, foreign.intermediate_cert), NOW, lambda serial: looked_up.append(serial) or GOOD
    )

    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert looked_up == []


def test_issuer_name_of_another_ca_is_unauthorized(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """Our key hash with another issuer name (e.g. asking about the root) is still not ours."""
    root_request = request_for(ca.root_cert, ca.intermediate_cert)  # name hash of the root, our key
    answer = responder_for(ca).answer(root_request, NOW, lambda serial: GOOD)
    assert answer.status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_negative_serial_is_malformed_request(ca: CertificateAuthority) -> None:
    """A CertID whose serial INTEGER is negative (no certificate has one) is malformed, not a crash."""
    der = request_by_serial(ca, 0x7A7B7C)
    assert der.count(b"\x02\x03\x7a\x7b\x7c") == 1
    negative = der.replace(b"\x02\x03\x7a\x7b\x7c", b"\x02\x03\xfa\x7b\x7c")
    answer = responder_for(ca).answer(negative, NOW, lambda serial: UNKNOWN)
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("body", [b"", b"\x00", b"hello world", b"\x30\x03\x02\x01\x01", b"\x30" * 100])
def test_garbage_is_malformed_request(ca: CertificateAuthority, body: bytes) -> None:
    """Bytes that are not an OCSP request get an unsigned `malformedRequest`."""
    answer = responder_for(ca).answer(body, NOW, lambda serial: GOOD)
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert not answer.cacheable


@pytest.mark.parametrize("size", [1, 16, 32])
def test_nonce_of_allowed_size_is_echoed(ca: CertificateAuthority, alice: x509.Certificate, size: int) -> None:
    """RFC 9654: a nonce of 1 to 32 octets comes back in the signed answer."""
    nonce = bytes(range(size))
    answer = responder_for(ca).answer(request_for(alice, ca.intermediate_cert, nonce=nonce), NOW, lambda s: GOOD)
    response = ocsp.load_der_ocsp_response(answer.der)
    verify_signed(response, ca.ocsp_cert)
    assert nonce_of(response) == nonce
    assert answer.nonce and not answer.cacheable


@pytest.mark.parametrize("size", [0, 33, 128])
def test_nonce_of_wrong_size_is_malformed(ca: CertificateAuthority, alice: x509.Certificate, size: int) -> None:
    """RFC 9654: empty nonces and nonces over 32 octets are malformed requests."""
    answer = responder_for(ca).answer(
        request_for(alice, ca.intermediate_cert, nonce=b"n" * size), NOW, lambda s: GOOD
    )
    assert answer.status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_cert_id_hash_of_the_request_is_answered_in_kind(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """A SHA-256 CertID is answered with a SHA-256 CertID (clients match on it)."""
    body = request_for(alice, ca.intermediate_cert, algorithm=hashes.SHA256())
    response = ocsp.load_der_ocsp_response(responder_for(ca).answer(body, NOW, lambda s: GOOD).der)
    assert response.hash_algorithm.name == "sha256"
    request = ocsp.load_der_ocsp_request(body)
    assert response.issuer_key_hash == request.issuer_key_hash
    assert response.issuer_name_hash == request.issuer_name_hash


def test_cached_query_costs_no_signature(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """Repeated nonce-less queries are served from the pre-signed answer; nonce queries always sign."""
    responder = responder_for(ca)
    lookups: list[int] = []

    def lookup(serial: int) -> SerialStatus:
        lookups.append(serial)
        return GOOD

    plain = request_for(alice, ca.intermediate_cert)
    first = responder.answer(plain, NOW, lookup)
    again = [responder.answer(plain, NOW + datetime.timedelta(seconds=i), lookup) for i in range(1, 50)]
    assert responder.signatures == 1
    assert lookups == [alice.serial_number]
    assert all(answer.der == first.der for answer in again)

    for i in range(3):
        responder.answer(request_for(alice, ca.intermediate_cert, nonce=b"%d" % i), NOW, lookup)
    assert responder.signatures == 4


def test_cached_answer_is_not_served_past_half_its_validity(
    ca: CertificateAuthority, alice: x509.Certificate
) -> None:
    """Askers always get at least half the validity: later, the answer is signed afresh."""
    responder = responder_for(ca, validity=VALIDITY)
    plain = request_for(alice, ca.intermediate_cert)
    responder.answer(plain, NOW, lambda s: GOOD)
    query = responder.parse(plain)
    assert isinstance(query, Query)
    assert responder.cached(query, NOW + VALIDITY / 2 - datetime.timedelta(seconds=1)) is not None
    assert responder.cached(query, NOW + VALIDITY / 2) is None

    later = responder.answer(plain, NOW + VALIDITY / 2, lambda s: GOOD)
    assert later.this_update == NOW + VALIDITY / 2
    assert responder.signatures == 2


def test_refresh_resigns_answers_before_they_must_be_replaced(
    ca: CertificateAuthority, alice: x509.Certificate
) -> None:
    """The background refresh re-signs answers a little before their refresh point, not earlier."""
    responder = responder_for(ca, validity=VALIDITY)
    plain = request_for(alice, ca.intermediate_cert)
    responder.answer(plain, NOW, lambda s: GOOD)

    assert responder.refresh(NOW + datetime.timedelta(seconds=60), lead=0.2) == 0
    assert responder.signatures == 1
    assert responder.refresh(NOW + datetime.timedelta(seconds=90), lead=0.2) == 1
    assert responder.signatures == 2

    query = responder.parse(plain)
    assert isinstance(query, Query)
    hit = responder.cached(query, NOW + datetime.timedelta(seconds=200))
    assert hit is not None and hit.this_update == NOW + datetime.timedelta(seconds=90)


def test_update_resigns_cached_answers_at_once(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """A revocation replaces the cached `good` with a signed `revoked` before anyone asks again."""
    responder = responder_for(ca)
    sha1 = request_for(alice, ca.intermediate_cert)
    sha256 = request_for(alice, ca.intermediate_cert, algorithm=hashes.SHA256())
    responder.answer(sha1, NOW, lambda s: GOOD)
    responder.answer(sha256, NOW, lambda s: GOOD)

    revoked = SerialStatus("revoked", NOW, x509.ReasonFlags.key_compromise)
    assert responder.update(alice.serial_number, revoked, NOW) == 2
    assert responder.signatures == 4

    for body in (sha1, sha256):
        answer = responder.answer(body, NOW, lambda s: pytest.fail("no lookup expected"))
        assert ocsp.load_der_ocsp_response(answer.der).certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert responder.signatures == 4


def test_forget_unknown_drops_only_unknown_answers(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """After an issuance, cached `unknown`s go (the serial may exist now); `good`s stay."""
    responder = responder_for(ca)
    responder.answer(request_for(alice, ca.intermediate_cert), NOW, lambda s: GOOD)
    responder.answer(request_by_serial(ca, 777), NOW, lambda s: UNKNOWN)
    assert len(responder) == 2
    assert responder.forget_unknown() == 1
    assert len(responder) == 1
    responder.forget([alice.serial_number])
    assert len(responder) == 0


def test_cache_is_bounded(ca: CertificateAuthority) -> None:
    """A flood of distinct serials cannot grow the cache past its bound."""
    responder = responder_for(ca, max_cached=10)
    for serial in range(1, 40):
        responder.answer(request_by_serial(ca, serial), NOW, lambda s: UNKNOWN)
    assert len(responder) == 10


# -- property: any bytes in, a well-formed OCSP response out --------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            out.append(value)
            continue
        i = position % len(out)
        if kind == 0:
            out[i] = value
        elif kind == 1:
            del out[i]
        elif kind == 2:
            out.insert(i, value)
        else:
            del out[i:]
    return bytes(out)


_edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6
)


@pytest.fixture(scope="module")
def seeds(ca: CertificateAuthority, alice: x509.Certificate) -> list[bytes]:
    return [
        request_for(alice, ca.intermediate_cert),
        request_for(alice, ca.intermediate_cert, nonce=b"0123456789abcdef"),
        request_for(alice, ca.intermediate_cert, algorithm=hashes.SHA256()),
        request_by_serial(ca, 1),
    ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.tuples(st.integers(0, 3), _edits),
    )
)
def test_any_bytes_get_a_well_formed_response(
    ca: CertificateAuthority, seeds: list[bytes], data: bytes | tuple[int, list[tuple[int, int, int]]]
) -> None:
    """Random and mutated requests always get a parseable OCSP response, signed when successful."""
    body = data if isinstance(data, bytes) else _mutate(seeds[data[0]], data[1])
    responder = responder_for(ca)

    answer = responder.answer(body, NOW, lambda serial: GOOD if serial % 2 else UNKNOWN)

    assert isinstance(answer, Answer)
    response = ocsp.load_der_ocsp_response(answer.der)
    assert response.response_status is answer.status
    if response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL:
        verify_signed(response, ca.ocsp_cert)
        request = ocsp.load_der_ocsp_request(body)
        assert response.serial_number == request.serial_number
        assert nonce_of(response) == (
            request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce if answer.nonce else None
        )


def test_verify_signed_rejects_a_tampered_answer(ca: CertificateAuthority, alice: x509.Certificate) -> None:
    """The helper the property relies on really checks the signature."""
    der = bytearray(responder_for(ca).answer(request_for(alice, ca.intermediate_cert), NOW, lambda s: GOOD).der)
    der[der.index(b"\x18\x0f") + 5] ^= 1  # a digit of thisUpdate (GeneralizedTime)
    with pytest.raises(InvalidSignature):
        verify_signed(ocsp.load_der_ocsp_response(bytes(der)), ca.ocsp_cert)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa3072", "ed25519"])
def test_a_request_about_several_certificates_gets_one_answer_about_each_signed_by_the_signer(
    tmp_path: Path, key_type: str
) -> None:
    """Split into single requests (the nonce kept in each), answered, joined and signed once more:
    the joined answer verifies with the signer's key and lists every certificate in order."""
    import subprocess

    from s2sgw.ca.ocsp import Responder, SerialStatus
    from s2sgw.ca.ocsp_multi import MAX_CERTIFICATES, combine, split_request

    authority = CertificateAuthority.init(tmp_path / "ca", "example.org", key_type=key_type)
    names = ("alice", "bob", "carol")
    for name in names:
        authority.write_identity(authority.issue(name), tmp_path)
    authority.revoke(name="bob", reason="keyCompromise")
    request = tmp_path / "request.der"
    certs = [arg for name in names for arg in ("-cert", str(tmp_path / f"{name}.pem"))]
    subprocess.run(
        ["openssl", "ocsp", "-issuer", str(authority.directory / "intermediate.pem"), *certs, "-reqout", str(request)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    body = request.read_bytes()
    singles = split_request(body)
    assert singles is not None and len(singles) == 3
    parsed = [ocsp.load_der_ocsp_request(single) for single in singles]
    serials = [x509.load_pem_x509_certificate((tmp_path / f"{n}.pem").read_bytes()).serial_number for n in names]
    assert [p.serial_number for p in parsed] == serials
    nonces = {p.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for p in parsed}
    assert len(nonces) == 1  # the one nonce of the request, in each part
    assert split_request(singles[0]) is None  # one certificate: the usual path

    responder = Responder(authority.intermediate_cert, authority.ocsp_cert, authority.ocsp_key)
    lookup = lambda serial: SerialStatus.from_record(authority.lookup(serial))  # noqa: E731
    now = datetime.datetime.now(datetime.UTC)
    answers = [responder.answer(single, now, lookup) for single in singles]
    joined = combine(answers, [(authority.ocsp_cert, authority.ocsp_key)])
    response = ocsp.load_der_ocsp_response(joined.der)
    assert [(r.serial_number, r.certificate_status) for r in response.responses] == [
        (serials[0], ocsp.OCSPCertStatus.GOOD),
        (serials[1], ocsp.OCSPCertStatus.REVOKED),
        (serials[2], ocsp.OCSPCertStatus.GOOD),
    ]
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce in nonces
    public_key = authority.ocsp_cert.public_key()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(response.signature, response.tbs_response_bytes)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    else:
        from cryptography.hazmat.primitives.asymmetric import padding

        public_key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), hashes.SHA256())
    other = CertificateAuthority.init(tmp_path / "other", "example.org", key_type=key_type)
    strangers = combine(answers, [(other.ocsp_cert, other.ocsp_key)])  # a signer replaced meanwhile
    assert strangers.status is ocsp.OCSPResponseStatus.TRY_LATER
    many = [arg for _ in range(MAX_CERTIFICATES + 1) for arg in ("-cert", str(tmp_path / "alice.pem"))]
    subprocess.run(
        ["openssl", "ocsp", "-issuer", str(authority.directory / "intermediate.pem"), *many, "-reqout", str(request)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    with pytest.raises(ValueError, match="more than"):
        split_request(request.read_bytes())
