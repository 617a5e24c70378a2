"""The status server's resources and store watcher, on a task.Clock with store work run inline."""

from __future__ import annotations

import base64
import datetime
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.application.service import IService
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure

from s2sgw import cli
from s2sgw.ca import tap
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.server import StatusSite, build_root, decode_get_path
from tests.doubles import BASE, Harness, Inline, make_harness, ocsp_request, result_of


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", "example.org")




@pytest.fixture
def harness(ca: CertificateAuthority) -> Harness:
    h = make_harness(ca)
    yield h
    h.watcher.stopService()


def test_post_answers_good_with_the_ocsp_content_type(harness: Harness) -> None:
    """POST /ocsp with a request for an issued certificate answers `good`, as application/ocsp-response."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)

    response, answer = harness.post(harness.request(cert))

    assert response.code == 200
    assert header(response, "Content-Type") == "application/ocsp-response"
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.serial_number == cert.serial_number


def test_cached_serial_costs_no_lookup_and_no_signature(harness: Harness) -> None:
    """The first query looks the serial up in a thread and signs; the next ones do neither."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)
    harness.inline.calls.clear()

    first = [harness.post(harness.request(cert))[1] for _ in range(5)]

    assert harness.inline.calls.count("lookup") == 1
    assert harness.publisher.responder.signatures == 1
    assert len({answer.tbs_response_bytes for answer in first}) == 1


def test_nonce_requests_sign_each_time_without_a_new_lookup(harness: Harness) -> None:
    """A nonce forces a fresh signature, but the status comes from memory after the first lookup."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)
    harness.inline.calls.clear()

    for i in range(3):
        nonce = b"nonce-%d" % i
        _, answer = harness.post(harness.request(cert, nonce))
        assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce

    assert harness.inline.calls.count("lookup") == 1
    assert harness.publisher.responder.signatures == 3


def test_revocation_is_answered_after_one_poll_and_resigned_before_anyone_asks(harness: Harness) -> None:
    """`revoke` in the store shows at the next quarter-second poll; the cached answer is replaced at once."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)
    assert harness.post(harness.request(cert))[1].certificate_status is ocsp.OCSPCertStatus.GOOD
    assert harness.publisher.responder.signatures == 1

    harness.ca.revoke(name="alice", reason="keyCompromise")
    harness.clock.advance(0.25)
    assert harness.publisher.responder.signatures == 2  # re-signed by the watcher

    _, answer = harness.post(harness.request(cert))
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason is x509.ReasonFlags.key_compromise
    assert harness.publisher.responder.signatures == 2
    assert harness.publisher.last_seq == 1


def test_serial_issued_after_an_unknown_answer_becomes_good(ca: CertificateAuthority) -> None:
    """A cached `unknown` is dropped when the store changes, so a new certificate is not stuck unknown."""
    ca = attrs.evolve(ca, serial_source=lambda: 0x4242)
    h = make_harness(ca)
    try:
        template = ocsp.OCSPRequestBuilder().add_certificate(ca.ocsp_cert, ca.intermediate_cert, hashes.SHA1()).build()
        body = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(template.issuer_name_hash, template.issuer_key_hash, 0x4242, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        assert h.post(body)[1].certificate_status is ocsp.OCSPCertStatus.UNKNOWN

        assert ca.issue("late").record.serial == 0x4242
        h.clock.advance(0.25)

        assert h.post(body)[1].certificate_status is ocsp.OCSPCertStatus.GOOD
    finally:
        h.watcher.stopService()


def test_lookup_overtaken_by_a_revocation_is_not_kept(ca: CertificateAuthority) -> None:
    """A `good` read before a revocation was applied answers its asker but is not cached."""
    pending: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred]] = []

    class HoldLookups(Inline):
        def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
            if getattr(f, "__name__", "") == "lookup":
                d: defer.Deferred = defer.Deferred()
                pending.append((f, args, d))
                return d
            return super().__call__(f, *args)

    h = make_harness(ca, HoldLookups())
    try:
        cert = ca.issue("alice").record.certificate()
        h.clock.advance(0.25)
        d = h.stub.request(
            "POST", BASE + "/ocsp", data=h.request(cert), headers={"Content-Type": "application/ocsp-request"}
        )
        [(lookup, args, held)] = pending
        stale_record = lookup(*args)  # read before the revocation below

        ca.revoke(name="alice", reason="superseded")
        h.clock.advance(0.25)
        held.callback(stale_record)
        h.stub.flush()
        first = ocsp.load_der_ocsp_response(result_of(h.stub.content(result_of(d))))
        assert first.certificate_status is ocsp.OCSPCertStatus.GOOD  # as if asked a moment earlier

        _, later = h.post(h.request(cert))
        assert later.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert len(pending) == 1
    finally:
        h.watcher.stopService()


