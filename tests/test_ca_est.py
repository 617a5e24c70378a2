"""EST resources on a task.Clock, store work run inline, the TLS client certificate injected."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.enroll import Enroller, PeerCertificate, RateLimiter
from s2sgw.ca.est import EstSite, build_est_root
from s2sgw.ca.ocsp import Responder
from s2sgw.ca.publisher import StatusPublisher
from s2sgw.ca.tokens import TokenBook
from s2sgw.serials import serial_text
from s2sgw.wire import est as wire

DOMAIN = "example.org"
BASE = "https://ca.test/.well-known/est/"
CSR_TYPE = {"Content-Type": "application/pkcs10"}


def result_of(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def inline(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Store work at once (the real server runs it in a thread)."""
    return defer.maybeDeferred(f, *args)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: Any = None,
    *,
    subject: list[x509.NameAttribute] | None = None,
    sans: list[x509.GeneralName] | None = None,
    extensions: list[x509.ExtensionType] = (),
) -> bytes:
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return wire.encode_csr(builder.sign(key, hashes.SHA256()))


def cn(name: str) -> list[x509.NameAttribute]:
    return [x509.NameAttribute(NameOID.COMMON_NAME, name)]


def basic(name: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()}


@attrs.define
class Harness:
    ca: CertificateAuthority
    clock: task.Clock
    enroller: Enroller
    tokens: TokenBook
    stub: StubTreq
    log: list[str]
    peer: PeerCertificate | None = None

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def token(self, name: str, **kwargs: Any) -> str:
        return self.tokens.create(name, now=self.now(), **kwargs)

    def fetch(self, method: str, operation: str, **kwargs: Any) -> tuple[Any, bytes]:
        d = self.stub.request(method, BASE + operation, **kwargs)
        self.stub.flush()
        response = result_of(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response, result_of(body)

    def enroll(self, name: str, token: str, body: bytes | None = None, **headers: str) -> tuple[Any, bytes]:
        return self.fetch(
            "POST", "simpleenroll", data=make_csr() if body is None else body,
            headers={**CSR_TYPE, **basic(name, token), **headers},
        )  # fmt: skip

    def reenroll(self, body: bytes | None = None) -> tuple[Any, bytes]:
        return self.fetch("POST", "simplereenroll", data=make_csr() if body is None else body, headers=CSR_TYPE)

    def rows(self) -> int:
        return len(self.ca.records())


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else values[0]


def leaf_of(body: bytes, key: Any = None) -> x509.Certificate:
    certificates = wire.decode_certs_only(body)
    leaves = [c for c in certificates if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca]
    assert len(leaves) == 1
    if key is not None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        assert leaves[0].public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    return leaves[0]


@pytest.fixture
def est_log() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "s2sgw.ca.est":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def make_harness(
    tmp_path: Path, est_log: list[str], *, limit: int = 10, url: str | None = None, store: str | None = None
) -> Harness:
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN, url=url, store=store)
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
    tokens = TokenBook(ca.store)
    enroller = Enroller(ca, tokens, lifetime=datetime.timedelta(seconds=60), limiter=RateLimiter(limit=limit))
    harness: Harness

    def peer(request: Any) -> PeerCertificate | None:
        return harness.peer

    stub = StubTreq(build_est_root(enroller, inline, clock, peer))
    harness = Harness(ca, clock, enroller, tokens, stub, est_log)
    return harness


@pytest.fixture
def h(tmp_path: Path, est_log: list[str], ca_store: str | None) -> Harness:
    return make_harness(tmp_path, est_log, url="http://127.0.0.1:8080", store=ca_store)


# -- cacerts --------------------------------------------------------------------------------


