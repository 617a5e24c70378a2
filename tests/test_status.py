"""OCSP codec, OCSP checker (cache, coalescing, timeouts, hostile servers), CRL and off checkers."""

from __future__ import annotations

import datetime

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import providedBy
from zope.interface.verify import verifyObject

from s2sgw.interfaces import IStapleSource, IStatusCache, IStatusCacheStats, IStatusChecker, IStatusProbe
from s2sgw.wire.ocsp import CertStatus, StatusInvalid, StatusUnavailable
from s2sgw.status.ocsp import OCSPStatusChecker, StatusMetrics
from tests.doubles import FakeStatusChecker
from s2sgw.status.checker import NoStatusChecker
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.wire.ocsp import (
    build_request,
    new_nonce,
    verify_response,
)
from tests.pkifactory import HOUR, NOW, Issued, _hash, _key, make_ca

MINUTE = datetime.timedelta(minutes=1)


# ---------------------------------------------------------------------------------------------
# certificates built with cryptography






def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])






def make_cert(
    ca: Issued,
    cn: str,
    *,
    eku: tuple = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    kind: str = "ec",
    not_after: datetime.datetime | None = None,
) -> Issued:
    key = _key(kind)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(not_after or NOW + 24 * HOUR)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Issued(builder.sign(ca.key, _hash(ca.key)), key)


def make_responder(ca: Issued, **kwargs) -> Issued:
    return make_cert(ca, "OCSP responder", eku=(ExtendedKeyUsageOID.OCSP_SIGNING,), **kwargs)


def make_response(
    query_der: bytes | None,
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    signer: Issued,
    *,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this_update: datetime.datetime = NOW - MINUTE,
    next_update: datetime.datetime | None = NOW + HOUR,
    revocation_time: datetime.datetime | None = None,
    reason: x509.ReasonFlags | None = None,
    include_signer: bool = True,
    echo_nonce: bool = True,
    nonce: bytes | None = None,
    by_name: bool = False,
    certificates: list[x509.Certificate] | None = None,
) -> bytes:
    """An OCSP answer for ``leaf`` signed by ``signer`` (echoing the request's nonce)."""
    if status == ocsp.OCSPCertStatus.REVOKED and revocation_time is None:
        revocation_time = NOW - HOUR
    encoding = ocsp.OCSPResponderEncoding.NAME if by_name else ocsp.OCSPResponderEncoding.HASH
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(leaf, issuer, hashes.SHA1(), status, this_update, next_update, revocation_time, reason)
        .responder_id(encoding, signer.cert)
    )
    if certificates is not None:
        builder = builder.certificates(certificates)
    elif include_signer and signer.cert != issuer:
        builder = builder.certificates([signer.cert])
    if nonce is None and echo_nonce and query_der is not None:
        request = ocsp.load_der_ocsp_request(query_der)
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            nonce = None
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(signer.key, _hash(signer.key)).public_bytes(serialization.Encoding.DER)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki():
    ca = make_ca()
    return attrs.make_class("PKI", ["ca", "leaf", "other", "responder"])(
        ca, make_cert(ca, "orders"), make_cert(ca, "users"), make_responder(ca)
    )


# ---------------------------------------------------------------------------------------------
# codec


def _verify(pki, der, query=None, *, leaf=None, now=NOW):
    query = query or build_request(leaf or pki.leaf.cert, pki.ca.cert, nonce=b"n" * 16)
    return verify_response(der, query, pki.ca.cert, now=now)


def _query(pki, nonce=b"n" * 16):
    return build_request(pki.leaf.cert, pki.ca.cert, nonce=nonce)


class TestRequest:
    def test_request_has_sha1_certid_and_nonce(self, pki):
        """The request names the leaf by a SHA-1 CertID and carries the nonce."""
        nonce = new_nonce()
        query = build_request(pki.leaf.cert, pki.ca.cert, nonce=nonce)
        parsed = ocsp.load_der_ocsp_request(query.der)
        assert parsed.serial_number == pki.leaf.cert.serial_number
        assert parsed.hash_algorithm.name == "sha1"
        assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        assert query.issuer_key_hash == parsed.issuer_key_hash

    def test_nonces_are_random_and_sized(self):
        """Nonces are 16 random bytes by default and never repeat."""
        assert len(new_nonce()) == 16
        assert len(new_nonce(32)) == 32
        assert new_nonce() != new_nonce()
        with pytest.raises(ValueError):
            new_nonce(33)


