"""The revocation feed: the CA's long poll, the signed document, and the gateway's subscriber.

The CA side runs its real publisher and resources on a task.Clock with store work inline; the
subscriber talks to them through treq.testing.StubTreq, so both ends of the codec are real.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web import resource, server

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.feed import RevocationFeed
from s2sgw.ca.ocsp import Responder
from s2sgw.ca.publisher import StatusPublisher, StoreWatcher
from s2sgw.ca.server import build_root
from s2sgw.config import ResponderConfig
from s2sgw.status.feed import FeedSubscriber
from s2sgw.status.responders import feed_urls
from s2sgw.wire.feed import (
    FeedDocument,
    FeedEntry,
    FeedGap,
    FeedRollback,
    check_sequence,
    open_document,
    sign,
)
from s2sgw.wire.ocsp import StatusInvalid, key_hash

BASE = "http://ca.test"
HOLD = 25.0


def result_of(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def fired(d: defer.Deferred) -> bool:
    box: list[Any] = []

    def note(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(note)
    return bool(box)


def inline(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("feed") / "ca", "example.org")


@attrs.define
class CA:
    """A CA status server in memory: publisher, watcher, resources, a StubTreq client."""

    ca: CertificateAuthority
    clock: task.Clock
    publisher: StatusPublisher
    watcher: StoreWatcher
    stub: StubTreq

    @property
    def feed(self) -> RevocationFeed:
        return self.publisher.feed

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def revoke(self, name: str, reason: str = "keyCompromise") -> int:
        serial = self.ca.issue(name).record.serial
        self.ca.revoke(serial=serial, reason=reason)
        self.clock.advance(0.25)  # the watcher's next poll
        return serial

    def get(self, since: int | str) -> defer.Deferred:
        d = self.stub.get(f"{BASE}/revocations?since={since}")
        self.stub.flush()
        return d

    def open(self, body: bytes) -> FeedDocument:
        return open_document(body, [self.ca.intermediate_cert], now=self.now())


@pytest.fixture
def status_server(tmp_path: Path) -> CA:
    # A CA per test: sequence numbers start at 1 in each.
    authority = CertificateAuthority.init(tmp_path / "ca", "example.org")
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    responder = Responder(issuer=authority.intermediate_cert, signer_cert=authority.ocsp_cert, signer_key=authority.ocsp_key)
    publisher = StatusPublisher(ca=authority, responder=responder, clock=clock, in_thread=inline)
    root = build_root(publisher, feed_hold=HOLD)
    watcher = StoreWatcher(publisher, clock, registry=CollectorRegistry())
    watcher.startService()
    yield CA(authority, clock, publisher, watcher, StubTreq(root))
    watcher.stopService()


def body_of(d: defer.Deferred, stub: StubTreq) -> tuple[int, bytes]:
    response = result_of(d)
    content = stub.content(response)
    stub.flush()
    return response.code, result_of(content)


# -- the CA side ------------------------------------------------------------------------------


def test_a_poll_with_nothing_new_is_held_until_a_revocation_then_answered_with_it(status_server: CA) -> None:
    d = status_server.get(0)
    assert not fired(d)
    assert status_server.feed.waiting == 1
    serial = status_server.revoke("orders")
    status_server.stub.flush()
    code, body = body_of(d, status_server.stub)
    assert code == 200
    document = status_server.open(body)
    assert (document.since, document.seq, document.latest) == (0, 1, 1)
    assert [(e.seq, e.serial, e.reason) for e in document.revocations] == [(1, serial, "keyCompromise")]
    assert document.issuer_key_hash == key_hash(status_server.ca.intermediate_cert)
    assert status_server.feed.waiting == 0


def test_a_held_poll_is_answered_empty_after_the_hold_time(status_server: CA) -> None:
    d = status_server.get(0)
    status_server.clock.advance(HOLD - 1)
    status_server.stub.flush()
    assert not fired(d)
    status_server.clock.advance(1)
    status_server.stub.flush()
    code, body = body_of(d, status_server.stub)
    document = status_server.open(body)
    assert code == 200
    assert (document.since, document.seq, document.revocations) == (0, 0, ())


def test_a_poll_behind_the_latest_is_answered_at_once_with_every_revocation_after_it(status_server: CA) -> None:
    serials = [status_server.revoke(f"svc{i}") for i in range(3)]
    code, body = body_of(status_server.get(1), status_server.stub)
    document = status_server.open(body)
    assert [e.serial for e in document.revocations] == serials[1:]
    assert (document.since, document.seq, document.latest) == (1, 3, 3)


def test_a_poll_ahead_of_the_ca_is_answered_at_once_so_the_gateway_sees_the_rollback(status_server: CA) -> None:
    status_server.revoke("orders")
    code, body = body_of(status_server.get(7), status_server.stub)
    document = status_server.open(body)
    assert (document.since, document.latest) == (7, 1)
    with pytest.raises(FeedRollback):
        check_sequence(document, 7)


def test_many_waiters_are_all_woken_by_one_revocation_with_one_signature(status_server: CA) -> None:
    waiting = [status_server.get(0) for _ in range(50)]
    assert status_server.feed.waiting == 50
    before = status_server.feed.signatures
    status_server.revoke("orders")
    status_server.stub.flush()
    bodies = {body_of(d, status_server.stub)[1] for d in waiting}
    assert len(bodies) == 1
    assert status_server.feed.signatures == before + 1


def test_waiters_beyond_the_bound_are_told_to_come_back_later(status_server: CA) -> None:
    status_server.feed.max_waiters = 2
    status_server.get(0), status_server.get(0)
    d = status_server.get(0)
    response = result_of(d)
    assert response.code == 503
    assert response.headers.getRawHeaders(b"retry-after") == [b"5"]


def test_a_waiter_that_goes_away_is_forgotten(status_server: CA) -> None:
    delivered: list[bytes] = []
    cancel = status_server.feed.wait(0, delivered.append)
    assert cancel is not None and status_server.feed.waiting == 1
    cancel()
    assert status_server.feed.waiting == 0
    status_server.revoke("orders")
    assert delivered == []


@pytest.mark.parametrize("since", ["-1", "x", "1e3", "99999999999999999999"])
def test_a_malformed_since_is_a_bad_request(status_server: CA, since: str) -> None:
    assert result_of(status_server.get(since)).code == 400


def test_before_the_store_is_read_the_feed_says_unavailable_not_empty(tmp_path: Path, ca: CertificateAuthority) -> None:
    clock = task.Clock()
    responder = Responder(issuer=ca.intermediate_cert, signer_cert=ca.ocsp_cert, signer_key=ca.ocsp_key)
    publisher = StatusPublisher(ca=ca, responder=responder, clock=clock, in_thread=lambda f, *a: defer.Deferred())
    stub = StubTreq(build_root(publisher))
    d = stub.get(f"{BASE}/revocations?since=0")
    stub.flush()
    assert result_of(d).code == 503


def test_a_feed_attached_after_loading_reads_the_revocations_so_far(status_server: CA) -> None:
    serial = status_server.revoke("orders")
    late = StubTreq(build_root(status_server.publisher))  # a second feed, after the load
    d = late.get(f"{BASE}/revocations?since=0")
    late.flush()
    code, body = body_of(d, late)
    assert [e.serial for e in status_server.open(body).revocations] == [serial]


# -- the document ------------------------------------------------------------------------------


def signed(status_server: CA, document: FeedDocument, key: Any = None, signer: Any = None) -> bytes:
    key = key if key is not None else status_server.ca.ocsp_key
    signer = signer if signer is not None else status_server.ca.ocsp_cert
    return sign(document.payload(), key, signer.public_bytes(serialization.Encoding.DER))


def document(status_server: CA, since: int = 0, entries: tuple[FeedEntry, ...] = (), **changes: Any) -> FeedDocument:
    seq = entries[-1].seq if entries else since
    fields = dict(
        issuer_key_hash=key_hash(status_server.ca.intermediate_cert),
        since=since,
        seq=seq,
        latest=seq,
        time=status_server.now(),
        revocations=entries,
    )
    fields.update(changes)
    return FeedDocument(**fields)


def entry(seq: int, serial: int = 0x1234) -> FeedEntry:
    return FeedEntry(seq, serial, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), "keyCompromise")


def test_a_document_signed_by_the_ocsp_signer_opens(status_server: CA) -> None:
    original = document(status_server, 0, (entry(1),))
    assert status_server.open(signed(status_server, original)) == attrs.evolve(
        original, time=original.time.replace(microsecond=original.time.microsecond)
    )


def test_a_tampered_payload_does_not_verify(status_server: CA) -> None:
    envelope = json.loads(signed(status_server, document(status_server, 0, (entry(1),))))
    other = signed(status_server, document(status_server, 0, (entry(1, serial=0x9999),)))
    envelope["payload"] = json.loads(other)["payload"]
    with pytest.raises(StatusInvalid, match="signature"):
        status_server.open(json.dumps(envelope).encode())


def test_a_document_signed_by_a_service_key_is_refused(status_server: CA) -> None:
    issued = status_server.ca.issue("mallory")
    key = serialization.load_pem_private_key(issued.key_pem, None)
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(issued.record.pem)
    with pytest.raises(StatusInvalid, match="OCSPSigning"):
        status_server.open(signed(status_server, document(status_server), key=key, signer=leaf))


def test_a_document_from_a_foreign_ca_is_refused(status_server: CA, tmp_path: Path) -> None:
    foreign = CertificateAuthority.init(tmp_path / "foreign", "example.org")
    body = sign(
        attrs.evolve(document(status_server), issuer_key_hash=key_hash(foreign.intermediate_cert)).payload(),
        foreign.ocsp_key,
        foreign.ocsp_cert.public_bytes(serialization.Encoding.DER),
    )
    with pytest.raises(StatusInvalid, match="not a CA this gateway trusts"):
        status_server.open(body)


def test_an_old_document_replayed_is_refused(status_server: CA) -> None:
    old = document(status_server, time=status_server.now() - datetime.timedelta(minutes=10))
    with pytest.raises(StatusInvalid, match="too old"):
        status_server.open(signed(status_server, old))


@pytest.mark.parametrize("garbage", [b"", b"{}", b"[1]", b'{"payload": "!!", "signature": "", "signer": ""}'])
def test_garbage_is_refused(status_server: CA, garbage: bytes) -> None:
    with pytest.raises(StatusInvalid):
        status_server.open(garbage)


def test_sequence_numbers_must_continue_exactly_after_since(status_server: CA) -> None:
    check_sequence(document(status_server, 2, (entry(3), entry(4))), 2)
    with pytest.raises(FeedGap):
        check_sequence(document(status_server, 2, (entry(3), entry(5))), 2)
    with pytest.raises(FeedGap):
        check_sequence(document(status_server, 1, (entry(2),)), 2)  # an answer to another question
    with pytest.raises(FeedGap):
        check_sequence(document(status_server, 2, (entry(3),), seq=9, latest=9), 2)
    with pytest.raises(FeedRollback):
        check_sequence(document(status_server, 5, (), seq=3, latest=3), 5)


def test_the_feed_urls_are_derived_from_the_ocsp_urls_unless_given() -> None:
    ocsp = ("http://ca:8080/ocsp", "http://ca-2:8080/ocsp")
    assert feed_urls(ResponderConfig(urls=ocsp), "ocsp") == ("http://ca:8080/revocations", "http://ca-2:8080/revocations")
    assert feed_urls(ResponderConfig(urls=ocsp, feed=False), "ocsp") == ()
    assert feed_urls(ResponderConfig(urls=ocsp, feed=("http://other/r",)), "ocsp") == ("http://other/r",)
    assert feed_urls(ResponderConfig(), "crl") == ()
    assert feed_urls(ResponderConfig(feed=("http://other/r",)), "off") == ()


# -- the subscriber ------------------------------------------------------------------------------


@attrs.define
class Following:
    subscriber: FeedSubscriber
    batches: list[FeedDocument]


def follow(status_server: CA, http: Any = None, registry: CollectorRegistry | None = None) -> Following:
    """A started subscriber; its gauges go to ``registry`` (one of its own when None)."""
    batches: list[FeedDocument] = []
    subscriber = FeedSubscriber(
        f"{BASE}/revocations",
        status_server.clock,
        issuers=lambda: [status_server.ca.root_cert, status_server.ca.intermediate_cert],
        on_revocations=batches.append,
        http=http if http is not None else status_server.stub,
        hold=HOLD,
        registry=CollectorRegistry() if registry is None else registry,
    )
    subscriber.startService()
    return Following(subscriber, batches)


def settle(status_server: CA, stub: StubTreq | None = None, rounds: int = 5) -> None:
    for _ in range(rounds):
        status_server.clock.advance(0)
        (stub or status_server.stub).flush()


def test_the_subscriber_hands_on_each_revocation_once_and_resumes_from_the_last_seq(status_server: CA) -> None:
    first = status_server.revoke("a")
    following = follow(status_server)
    settle(status_server)
    assert [e.serial for b in following.batches for e in b.revocations] == [first]
    assert following.subscriber.seq == 1
    assert status_server.feed.waiting == 1  # back at once, waiting for more
    second = status_server.revoke("b")
    settle(status_server)
    assert [e.serial for b in following.batches for e in b.revocations] == [first, second]
    assert following.subscriber.seq == 2
    assert following.subscriber.status()["following"] is True
    following.subscriber.stopService()


def test_freshness_is_the_age_of_the_newest_verified_answer(status_server: CA) -> None:
    registry = CollectorRegistry()
    following = follow(status_server, registry=registry)
    assert following.subscriber.age() is None
    settle(status_server)
    assert following.subscriber.age() == 0.0
    status_server.clock.advance(10)
    assert following.subscriber.age() == 10.0
    labels = {"url": f"{BASE}/revocations"}
    assert registry.get_sample_value("s2sgw_revocation_feed_age_seconds", labels) == 10.0
    status_server.clock.advance(HOLD - 10)  # the held poll comes back empty: fresh again
    settle(status_server)
    assert following.subscriber.age() == 0.0
    assert following.subscriber.status()["age_seconds"] == 0.0
    following.subscriber.stopService()


class Canned(resource.Resource):
    """Answers each GET with the next body (or HTTP status), recording the ``since`` asked;
    holds the request open once out of answers, like a quiet feed."""

    isLeaf = True

    def __init__(self, answers: list[bytes | int]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[int] = []

    def render_GET(self, request: server.Request) -> bytes | int:
        self.asked.append(int(request.args[b"since"][0]))
        if not self.answers:
            return server.NOT_DONE_YET
        answer = self.answers.pop(0)
        if isinstance(answer, int):
            request.setResponseCode(answer)
            return b"no\n"
        return answer


def test_failures_are_retried_with_growing_back_off_from_the_same_seq(status_server: CA, logged_errors: Any) -> None:
    canned = Canned([500, 500, 500, signed(status_server, document(status_server, 0, (entry(1),)))])
    stub = StubTreq(canned)
    following = follow(status_server, http=stub)
    settle(status_server, stub)
    assert canned.asked == [0]
    delays = []
    for _ in range(3):
        pending = following.subscriber._next
        assert pending is not None and pending.active()
        delay = pending.getTime() - status_server.clock.seconds()
        delays.append(delay)
        status_server.clock.advance(delay)
        settle(status_server, stub)
    assert delays == [0.25, 0.5, 1.0]
    assert canned.asked[:4] == [0, 0, 0, 0]
    assert following.subscriber.seq == 1 and following.subscriber.failures == 0
    following.subscriber.stopService()


def test_a_gap_is_not_applied_and_the_same_seq_is_asked_again(status_server: CA) -> None:
    gap = signed(status_server, document(status_server, 0, (entry(2),)))
    good = signed(status_server, document(status_server, 0, (entry(1),)))
    canned = Canned([gap, good])
    stub = StubTreq(canned)
    following = follow(status_server, http=stub)
    settle(status_server, stub)
    assert following.batches == [] and following.subscriber.seq == 0
    assert "follows 0" in following.subscriber.last_error
    status_server.clock.advance(0.25)
    settle(status_server, stub)
    assert canned.asked[:2] == [0, 0]
    assert [e.seq for b in following.batches for e in b.revocations] == [1]
    following.subscriber.stopService()


def test_a_ca_that_went_backwards_is_followed_again_from_zero(status_server: CA) -> None:
    ahead = signed(status_server, document(status_server, 0, (entry(1), entry(2), entry(3))))
    rolled_back = signed(status_server, document(status_server, 3, (), seq=1, latest=1))
    again = signed(status_server, document(status_server, 0, (entry(1, serial=0x77),)))
    canned = Canned([ahead, rolled_back, again])
    stub = StubTreq(canned)
    following = follow(status_server, http=stub)
    settle(status_server, stub, rounds=8)
    assert canned.asked[:3] == [0, 3, 0]
    assert following.subscriber.seq == 1
    assert following.batches[-1].revocations[0].serial == 0x77
    following.subscriber.stopService()


def test_a_forged_answer_is_not_applied(status_server: CA, tmp_path: Path) -> None:
    foreign = CertificateAuthority.init(tmp_path / "foreign", "example.org")
    forged = sign(
        document(status_server, 0, (entry(1),)).payload(),
        foreign.ocsp_key,
        foreign.ocsp_cert.public_bytes(serialization.Encoding.DER),
    )
    stub = StubTreq(Canned([forged]))
    following = follow(status_server, http=stub)
    settle(status_server, stub)
    assert following.batches == []
    assert "issued" in following.subscriber.last_error
    following.subscriber.stopService()


def test_a_stopped_subscriber_polls_no_more(status_server: CA) -> None:
    following = follow(status_server)
    settle(status_server)
    following.subscriber.stopService()
    settle(status_server)
    status_server.clock.advance(HOLD)
    settle(status_server)
    assert status_server.feed.waiting == 0
    assert status_server.clock.getDelayedCalls() == [c for c in status_server.clock.getDelayedCalls() if c.active()]


@pytest.mark.parametrize("key_type", ["ed25519"])
def test_documents_of_a_ca_with_other_key_types_verify(tmp_path: Path, key_type: str) -> None:
    authority = CertificateAuthority.init(tmp_path / "ca", "example.org", key_type=key_type)
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    feed = RevocationFeed(authority.intermediate_cert, authority.ocsp_cert, authority.ocsp_key, clock)
    revoked = authority.revoke(serial=authority.issue("orders").record.serial)
    feed.publish(revoked)
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
    document = open_document(feed.signed(0), [authority.intermediate_cert], now=now)
    assert [e.serial for e in document.revocations] == [revoked[0].serial]