def test_failed_lookup_answers_try_later(ca: CertificateAuthority, logged_errors: Any) -> None:
    """When the store cannot be read for a serial, the client hears `tryLater`, and it is logged."""
    logged_errors.expect("status lookup of serial")
    h = make_harness(ca, Inline(fail=lambda name: name == "lookup"))
    try:
        cert = ca.issue("alice").record.certificate()
        response, answer = h.post(h.request(cert))
        assert response.code == 200
        assert answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    finally:
        h.watcher.stopService()


def test_garbage_post_is_answered_malformed_request(harness: Harness) -> None:
    """A body that is not an OCSP request gets a well-formed `malformedRequest` answer."""
    response, answer = harness.post(b"GET / HTTP/1.0\r\n\r\n" * 3)
    assert response.code == 200
    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_foreign_issuer_is_answered_unauthorized(harness: Harness, tmp_path: Path) -> None:
    """A certificate of another CA is refused `unauthorized`, never `good`."""
    foreign = CertificateAuthority.init(tmp_path / "foreign", "example.org")
    cert = foreign.issue("alice").record.certificate()
    _, answer = harness.post(ocsp_request(cert, foreign.intermediate_cert))
    assert answer.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_get_with_base64_path_answers_with_rfc5019_cache_headers(harness: Harness) -> None:
    """GET /ocsp/{url-encoded base64} answers like POST, with max-age, ETag, Last-Modified, Expires."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)
    encoded = urllib.parse.quote(base64.b64encode(harness.request(cert)).decode(), safe="")

    response, der = harness.fetch("GET", "/ocsp/" + encoded)

    answer = ocsp.load_der_ocsp_response(der)
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert header(response, "Content-Type") == "application/ocsp-response"
    cache_control = header(response, "Cache-Control")
    assert cache_control is not None and cache_control.startswith("max-age=")
    assert 0 < int(cache_control.split("=")[1].split(",")[0]) <= 300
    assert "public" in cache_control and "no-transform" in cache_control
    assert header(response, "Last-Modified") is not None
    assert header(response, "Expires") is not None
    etag = header(response, "ETag")
    assert etag

    again, body = harness.fetch("GET", "/ocsp/" + encoded, headers={"If-None-Match": etag})
    assert again.code == 304 and body == b""


def test_get_path_with_raw_slashes_and_plus_decodes() -> None:
    """Standard base64 holding `/` and `+` works unencoded, percent-encoded, or without padding."""
    data = bytes([0xFB, 0xFF, 0xBF, 0x00, 0x01])
    text = base64.b64encode(data)
    assert b"/" in text and b"+" in text
    assert decode_get_path(text.split(b"/")) == data
    assert decode_get_path([urllib.parse.unquote_to_bytes(urllib.parse.quote(text, safe=""))]) == data
    assert decode_get_path(text.rstrip(b"=").split(b"/")) == data
    assert decode_get_path([base64.urlsafe_b64encode(data)]) == data
    assert decode_get_path([b"not base64 !"]) is None
    assert decode_get_path([b""]) is None


def test_get_with_a_nonce_is_not_cacheable(harness: Harness) -> None:
    """A nonce answer is for one asker: GET marks it no-store."""
    cert = harness.ca.issue("alice").record.certificate()
    encoded = urllib.parse.quote(base64.b64encode(harness.request(cert, b"n" * 16)).decode(), safe="")
    response, der = harness.fetch("GET", "/ocsp/" + encoded)
    assert ocsp.load_der_ocsp_response(der).certificate_status is ocsp.OCSPCertStatus.GOOD
    assert header(response, "Cache-Control") == "no-store"
    assert header(response, "ETag") is None


def test_get_with_bad_base64_is_malformed_request(harness: Harness) -> None:
    """A GET path that is not base64 gets `malformedRequest`, not an HTTP error page."""
    for path in ("/ocsp/!!!", "/ocsp/", "/ocsp"):
        response, der = harness.fetch("GET", path)
        assert response.code == 200
        assert ocsp.load_der_ocsp_response(der).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_other_methods_get_an_http_error_not_an_answer(harness: Harness) -> None:
    """Only GET and POST reach the responder (twisted.web answers other methods 501)."""
    response, _ = harness.fetch("PUT", "/ocsp", data=b"x")
    assert response.code == 501
    assert header(response, "Content-Type") != "application/ocsp-response"


def test_crl_is_served_and_regenerated_on_revocation(harness: Harness) -> None:
    """GET /crl is DER signed by the intermediate; a revocation publishes a new one with the serial."""
    record = harness.ca.issue("alice").record
    response, der = harness.fetch("GET", "/crl")
    assert header(response, "Content-Type") == "application/pkix-crl"
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(harness.ca.intermediate_cert.public_key())
    first_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl.get_revoked_certificate_by_serial_number(record.serial) is None

    harness.ca.revoke(name="alice", reason="keyCompromise")
    harness.clock.advance(0.25)

    crl = x509.load_der_x509_crl(harness.fetch("GET", "/crl")[1])
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > first_number
    assert crl.get_revoked_certificate_by_serial_number(record.serial) is not None


def _number(der: bytes) -> int:
    return x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_crl_made_by_hand_is_followed_by_a_higher_one_from_the_server(harness: Harness, tmp_path: Path) -> None:
    """``s2sgw ca crl`` and the server share one CRL number sequence; after a CRL made by hand
    the server publishes a higher number within one poll, so a gateway that was handed the
    hand-made CRL never sees the server's go backwards."""
    served = _number(harness.fetch("GET", "/crl")[1])
    assert cli.main(["ca", "crl", "--dir", str(harness.ca.directory), "--out", str(tmp_path / "hand.crl")]) == 0
    by_hand = _number((tmp_path / "hand.crl").read_bytes())
    assert by_hand > served

    harness.clock.advance(0.25)
    after = _number(harness.fetch("GET", "/crl")[1])
    assert after > by_hand
    harness.clock.advance(0.25)  # the server's own CRL does not set off another one
    assert _number(harness.fetch("GET", "/crl")[1]) == after