class TestVerifyResponse:
    def test_good_answer_from_delegated_responder(self, pki):
        """A good answer signed by a responder certificate the issuer made for OCSP signing is accepted."""
        query = _query(pki)
        status = _verify(pki, make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.responder), query)
        assert status == CertStatus("good", NOW - MINUTE, NOW + HOUR)

    def test_good_answer_signed_by_issuer_itself(self, pki):
        """The issuer may sign its own answers (no delegated certificate)."""
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.ca, by_name=True)
        assert _verify(pki, der, query).state == "good"

    def test_revoked_answer_carries_time_and_reason(self, pki):
        """A revoked answer reports when and why."""
        query = _query(pki)
        der = make_response(
            query.der,
            pki.leaf.cert,
            pki.ca.cert,
            pki.responder,
            status=ocsp.OCSPCertStatus.REVOKED,
            revocation_time=NOW - 2 * HOUR,
            reason=x509.ReasonFlags.key_compromise,
        )
        status = _verify(pki, der, query)
        assert status.state == "revoked"
        assert status.revoked_at == NOW - 2 * HOUR
        assert status.revocation_reason == "keyCompromise"

    def test_unknown_answer(self, pki):
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.responder, status=ocsp.OCSPCertStatus.UNKNOWN)
        assert _verify(pki, der, query).state == "unknown"

    @pytest.mark.parametrize("kind", ["rsa", "ed25519"])
    def test_rsa_and_ed25519_signatures_verify(self, kind):
        """RSA (PKCS#1 v1.5) and Ed25519 CAs and responders are supported."""
        ca = make_ca(kind=kind)
        leaf = make_cert(ca, "orders", kind=kind)
        responder = make_responder(ca, kind=kind)
        query = build_request(leaf.cert, ca.cert, nonce=b"x" * 16)
        der = make_response(query.der, leaf.cert, ca.cert, responder)
        assert verify_response(der, query, ca.cert, now=NOW).state == "good"

    def test_wrong_signer_key_is_invalid(self, pki):
        """An answer naming our responder but signed by another key is refused."""
        query = _query(pki)
        forger = make_responder(make_ca("Test CA"))  # same names, other keys
        der = make_response(
            query.der, pki.leaf.cert, pki.ca.cert, forger, by_name=True, certificates=[pki.responder.cert]
        )
        with pytest.raises(StatusInvalid, match="signature"):
            _verify(pki, der, query)

    def test_issuer_named_but_signed_by_other_key_is_invalid(self, pki):
        """An answer claiming to come from the issuer must verify with the issuer's key."""
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, make_ca("Test CA"), by_name=True)
        with pytest.raises(StatusInvalid, match="signature"):
            _verify(pki, der, query)

    def test_responder_without_ocsp_signing_eku_is_invalid(self, pki):
        """A certificate of our CA without OCSPSigning (e.g. a service's) may not sign answers."""
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.other)
        with pytest.raises(StatusInvalid, match="OCSPSigning"):
            _verify(pki, der, query)

    def test_responder_from_another_ca_is_invalid(self, pki):
        """A responder certificate issued by a foreign CA is refused, EKU or not."""
        foreign = make_ca("Test CA")  # same name, different key
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, make_responder(foreign))
        with pytest.raises(StatusInvalid, match="not issued by"):
            _verify(pki, der, query)

    def test_expired_responder_is_invalid(self, pki):
        query = _query(pki)
        old = make_responder(pki.ca, not_after=NOW - 10 * MINUTE)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, old)
        with pytest.raises(StatusInvalid, match="validity"):
            _verify(pki, der, query)

    def test_responder_not_included_is_invalid(self, pki):
        """A delegated answer without the responder certificate cannot be verified."""
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.responder, include_signer=False)
        with pytest.raises(StatusInvalid, match="responder"):
            _verify(pki, der, query)

    def test_answer_for_another_serial_is_invalid(self, pki):
        """A correctly signed answer about a different certificate does not answer our query."""
        query = _query(pki)
        der = make_response(query.der, pki.other.cert, pki.ca.cert, pki.responder)
        with pytest.raises(StatusInvalid, match="serial"):
            _verify(pki, der, query)

    def test_answer_for_same_serial_of_another_issuer_is_invalid(self, pki):
        """The CertID's issuer hashes must match as well as the serial."""
        other_ca = make_ca("Other CA")
        twin = Issued(
            x509.CertificateBuilder()
            .subject_name(_name("orders"))
            .issuer_name(other_ca.cert.subject)
            .public_key(pki.leaf.key.public_key())
            .serial_number(pki.leaf.cert.serial_number)
            .not_valid_before(NOW - HOUR)
            .not_valid_after(NOW + HOUR)
            .sign(other_ca.key, hashes.SHA256()),
            pki.leaf.key,
        )
        query = _query(pki)
        der = make_response(query.der, twin.cert, other_ca.cert, pki.ca, by_name=True)
        with pytest.raises(StatusInvalid):
            _verify(pki, der, query)

    def test_stale_answer_is_invalid(self, pki):
        """A replayed answer whose nextUpdate has passed is refused."""
        query = _query(pki)
        der = make_response(
            query.der,
            pki.leaf.cert,
            pki.ca.cert,
            pki.responder,
            this_update=NOW - 3 * HOUR,
            next_update=NOW - 2 * HOUR,
            echo_nonce=False,
        )
        with pytest.raises(StatusInvalid, match="stale"):
            _verify(pki, der, query)

    def test_old_answer_without_next_update_is_invalid(self, pki):
        query = _query(pki)
        der = make_response(
            query.der, pki.leaf.cert, pki.ca.cert, pki.responder, this_update=NOW - HOUR, next_update=None
        )
        with pytest.raises(StatusInvalid, match="older"):
            _verify(pki, der, query)

    def test_future_answer_is_invalid(self, pki):
        """thisUpdate beyond the clock leeway is refused."""
        query = _query(pki)
        der = make_response(
            query.der, pki.leaf.cert, pki.ca.cert, pki.responder, this_update=NOW + HOUR, next_update=NOW + 2 * HOUR
        )
        with pytest.raises(StatusInvalid, match="future"):
            _verify(pki, der, query)

    def test_small_clock_skew_is_tolerated(self, pki):
        query = _query(pki)
        der = make_response(
            query.der, pki.leaf.cert, pki.ca.cert, pki.responder, this_update=NOW + 30 * datetime.timedelta(seconds=1)
        )
        assert _verify(pki, der, query).state == "good"

    def test_wrong_nonce_is_invalid(self, pki):
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.responder, nonce=b"m" * 16)
        with pytest.raises(StatusInvalid, match="nonce"):
            _verify(pki, der, query)

    def test_answer_without_nonce_is_accepted_when_fresh(self, pki):
        """A responder's cached, nonce-less answer is accepted on its time window alone."""
        query = _query(pki)
        der = make_response(query.der, pki.leaf.cert, pki.ca.cert, pki.responder, echo_nonce=False)
        assert _verify(pki, der, query).state == "good"

    @pytest.mark.parametrize(
        "status",
        [ocsp.OCSPResponseStatus.UNAUTHORIZED, ocsp.OCSPResponseStatus.MALFORMED_REQUEST, ocsp.OCSPResponseStatus.SIG_REQUIRED],
    )
    def test_refusals_are_invalid(self, pki, status):
        with pytest.raises(StatusInvalid, match=status.name):
            _verify(pki, unsuccessful(status))

    @pytest.mark.parametrize("status", [ocsp.OCSPResponseStatus.TRY_LATER, ocsp.OCSPResponseStatus.INTERNAL_ERROR])
    def test_try_later_and_internal_error_are_unavailable(self, pki, status):
        with pytest.raises(StatusUnavailable, match=status.name):
            _verify(pki, unsuccessful(status))

    @pytest.mark.parametrize("garbage", [b"", b"<html>502 Bad Gateway</html>", b"\x30\x82\xff\xff" + b"\x00" * 50])
    def test_garbage_is_invalid(self, pki, garbage):
        with pytest.raises(StatusInvalid, match="not an OCSP response"):
            _verify(pki, garbage)