def test_cacerts_holds_every_root_of_the_bundle_and_the_issuing_intermediate(h: Harness) -> None:
    other_key = new_key()
    other_root = (
        x509.CertificateBuilder().subject_name(x509.Name(cn("next root"))).issuer_name(x509.Name(cn("next root")))
        .public_key(other_key.public_key()).serial_number(7).not_valid_before(h.now())
        .not_valid_after(h.now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other_key, hashes.SHA256())
    )  # fmt: skip
    bundle = h.ca.directory / "bundle.pem"
    bundle.write_bytes(bundle.read_bytes() + other_root.public_bytes(serialization.Encoding.PEM))

    response, body = h.fetch("GET", "cacerts")

    assert response.code == 200
    assert header(response, "Content-Type") == "application/pkcs7-mime"
    assert header(response, "Content-Transfer-Encoding") == "base64"
    assert set(wire.decode_certs_only(body)) == {h.ca.root_cert, other_root, h.ca.intermediate_cert}


# -- simpleenroll -------------------------------------------------------------------------------


def test_a_token_buys_a_certificate_the_ca_names_from_the_token(h: Harness) -> None:
    """The CSR says only CN=orders; the certificate carries the token's names and the CA's extensions."""
    key = new_key()
    token = h.token("orders", dns=["orders.svc.cluster.local"])

    response, body = h.enroll("orders", token, make_csr(key, subject=cn("orders")))

    assert response.code == 200, body
    assert header(response, "Content-Type") == "application/pkcs7-mime; smime-type=certs-only"
    assert header(response, "Content-Transfer-Encoding") == "base64"
    certificates = wire.decode_certs_only(body)
    assert h.ca.intermediate_cert in certificates and len(certificates) == 2
    leaf = leaf_of(body, key)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{DOMAIN}/orders"]
    assert san.get_values_for_type(x509.DNSName) == ["orders", f"orders.{DOMAIN}", "orders.svc.cluster.local"]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
    ]  # fmt: skip
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location.value for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP] == [
        "http://127.0.0.1:8080/ocsp"
    ]
    assert leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(seconds=66)
    record = h.ca.lookup(leaf.serial_number)
    assert record is not None and record.issued_via == "token" and record.certificate() == leaf
    (line,) = [line for line in h.log if line.startswith("EST issued")]
    assert line == (
        f"EST issued identity=spiffe://{DOMAIN}/orders serial={serial_text(leaf.serial_number)} "
        f"authorized=token client=127.0.0.1 not_after={leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    )


def test_an_issued_certificate_is_answered_good_by_ocsp_at_once(h: Harness) -> None:
    response, body = h.enroll("orders", h.token("orders"))
    leaf = leaf_of(body)
    responder = Responder(h.ca.intermediate_cert, h.ca.ocsp_cert, h.ca.ocsp_key, datetime.timedelta(minutes=5))
    publisher = StatusPublisher(ca=h.ca, responder=responder, clock=h.clock, in_thread=inline)
    query = ocsp.OCSPRequestBuilder().add_certificate(leaf, h.ca.intermediate_cert, hashes.SHA1()).build()

    answer = result_of(defer.maybeDeferred(publisher.answer, query.public_bytes(serialization.Encoding.DER)))

    assert ocsp.load_der_ocsp_response(answer.der).certificate_status is ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize(
    "names",
    [
        None,  # no extension at all
        ["URI:spiffe://example.org/orders", "DNS:orders", "DNS:orders.example.org", "DNS:extra.example"],
        ["DNS:extra.example", "DNS:orders.example.org", "URI:spiffe://example.org/orders", "DNS:orders"],
    ],
)
def test_a_csr_may_be_silent_or_repeat_exactly_what_the_ca_issues(h: Harness, names: list[str] | None) -> None:
    kinds = {"URI": x509.UniformResourceIdentifier, "DNS": x509.DNSName}
    sans = None if names is None else [kinds[n.split(":", 1)[0]](n.split(":", 1)[1]) for n in names]
    response, body = h.enroll("orders", h.token("orders", dns=["extra.example"]), make_csr(sans=sans))
    assert response.code == 200, body


def test_csr_attributes_other_than_extension_requests_are_ignored(h: Harness) -> None:
    """RFC 7030 clients may send a challengePassword; it asks for nothing in the certificate."""
    from cryptography.x509.oid import AttributeOID

    builder = (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name(cn("orders")))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"not a token")
    )  # fmt: skip
    body = wire.encode_csr(builder.sign(new_key(), hashes.SHA256()))
    response, _ = h.enroll("orders", h.token("orders"), body)
    assert response.code == 200