def test_crl_asked_for_while_one_is_being_made_is_made_after_it(ca: CertificateAuthority) -> None:
    """A revocation applied while a CRL is being signed may be missing from it: another follows."""
    held: list[tuple[defer.Deferred, Callable[..., Any], tuple[Any, ...]]] = []
    holding = [False]

    def in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if holding[0] and getattr(f, "__name__", "") == "make":
            d: defer.Deferred = defer.Deferred()
            held.append((d, f, args))
            return d
        return defer.maybeDeferred(f, *args)

    h = make_harness(ca, inline=in_thread, crl_hours=0.01)  # type: ignore[arg-type]
    try:
        holding[0] = True
        h.clock.pump([1.0] * 20)  # past half the CRL's life: the refresh loop starts a new one
        d, make, args = held.pop()
        record = ca.issue("alice").record
        ca.revoke(name="alice")
        h.clock.advance(0.25)  # the revocation is seen while that CRL is still being made
        d.callback(make(*args))
        assert len(held) == 1, "a second CRL is made once the first is done"
        d, make, args = held.pop()
        d.callback(make(*args))
        crl = x509.load_der_x509_crl(h.publisher.crl_der)
        assert crl.get_revoked_certificate_by_serial_number(record.serial) is not None
    finally:
        h.watcher.stopService()


def test_crl_is_regenerated_past_half_its_lifetime(ca: CertificateAuthority) -> None:
    """Without any change, a CRL is replaced once half its lifetime has passed, never served stale."""
    h = make_harness(ca, crl_hours=0.01)  # 36 seconds
    try:
        first = h.publisher.crl_next_update
        h.clock.advance(10)
        assert h.publisher.crl_next_update == first
        h.clock.advance(10)
        assert h.publisher.crl_next_update is not None and first is not None
        assert h.publisher.crl_next_update > first
    finally:
        h.watcher.stopService()


def test_cached_answers_are_resigned_before_they_go_stale(harness: Harness) -> None:
    """The refresh loop re-signs cached answers in the background; askers keep hitting the cache."""
    cert = harness.ca.issue("alice").record.certificate()
    harness.clock.advance(0.25)
    harness.post(harness.request(cert))
    assert harness.publisher.responder.signatures == 1

    for _ in range(140):  # 140 s, past the 90 s refresh start (half of 300 s minus the lead)
        harness.clock.advance(1)
    assert harness.publisher.responder.signatures == 2
    before = harness.publisher.responder.signatures
    _, answer = harness.post(harness.request(cert))
    assert harness.publisher.responder.signatures == before
    assert answer.this_update_utc > datetime.datetime.fromtimestamp(
        harness.clock.seconds() - 60, datetime.timezone.utc
    )


def test_bundle_is_the_ca_bundle_file(harness: Harness) -> None:
    response, body = harness.fetch("GET", "/bundle.pem")
    assert response.code == 200
    assert body == (harness.ca.directory / "bundle.pem").read_bytes()
    assert x509.load_pem_x509_certificates(body) == [harness.ca.root_cert]