# ---------------------------------------------------------------------------------------------
# the checker over StubTreq


class OCSPResource(Resource):
    """A scriptable responder: ``answer(request_der) -> bytes``; ``hold`` keeps requests open."""

    isLeaf = True

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list[bytes] = []
        self.held: list = []
        self.hold = False
        self.code = 200
        self.content_types: list[bytes] = []

    def render_POST(self, request):
        body = request.content.read()
        self.requests.append(body)
        self.content_types.append(request.getHeader(b"content-type"))
        if self.hold:
            self.held.append((request, body))
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/ocsp-response")
        return self.answer(body)

    def release(self) -> None:
        for request, body in self.held:
            request.setHeader(b"content-type", b"application/ocsp-response")
            request.write(self.answer(body))
            request.finish()
        self.held.clear()


@attrs.define
class Harness:
    pki: object
    resource: OCSPResource
    stub: StubTreq
    clock: task.Clock
    checker: OCSPStatusChecker
    registry: CollectorRegistry

    def check(self, leaf=None):
        d = self.checker.check(leaf or self.pki.leaf.cert, self.pki.ca.cert)
        self.stub.flush()
        return d


def _result(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def _failure(d, kind):
    result = _result(d)
    assert hasattr(result, "check") and result.check(kind), result
    return result


@pytest.fixture
def harness(pki):
    def good(request_der):
        leaf = {c.serial_number: c for c in (pki.leaf.cert, pki.other.cert)}[
            ocsp.load_der_ocsp_request(request_der).serial_number
        ]
        return make_response(request_der, leaf, pki.ca.cert, pki.responder, this_update=_now(clock) - MINUTE,
                             next_update=_now(clock) + 10 * MINUTE)

    clock = task.Clock()
    clock.advance(NOW.timestamp())
    resource = OCSPResource(good)
    stub = StubTreq(resource)
    registry, metrics = _counted()
    checker = OCSPStatusChecker(
        "http://ca.test/ocsp", clock, http=stub, timeout=2.0, max_cache_age=300.0, metrics=metrics
    )
    return Harness(pki, resource, stub, clock, checker, registry)


def _now(clock) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).replace(microsecond=0)