def _bad_signature() -> bytes:
    der = bytearray(base64.b64decode(make_csr(subject=cn("orders"))))
    der[-1] ^= 0x01  # the last octet of the signature's s
    return base64.encodebytes(bytes(der))


REFUSED_CSRS: dict[str, tuple[Callable[[], bytes], str]] = {
    "garbage base64": (lambda: b"this is %%% not base64!", "not base64"),
    "not a CSR": (lambda: base64.b64encode(b"\x30\x03\x02\x01\x05"), "not a PKCS#10 request"),
    "bad signature": (_bad_signature, "signature does not verify"),
    "RSA 1024": (lambda: make_csr(rsa.generate_private_key(65537, 1024)), "too small"),
    "secp256k1": (lambda: make_csr(ec.generate_private_key(ec.SECP256K1())), "secp256k1 is not allowed"),
    "another CN": (lambda: make_csr(subject=cn("billing")), "subject must be empty or CN=orders"),
    "an organization": (
        lambda: make_csr(subject=[*cn("orders"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]),
        "subject must be",
    ),
    "another DNS name": (
        lambda: make_csr(sans=[x509.UniformResourceIdentifier("spiffe://example.org/orders"), x509.DNSName("orders"),
                               x509.DNSName("orders.example.org"), x509.DNSName("evil.example")]),
        "names this CA does not issue",
    ),  # fmt: skip
    "another SPIFFE ID": (
        lambda: make_csr(sans=[x509.UniformResourceIdentifier("spiffe://example.org/admin")]),
        "names this CA does not issue",
    ),
    "a CA extension": (
        lambda: make_csr(extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
        "only subjectAltName",
    ),
}


@pytest.mark.parametrize("case", REFUSED_CSRS)
def test_a_bad_csr_is_refused_with_400_and_keeps_the_token(h: Harness, case: str) -> None:
    body_of, reason = REFUSED_CSRS[case]
    token = h.token("orders")

    response, body = h.enroll("orders", token, body_of())

    assert response.code == 400
    assert reason in body.decode()
    assert h.rows() == 0
    (line,) = h.log
    assert line.startswith("EST refused simpleenroll identity=orders client=127.0.0.1 status=400 reason=")
    assert reason in line
    assert h.enroll("orders", token)[0].code == 200  # a refused CSR does not spend the token


def test_credential_problems_are_401_or_403_and_issue_nothing(h: Harness) -> None:
    token = h.token("orders")
    spent = h.token("orders")
    assert h.enroll("orders", spent)[0].code == 200
    expiring = h.token("orders", ttl=datetime.timedelta(seconds=30))
    h.clock.advance(30)
    rows = h.rows()
    h.log.clear()
    cases = [
        ({**CSR_TYPE}, 401, "no HTTP Basic credentials"),
        ({**CSR_TYPE, "Authorization": "Bearer x"}, 401, "no HTTP Basic credentials"),
        ({**CSR_TYPE, **basic("Orders!", token)}, 401, "user name is not a service name"),
        ({**CSR_TYPE, **basic("orders", "s2sgw_" + "x" * 43)}, 401, "unknown token"),
        ({**CSR_TYPE, **basic("orders", spent)}, 401, "token already used"),
        ({**CSR_TYPE, **basic("orders", expiring)}, 401, "token expired"),
        ({**CSR_TYPE, **basic("billing", token)}, 403, "token is bound to another name"),
        ({"Content-Type": "application/x-www-form-urlencoded", **basic("orders", token)}, 415, "Content-Type"),
    ]
    for headers, status, reason in cases:
        response, body = h.fetch("POST", "simpleenroll", data=make_csr(), headers=headers)
        assert (response.code, reason in body.decode()) == (status, True), (headers, body)
        challenge = header(response, "WWW-Authenticate")
        assert challenge == ('Basic realm="s2sgw"' if status == 401 else None)
        assert h.log[-1].startswith("EST refused simpleenroll") and f"status={status} reason={reason}" in h.log[-1]
    assert len(h.log) == len(cases)
    assert h.rows() == rows
    assert h.enroll("orders", token)[0].code == 200  # none of that spent the good token


def test_no_byte_of_a_token_reaches_the_log(h: Harness) -> None:
    token = h.token("orders")
    h.enroll("billing", token)
    h.enroll("orders", token, b"garbage")
    h.enroll("orders", token)
    h.enroll("orders", token)
    secret = token.removeprefix("s2sgw_")
    assert len(h.log) == 4
    assert not any(secret[i : i + 8] in line for line in h.log for i in range(len(secret) - 7))


def test_past_the_rate_limit_an_identity_gets_429_with_retry_after(tmp_path: Path, est_log: list[str]) -> None:
    h = make_harness(tmp_path, est_log, limit=2)
    refused = [h.enroll("orders", h.token("orders"), b"garbage")[0].code for _ in range(3)]
    assert refused == [400, 400, 400]  # refusals take no slot
    assert [h.enroll("orders", h.token("orders"))[0].code for _ in range(2)] == [200, 200]
    h.clock.advance(20)
    token = h.token("orders")

    response, body = h.enroll("orders", token)

    assert response.code == 429
    assert header(response, "Retry-After") == "40"
    assert h.rows() == 2
    assert "status=429 reason=rate limit of 2 certificates per 60s reached" in h.log[-1]
    assert h.enroll("billing", h.token("billing"))[0].code == 200  # per identity
    h.clock.advance(40)
    assert h.enroll("orders", token)[0].code == 200  # the token was not spent by the 429


# -- simplereenroll -------------------------------------------------------------------------------


def _enrolled(h: Harness, name: str = "orders", **kwargs: Any) -> x509.Certificate:
    response, body = h.enroll(name, h.token(name, **kwargs))
    assert response.code == 200
    return leaf_of(body)


def test_a_current_certificate_buys_its_successor_with_the_same_names(h: Harness) -> None:
    current = _enrolled(h, dns=["orders.svc"])
    h.peer = PeerCertificate(current, chain_ok=True)
    key = new_key()
    h.clock.advance(40)

    response, body = h.reenroll(make_csr(key))

    assert response.code == 200, body
    renewed = leaf_of(body, key)
    assert renewed.serial_number != current.serial_number
    assert renewed.subject == current.subject
    assert (
        renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        == current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert renewed.not_valid_after_utc > current.not_valid_after_utc
    assert h.ca.lookup(renewed.serial_number).issued_via == "renewal"
    assert h.log[-1].startswith(f"EST issued identity=spiffe://{DOMAIN}/orders serial=")
    assert "authorized=renewal client=127.0.0.1" in h.log[-1]


def test_renewal_is_refused_with_403_unless_the_certificate_is_current_and_ours(h: Harness) -> None:
    revoked = _enrolled(h, "revoked")
    h.ca.revoke(name="revoked", reason="keyCompromise")
    expiring = _enrolled(h, "expiring")
    h.clock.advance(61)  # 60-second certificates: "expiring" has expired
    good = _enrolled(h, "good")
    # Another CA's certificate for the same name, even with the very serial of ours: only the exact DER counts.
    other = CertificateAuthority.init(h.ca.directory.parent / "other", DOMAIN)
    foreign = other.issue("good").record.certificate()
    same_serial = attrs.evolve(other, serial_source=lambda: good.serial_number).issue("good").record.certificate()
    rows = h.rows()
    h.log.clear()
    cases = [
        (None, "no client certificate"),
        (PeerCertificate(foreign, chain_ok=False, chain_error="verify error 20 at depth 0"), "does not chain to this CA"),
        (PeerCertificate(foreign, chain_ok=True), "was not issued by this CA"),
        (PeerCertificate(same_serial, chain_ok=True), "was not issued by this CA"),
        (PeerCertificate(revoked, chain_ok=True), "is revoked (keyCompromise)"),
        (PeerCertificate(expiring, chain_ok=False, chain_error="verify error 10 at depth 0"),
         "expired: enroll again with a new token"),
        (PeerCertificate(good, chain_ok=False, chain_error="verify error 2 at depth 1"), "does not chain to this CA"),
    ]  # fmt: skip
    for peer, reason in cases:
        h.peer = peer
        response, body = h.reenroll()
        assert (response.code, reason in body.decode()) == (403, True), (reason, body)
        assert h.log[-1].startswith("EST refused simplereenroll") and "status=403 reason=" in h.log[-1]
        assert reason in h.log[-1]
    assert h.rows() == rows
    h.peer = PeerCertificate(good, chain_ok=True)
    assert h.reenroll()[0].code == 200


def test_renewal_csrs_follow_the_same_rules(h: Harness) -> None:
    h.peer = PeerCertificate(_enrolled(h), chain_ok=True)
    response, body = h.reenroll(make_csr(subject=cn("billing")))
    assert response.code == 400 and "subject must be empty or CN=orders" in body.decode()
    response, body = h.reenroll(make_csr(rsa.generate_private_key(65537, 1024)))
    assert response.code == 400 and "too small" in body.decode()
    assert h.rows() == 1


# -- HTTP details ------------------------------------------------------------------------------------


def test_an_oversized_body_is_refused_with_413_and_a_log_line(h: Harness) -> None:
    site = EstSite(h.stub._agent._rootResource, max_body=1024)  # the site twistd builds, with a small limit
    h.stub._agent._serverFactory = site
    response, _ = h.fetch("POST", "simpleenroll", data=b"A" * 5000, headers={**CSR_TYPE, **basic("orders", "t")})
    assert response.code == 413
    assert h.log == ["EST refused simpleenroll identity=- client=127.0.0.1 status=413 reason=body larger than 1024 bytes"]
    assert h.rows() == 0


def test_a_broken_store_answers_500_and_logs_the_failure(h: Harness, logged_errors: Any, ca_store: str | None) -> None:
    logged_errors.expect("EST simpleenroll failed")
    token = h.token("orders")
    if ca_store is None:
        (h.ca.directory / "ca.db").unlink()
    else:
        with psycopg.connect(ca_store, autocommit=True) as connection:
            connection.execute("DROP TABLE certificates")

    response, _ = h.enroll("orders", token)

    assert response.code == 500
    assert h.log[-1].startswith("EST refused simpleenroll identity=- client=127.0.0.1 status=500")


def test_unknown_paths_and_methods_are_not_enrollments(h: Harness) -> None:
    response, _ = h.fetch("GET", "simpleenroll")
    assert (response.code, header(response, "Allow")) == (405, "POST")
    assert h.log[-1] == "EST refused simpleenroll identity=- client=127.0.0.1 status=405 reason=simpleenroll takes a POST"
    assert h.fetch("POST", "cacerts", data=b"", headers=CSR_TYPE)[0].code == 405
    for path in ("serverkeygen", "csrattrs", "", "../../ocsp"):
        assert h.fetch("GET", path)[0].code == 404
    d = h.stub.get("https://ca.test/")
    h.stub.flush()
    assert result_of(d).code == 404
    assert h.rows() == 0


def test_serials_are_logged_as_openssl_prints_them() -> None:
    """Upper-case hex in whole octets, so a log line can be matched with `openssl x509 -serial`."""
    assert [serial_text(s) for s in (0xABC, 0x1F, 0x100)] == ["0ABC", "1F", "0100"]