def test_healthz_reports_ok_then_stale_when_the_store_breaks(
    ca: CertificateAuthority, logged_errors: Any
) -> None:
    """/healthz is 200 while the store is polled; 503 once polls have failed for a few seconds."""
    logged_errors.expect("reading the CA store failed")
    broken = {"now": False}
    h = make_harness(ca, Inline(fail=lambda name: broken["now"] and name == "_read_changes"))
    try:
        response, body = h.fetch("GET", "/healthz")
        assert response.code == 200
        state = json.loads(body)
        assert state["status"] == "ok" and state["crl_next_update"]

        broken["now"] = True
        for _ in range(30):
            h.clock.advance(0.25)
        response, body = h.fetch("GET", "/healthz")
        assert response.code == 503
        assert json.loads(body)["status"] == "stale"
        assert len(logged_errors.events) == 1  # logged once, not every quarter second

        broken["now"] = False
        h.clock.advance(0.25)
        assert h.fetch("GET", "/healthz")[0].code == 200
    finally:
        h.watcher.stopService()


def test_watcher_stops_polling_when_stopped(harness: Harness) -> None:
    harness.watcher.stopService()
    harness.inline.calls.clear()
    harness.clock.advance(5)
    assert harness.inline.calls == []


# -- the site: body limit, idle timeout --------------------------------------------------


def connect(site: StatusSite) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.fixture
def site(harness: Harness) -> StatusSite:
    site = StatusSite(build_root(harness.publisher), max_body=1024, timeout=10, reactor=harness.clock)
    site.startFactory()
    yield site
    site.stopFactory()


def test_declared_body_over_the_limit_is_refused_before_it_is_read(site: StatusSite, harness: Harness) -> None:
    """A Content-Length over max-body gets 413 and a close at once, nothing is rendered."""
    protocol, transport = connect(site)
    protocol.dataReceived(
        b"POST /ocsp HTTP/1.1\r\nHost: ca\r\nContent-Type: application/ocsp-request\r\n"
        b"Content-Length: 10000000\r\n\r\n" + b"\x30" * 4096
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"ocsp-response" not in transport.value()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionError("closed")))


def test_chunked_body_over_the_limit_is_refused(site: StatusSite) -> None:
    """A chunked body is cut off with 413 as soon as it passes max-body."""
    protocol, transport = connect(site)
    protocol.dataReceived(b"POST /ocsp HTTP/1.1\r\nHost: ca\r\nTransfer-Encoding: chunked\r\n\r\n")
    protocol.dataReceived(b"400\r\n" + b"a" * 0x400 + b"\r\n")
    assert transport.value() == b""
    protocol.dataReceived(b"10\r\n" + b"b" * 16 + b"\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionError("closed")))


def test_body_within_the_limit_is_answered(site: StatusSite, harness: Harness) -> None:
    cert = harness.ca.issue("alice").record.certificate()
    body = harness.request(cert)
    protocol, transport = connect(site)
    protocol.dataReceived(
        b"POST /ocsp HTTP/1.1\r\nHost: ca\r\nContent-Type: application/ocsp-request\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    head, _, der = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert ocsp.load_der_ocsp_response(der).certificate_status is ocsp.OCSPCertStatus.GOOD


def test_slow_client_is_dropped_after_the_idle_timeout_and_others_are_served(
    site: StatusSite, harness: Harness
) -> None:
    """A client that stops mid-request is timed out; meanwhile another gets its answer."""
    slow, slow_transport = connect(site)
    slow.dataReceived(b"POST /ocsp HTTP/1.1\r\nHost: ca\r\nContent-Len")

    fast, fast_transport = connect(site)
    fast.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: ca\r\n\r\n")
    assert fast_transport.value().startswith(b"HTTP/1.1 200 ")

    harness.clock.advance(11)
    assert slow_transport.disconnecting
    slow.connectionLost(Failure(ConnectionError("closed")))
    fast.connectionLost(Failure(ConnectionError("closed")))


# -- twistd options ----------------------------------------------------------------------


def test_options_refuse_a_directory_that_is_not_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line on stderr and exit status 1: not the usage text, which is not the problem."""
    with pytest.raises(SystemExit) as stopped:
        tap.Options().parseOptions(["--dir", str(tmp_path)])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a usable CA directory" in err


def test_options_require_dir() -> None:
    with pytest.raises(usage.UsageError, match="--dir is required"):
        tap.Options().parseOptions([])


@pytest.mark.parametrize(
    ("flag", "value"), [("--validity", "0"), ("--validity", "abc"), ("--max-body", "-1"), ("--validity", "5")]
)
def test_options_refuse_bad_numbers(ca: CertificateAuthority, flag: str, value: str) -> None:
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--dir", str(ca.directory), flag, value])


def test_make_service_wires_watcher_and_listener(ca: CertificateAuthority) -> None:
    options = tap.Options()
    options.parseOptions(["--dir", str(ca.directory), "--listen", "tcp:0:interface=127.0.0.1", "--validity", "60"])
    assert options["validity"] == 60.0
    service = tap.makeService(options, reactor=task.Clock())
    assert IService.providedBy(service)
    assert len(list(service)) == 2