def _counted() -> tuple[CollectorRegistry, StatusMetrics]:
    """A checker's metrics, registered on a registry of the test's own (as the gateway's MetricsService does)."""
    registry, metrics = CollectorRegistry(), StatusMetrics()
    registry.register(metrics)
    return registry, metrics


def _sample(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


class TestOCSPStatusChecker:
    def test_provides_interface(self, harness):
        assert verifyObject(IStatusChecker, harness.checker)
        assert verifyObject(IStatusChecker, NoStatusChecker(harness.clock))

    def test_offers_a_cache_stapling_a_readiness_probe_and_counters(self, harness):
        """The wiring hands these to the enforcer, the authorizer, the stapler and the monitor."""
        for interface in (IStatusCache, IStatusCacheStats, IStapleSource, IStatusProbe):
            assert verifyObject(interface, harness.checker)
        assert harness.checker.url == "http://ca.test/ocsp"
        assert harness.checker.cache_entries == 0
        _result(harness.check())
        assert (harness.checker.cache_entries, harness.checker.queries) == (1, 1)

    def test_with_checks_off_nothing_but_checking_is_offered(self, harness):
        checker = NoStatusChecker(harness.clock)
        assert list(providedBy(checker)) == [IStatusChecker]
        assert _result(checker.close()) is None

    def test_good_answer_is_posted_and_verified(self, harness):
        """The checker POSTs an application/ocsp-request and fires with the verified status."""
        status = _result(harness.check())
        assert status.state == "good"
        assert harness.resource.content_types == [b"application/ocsp-request"]
        request = ocsp.load_der_ocsp_request(harness.resource.requests[0])
        assert request.serial_number == harness.pki.leaf.cert.serial_number

    def test_each_query_has_a_fresh_nonce(self, harness):
        harness.checker.max_cache_age = 0  # no caching: two queries
        _result(harness.check())
        _result(harness.check())
        nonces = [
            ocsp.load_der_ocsp_request(r).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            for r in harness.resource.requests
        ]
        assert len(nonces) == 2 and nonces[0] != nonces[1]

    def test_good_answer_is_cached_until_next_update(self, harness):
        """Repeated checks within nextUpdate cost no query; after it, the CA is asked again."""
        hits = _sample(harness.registry, "s2sgw_status_cache_lookups_total", result="hit")
        harness.checker.max_cache_age = 3600
        assert _result(harness.check()).state == "good"
        harness.clock.advance(9 * 60)
        assert _result(harness.check()).state == "good"
        assert len(harness.resource.requests) == 1
        assert (harness.checker.hits, harness.checker.misses) == (1, 1)
        assert _sample(harness.registry, "s2sgw_status_cache_lookups_total", result="hit") == hits + 1
        harness.clock.advance(61)  # past nextUpdate (10 minutes)
        assert _result(harness.check()).state == "good"
        assert len(harness.resource.requests) == 2

    def test_cache_age_is_capped(self, harness):
        """max_cache_age bounds caching even when nextUpdate is later."""
        harness.checker.max_cache_age = 60
        _result(harness.check())
        harness.clock.advance(61)
        _result(harness.check())
        assert len(harness.resource.requests) == 2

    def test_cache_is_per_serial_and_bounded(self, harness):
        harness.checker.cache_size = 1
        _result(harness.check(harness.pki.leaf.cert))
        _result(harness.check(harness.pki.other.cert))
        assert harness.checker.lookup(harness.pki.other.cert, harness.pki.ca.cert).state == "good"
        assert harness.checker.lookup(harness.pki.leaf.cert, harness.pki.ca.cert) is None  # evicted
        assert len(harness.resource.requests) == 2

    def test_concurrent_checks_share_one_query(self, harness):
        """Three checks of one certificate while a query is in flight produce one request."""
        harness.resource.hold = True
        ds = [harness.check() for _ in range(3)]
        assert len(harness.resource.requests) == 1
        assert not any(d.called for d in ds)
        harness.resource.release()
        harness.stub.flush()
        assert [_result(d).state for d in ds] == ["good"] * 3

    def test_a_cancelled_waiter_does_not_disturb_the_others(self, harness):
        harness.resource.hold = True
        first, second = harness.check(), harness.check()
        first.cancel()
        _failure(first, defer.CancelledError)
        harness.resource.release()
        harness.stub.flush()
        assert _result(second).state == "good"

    def test_timeout_is_unavailable(self, harness):
        """A status server that never answers fails the check with StatusUnavailable after the timeout."""
        harness.resource.hold = True
        d = harness.check()
        harness.clock.advance(1.9)
        assert not d.called
        harness.clock.advance(0.2)
        harness.stub.flush()
        assert "timed out" in str(_failure(d, StatusUnavailable).value)
        # the next check asks again
        harness.resource.hold = False
        assert _result(harness.check()).state == "good"

    def test_http_error_is_unavailable(self, harness):
        harness.resource.code = 500
        harness.resource.answer = lambda der: b"oops"
        assert "HTTP 500" in str(_failure(harness.check(), StatusUnavailable).value)

    def test_unreachable_server_is_unavailable(self, pki):
        """Connection failures map to StatusUnavailable, not to an unhandled error."""
        from twisted.internet.error import ConnectionRefusedError

        class Refusing:
            def post(self, url, **kwargs):
                return defer.fail(ConnectionRefusedError())

        clock = task.Clock()
        clock.advance(NOW.timestamp())
        registry, metrics = _counted()
        checker = OCSPStatusChecker("http://ca.test/ocsp", clock, http=Refusing(), metrics=metrics)
        d = checker.check(pki.leaf.cert, pki.ca.cert)
        _failure(d, StatusUnavailable)
        assert _sample(registry, "s2sgw_status_queries_total", outcome="unavailable") >= 1

    def test_endless_body_is_refused_and_connection_dropped(self, harness):
        """A server streaming an endless answer is cut off after 64 KiB; the check fails."""
        harness.resource.hold = True
        d = harness.check()
        request, _ = harness.resource.held[0]
        lost = []
        request.notifyFinish().addBoth(lost.append)
        request.setHeader(b"content-type", b"application/ocsp-response")
        for _ in range(100):  # up to 1.6 MB; must stop long before
            if d.called:
                break
            request.write(b"\x00" * 16384)
            harness.stub.flush()
        assert "larger than" in str(_failure(d, StatusInvalid).value)
        harness.stub.flush()
        assert lost, "the server side saw no disconnect"

    def test_invalid_answer_is_not_cached(self, harness):
        harness.resource.answer = lambda der: b"garbage"
        _failure(harness.check(), StatusInvalid)
        _failure(harness.check(), StatusInvalid)
        assert len(harness.resource.requests) == 2

    def test_revoke_hook_overrides_cache_and_inflight(self, harness):
        """A pushed revocation answers at once, even over a cached good answer or a query in flight."""
        _result(harness.check())
        harness.checker.revoke(harness.pki.leaf.cert.serial_number, reason="keyCompromise")
        status = _result(harness.check())
        assert (status.state, status.revocation_reason) == ("revoked", "keyCompromise")
        # in flight when the revocation arrives
        harness.resource.hold = True
        d = harness.check(harness.pki.other.cert)
        harness.checker.revoke(harness.pki.other.cert.serial_number)
        harness.resource.release()
        harness.stub.flush()
        assert _result(d).state == "revoked"

    def test_forget_makes_the_next_check_ask_again(self, harness):
        _result(harness.check())
        harness.checker.forget(harness.pki.leaf.cert.serial_number)
        _result(harness.check())
        assert len(harness.resource.requests) == 2

    def test_outcomes_are_counted(self, harness):
        before = _sample(harness.registry, "s2sgw_status_queries_total", outcome="good")
        count = _sample(harness.registry, "s2sgw_status_query_seconds_count")
        _result(harness.check())
        assert _sample(harness.registry, "s2sgw_status_queries_total", outcome="good") == before + 1
        assert _sample(harness.registry, "s2sgw_status_query_seconds_count") == count + 1


# ---------------------------------------------------------------------------------------------
# CRL and off


def make_crl(ca: Issued, revoked=(), *, last=NOW - MINUTE, next_=NOW + HOUR, signer=None):
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last)
        .next_update(next_)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for cert, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW - HOUR)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    key = signer or ca.key
    return builder.sign(key, _hash(key))


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(NOW.timestamp())
    return c


class TestCRLStatusChecker:
    def test_good_and_revoked(self, pki, clock):
        crl = make_crl(pki.ca, [(pki.other.cert, x509.ReasonFlags.key_compromise)])
        checker = CRLStatusChecker(crl, clock, issuer=pki.ca.cert)
        assert verifyObject(IStatusChecker, checker)
        assert _result(checker.check(pki.leaf.cert, pki.ca.cert)).state == "good"
        status = _result(checker.check(pki.other.cert, pki.ca.cert))
        assert (status.state, status.revocation_reason) == ("revoked", "keyCompromise")

    def test_stale_crl_is_invalid(self, pki, clock):
        checker = CRLStatusChecker(make_crl(pki.ca), clock)
        clock.advance(2 * 3600)
        _failure(checker.check(pki.leaf.cert, pki.ca.cert), StatusInvalid)

    def test_crl_signed_by_another_key_is_invalid(self, pki, clock):
        crl = make_crl(pki.ca, signer=_key("ec"))
        _failure(CRLStatusChecker(crl, clock).check(pki.leaf.cert, pki.ca.cert), StatusInvalid)
        with pytest.raises(StatusInvalid, match="signature"):
            CRLStatusChecker(crl, clock, issuer=pki.ca.cert)

    def test_crl_of_another_issuer_is_invalid(self, pki, clock):
        other = make_ca("Other CA")
        _failure(CRLStatusChecker(make_crl(other), clock).check(pki.leaf.cert, pki.ca.cert), StatusInvalid)

    def test_loads_pem_and_der_files(self, pki, clock, tmp_path):
        crl = make_crl(pki.ca, [(pki.other.cert, None)])
        for encoding in (serialization.Encoding.PEM, serialization.Encoding.DER):
            path = tmp_path / "ca.crl"
            path.write_bytes(crl.public_bytes(encoding))
            checker = CRLStatusChecker.from_path(path, clock, pki.ca.cert)
            assert _result(checker.check(pki.other.cert, pki.ca.cert)).state == "revoked"


def test_no_status_checker_says_good(pki, clock):
    assert _result(NoStatusChecker(clock).check(pki.leaf.cert, pki.ca.cert)).state == "good"


# ---------------------------------------------------------------------------------------------
# one behavioural contract for every IStatusChecker, the fake included


class StatusCheckerContract:
    """What the gateway relies on from any status checker."""

    # Everything a checker declares besides IStatusChecker is handed on by the wiring.
    provides: tuple = (IStatusChecker,)

    def make(self, pki, clock, revoked: set[int]):
        """Return (checker, settle): ``settle()`` lets pending I/O complete."""
        raise NotImplementedError

    def _check(self, pki, clock, cert, revoked=frozenset()):
        checker, settle = self.make(pki, clock, set(revoked))
        d = checker.check(cert, pki.ca.cert)
        settle()
        return checker, _result(d)

    def test_provides_interface(self, pki, clock):
        checker, _ = self.make(pki, clock, set())
        assert verifyObject(IStatusChecker, checker)

    def test_declares_exactly_the_interfaces_it_provides(self, pki, clock):
        checker, _ = self.make(pki, clock, set())
        assert set(providedBy(checker)) == set(self.provides)
        for interface in self.provides:
            assert verifyObject(interface, checker)

    def test_close_fires_when_nothing_is_held_open(self, pki, clock):
        checker, settle = self.make(pki, clock, set())
        closing = checker.close()
        settle()
        assert _result(closing) is None

    def test_good_certificate_is_good(self, pki, clock):
        _, status = self._check(pki, clock, pki.leaf.cert)
        assert isinstance(status, CertStatus)
        assert status.state == "good"
        assert status.this_update <= NOW + MINUTE
        assert status.revoked_at is None

    def test_revoked_certificate_is_revoked_with_time(self, pki, clock):
        _, status = self._check(pki, clock, pki.other.cert, {pki.other.cert.serial_number})
        assert status.state == "revoked"
        assert status.revoked_at is not None and status.revoked_at <= NOW + MINUTE

    def test_revocation_of_one_serial_leaves_others_good(self, pki, clock):
        checker, settle = self.make(pki, clock, {pki.other.cert.serial_number})
        d1, d2 = checker.check(pki.leaf.cert, pki.ca.cert), checker.check(pki.other.cert, pki.ca.cert)
        settle()
        assert (_result(d1).state, _result(d2).state) == ("good", "revoked")


class TestOCSPContract(StatusCheckerContract):
    provides = (IStatusChecker, IStatusCache, IStatusCacheStats, IStapleSource, IStatusProbe)

    def make(self, pki, clock, revoked):
        def answer(der):
            serial = ocsp.load_der_ocsp_request(der).serial_number
            leaf = {c.serial_number: c for c in (pki.leaf.cert, pki.other.cert)}[serial]
            state = ocsp.OCSPCertStatus.REVOKED if serial in revoked else ocsp.OCSPCertStatus.GOOD
            return make_response(der, leaf, pki.ca.cert, pki.responder, status=state)

        stub = StubTreq(OCSPResource(answer))
        return OCSPStatusChecker("http://ca.test/ocsp", clock, http=stub), stub.flush


class TestCRLContract(StatusCheckerContract):
    def make(self, pki, clock, revoked):
        certs = [c for c in (pki.leaf.cert, pki.other.cert) if c.serial_number in revoked]
        return CRLStatusChecker(make_crl(pki.ca, [(c, None) for c in certs]), clock), lambda: None


class TestFakeContract(StatusCheckerContract):
    def make(self, pki, clock, revoked):
        checker = FakeStatusChecker(clock)
        for serial in revoked:
            checker.set(serial, "revoked")
        return checker, lambda: None


class TestFakeStatusChecker:
    def test_failures_and_holding(self, pki, clock):
        """The fake can fail like the real one and hold answers to test ordering."""
        fake = FakeStatusChecker(clock, default=StatusUnavailable("down"))
        _failure(fake.check(pki.leaf.cert, pki.ca.cert), StatusUnavailable)
        fake.default = "good"
        fake.hold = True
        d = fake.check(pki.leaf.cert, pki.ca.cert)
        assert not d.called
        fake.release()
        assert _result(d).state == "good"
        assert [serial for serial, _ in fake.calls] == [pki.leaf.cert.serial_number] * 2


# ---------------------------------------------------------------------------------------------
# against the CA's own responder


class CAResponderResource(Resource):
    """The CA's OCSP logic behind a plain resource (the CA server adds caching headers etc.)."""

    isLeaf = True

    def __init__(self, ca, clock) -> None:
        super().__init__()
        from s2sgw.ca.ocsp import Responder, SerialStatus

        self.responder = Responder(ca.intermediate_cert, ca.ocsp_cert, ca.ocsp_key)
        self.lookup = lambda serial: SerialStatus.from_record(ca.lookup(serial))
        self.clock = clock

    def render_POST(self, request):
        answer = self.responder.answer(request.content.read(), _now(self.clock), self.lookup)
        request.setHeader(b"content-type", b"application/ocsp-response")
        return answer.der


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519"])
def test_checker_accepts_the_ca_responders_answers(tmp_path, key_type):
    """Answers of s2sgw's own CA responder verify: good before, revoked (with reason) after."""
    from s2sgw.ca.authority import CertificateAuthority

    ca = CertificateAuthority.init(tmp_path / "ca", "s2s.test", key_type=key_type)
    identity = ca.issue("users")
    chain = x509.load_pem_x509_certificates(identity.chain_pem)
    leaf, issuer = chain[0], chain[1]
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    stub = StubTreq(CAResponderResource(ca, clock))
    checker = OCSPStatusChecker("http://ca.test/ocsp", clock, http=stub)

    d = checker.check(leaf, issuer)
    stub.flush()
    assert _result(d).state == "good"

    ca.revoke(name="users", reason="keyCompromise")
    checker.forget(leaf.serial_number)
    d = checker.check(leaf, issuer)
    stub.flush()
    status = _result(d)
    assert (status.state, status.revocation_reason) == ("revoked", "keyCompromise")


# ---------------------------------------------------------------------------------------------
# real loopback sockets, the default HTTP client


class EndlessResource(Resource):
    """Streams zeros for as long as the client reads."""

    isLeaf = True

    def __init__(self, reactor) -> None:
        super().__init__()
        self.reactor = reactor
        self.lost = defer.Deferred()

    def render_POST(self, request):
        request.setHeader(b"content-type", b"application/ocsp-response")
        request.notifyFinish().addBoth(lambda _: self.lost.callback(None) if not self.lost.called else None)

        def pump():
            if not request.finished and not request._disconnected:
                request.write(b"\x00" * 65536)
                self.reactor.callLater(0, pump)

        pump()
        return NOT_DONE_YET


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_default_client_over_loopback(pki):
    """With its own treq client on the real reactor: good answers verify, an endless body is cut
    off, a closed port is StatusUnavailable."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    now = _now(reactor)
    assert abs((now - NOW).total_seconds()) < 3000  # the test certificates are valid from NOW - 1 h

    def good(der):
        return make_response(der, pki.leaf.cert, pki.ca.cert, pki.responder, this_update=now - MINUTE)

    root = Resource()
    root.putChild(b"ocsp", OCSPResource(good))
    endless = EndlessResource(reactor)
    root.putChild(b"endless", endless)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
    base = f"http://127.0.0.1:{port.getHost().port}"
    checkers = []
    try:
        checker = OCSPStatusChecker(f"{base}/ocsp", reactor, timeout=5)
        checkers.append(checker)
        assert (await checker.check(pki.leaf.cert, pki.ca.cert)).state == "good"

        checker = OCSPStatusChecker(f"{base}/endless", reactor, timeout=5)
        checkers.append(checker)
        with pytest.raises(StatusInvalid, match="larger than"):
            await checker.check(pki.leaf.cert, pki.ca.cert)
        await endless.lost  # the server saw the connection go
    finally:
        for checker in checkers:
            await checker.close()
        await port.stopListening()

    checker = OCSPStatusChecker(base + "/ocsp", reactor, timeout=5)
    with pytest.raises(StatusUnavailable):
        await checker.check(pki.leaf.cert, pki.ca.cert)
    await checker.close()


def test_crl_checker_reads_the_cas_crl(tmp_path):
    """A CRL made by s2sgw's CA verifies against the leaf's issuer; a new CRL can be swapped in."""
    from s2sgw.ca.authority import CertificateAuthority

    ca = CertificateAuthority.init(tmp_path / "ca", "s2s.test")
    users = x509.load_pem_x509_certificates(ca.issue("users").chain_pem)
    orders = x509.load_pem_x509_certificates(ca.issue("orders").chain_pem)
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    path = tmp_path / "ca.crl"
    path.write_bytes(ca.make_crl().public_bytes(serialization.Encoding.PEM))
    checker = CRLStatusChecker.from_path(path, clock, ca.intermediate_cert)
    assert _result(checker.check(*users)).state == "good"

    ca.revoke(name="users", reason="keyCompromise")
    checker.replace(ca.make_crl())
    status = _result(checker.check(*users))
    assert (status.state, status.revocation_reason) == ("revoked", "keyCompromise")
    assert _result(checker.check(*orders)).state == "good"
    with pytest.raises(StatusInvalid):
        checker.replace(make_crl(make_ca("Other CA")))


# ---------------------------------------------------------------------------------------------
# mode crl with the root's CRL beside the intermediate's: a revoked intermediate


def _wall_clock():
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    return clock


def test_crl_checker_refuses_leaves_of_an_intermediate_the_roots_crl_revokes():
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    leaf = ca.issue("users").leaf
    root_crl = ca.crl([ca.intermediate], root=True, reason=x509.ReasonFlags.ca_compromise)
    checker = CRLStatusChecker(ca.crl(), _wall_clock(), others=(root_crl,), authorities=(ca.root,))
    status = _result(checker.check(leaf, ca.intermediate))
    assert (status.state, status.revocation_reason) == ("revoked", "cACompromise")
    # revoked even when the intermediate's own CRL is not held
    only_root = CRLStatusChecker(root_crl, _wall_clock(), authorities=(ca.root,))
    assert _result(only_root.check(leaf, ca.intermediate)).state == "revoked"


def test_crl_checker_says_good_when_the_roots_crl_does_not_list_the_intermediate():
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    users, billing = ca.issue("users").leaf, ca.issue("billing").leaf
    root_crl = ca.crl([billing], root=True)  # some other serial, not the intermediate's
    checker = CRLStatusChecker(ca.crl([billing]), _wall_clock(), others=(root_crl,), authorities=(ca.root,))
    assert _result(checker.check(users, ca.intermediate)).state == "good"
    assert _result(checker.check(billing, ca.intermediate)).state == "revoked"


def test_crl_checker_refuses_a_roots_crl_it_cannot_verify():
    """A forged root CRL (another key), or one with no trusted root to verify it: invalid, not good."""
    from tests.pkifactory import TestCA, new_key

    ca = TestCA.create()
    leaf = ca.issue("users").leaf
    forged = ca.crl(root=True, signer_key=new_key())
    checker = CRLStatusChecker(ca.crl(), _wall_clock(), others=(forged,), authorities=(ca.root,))
    assert "signature" in _failure(checker.check(leaf, ca.intermediate), StatusInvalid).getErrorMessage()
    unverifiable = CRLStatusChecker(ca.crl(), _wall_clock(), others=(ca.crl(root=True),))
    assert "no trusted CA" in _failure(unverifiable.check(leaf, ca.intermediate), StatusInvalid).getErrorMessage()


def test_crl_checker_reads_a_file_of_two_crls_in_either_order(tmp_path):
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    leaf = ca.issue("users").leaf
    pem = serialization.Encoding.PEM
    intermediate_crl, root_crl = ca.crl(), ca.crl([ca.intermediate], root=True)
    for order in ((intermediate_crl, root_crl), (root_crl, intermediate_crl)):
        path = tmp_path / "both.crl"
        path.write_bytes(b"".join(crl.public_bytes(pem) for crl in order))
        checker = CRLStatusChecker.from_path(path, _wall_clock(), ca.intermediate, (ca.root, ca.intermediate))
        assert checker.crl.issuer == ca.intermediate.subject
        assert _result(checker.check(leaf, ca.intermediate)).state == "revoked"
    path.write_bytes(intermediate_crl.public_bytes(pem) + ca.crl(number=2).public_bytes(pem))
    with pytest.raises(StatusInvalid, match="several CRLs of"):
        CRLStatusChecker.from_path(path, _wall_clock())
