"""Enrollment over EST: the root is pinned before any secret leaves, answers are checked.

Units over ``treq.testing.StubTreq`` and a ``Clock``, against the fake EST server in
``tests/estfake.py``; the TLS policies themselves are tested on loopback in test_enroll_tls.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from treq.testing import StubTreq

from s2sgw import pki
from s2sgw.enroll.client import (
    BootstrapTLS,
    ESTClient,
    ESTError,
    make_csr,
    new_key,
    issued_chain,
    operation_url,
    pinned_root,
)
from s2sgw.enroll.command import EnrollRequest, Enrolled, enroll, write_enrolled
from s2sgw.wire import est
from tests.estfake import FakeEST, RecordingHTTP
from tests.pkifactory import TestCA

URL = "https://127.0.0.1:8443"


def inline(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


class Harness:
    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
        self.ca = TestCA.create()
        self.fake = FakeEST(self.ca, self.clock.seconds, tokens if tokens is not None else {"orders": "s3cret"})
        self.stub = StubTreq(self.fake)
        self.down: set[str] = set()
        self.hanging = False
        recording = RecordingHTTP(self.fake, self.stub)

        def http(policy: Any) -> Any:
            bound = recording(policy)
            harness = self

            class _MaybeDown:
                def request(self, method: str, url: str, **kwargs: Any) -> Any:
                    if harness.hanging:
                        return defer.Deferred()
                    if any(url.startswith(down) for down in harness.down):
                        return defer.fail(ConnectionRefusedError("Connection refused"))
                    return bound.request(method, url, **kwargs)

            return _MaybeDown()

        self.http = http

    @property
    def fingerprint(self) -> str:
        return est.fingerprint(self.ca.root)

    def request(self, **changes: Any) -> EnrollRequest:
        values: dict[str, Any] = dict(
            urls=(URL,), fingerprint=self.fingerprint, name="orders", token="s3cret", out=Path("/nonexistent")
        )
        values.update(changes)
        return EnrollRequest(**values)

    def enroll(self, request: EnrollRequest) -> Enrolled | Failure:
        outcome: list[Any] = []
        d = defer.ensureDeferred(enroll(self.clock, request, http=self.http, in_thread=inline))
        d.addBoth(outcome.append)
        self.stub.flush()
        assert outcome, "enrollment did not finish"
        return outcome[0]


def test_enroll_pins_the_root_then_sends_the_token_only_under_the_pinned_root() -> None:
    """Bootstrap /cacerts unverified, /cacerts again and the token verified against the pinned root."""
    harness = Harness()
    enrolled = harness.enroll(harness.request())
    assert isinstance(enrolled, Enrolled), enrolled
    assert [(s.method, s.operation, s.policy) for s in harness.fake.seen] == [
        ("GET", "cacerts", "BootstrapTLS"),
        ("GET", "cacerts", "PinnedTLS"),
        ("POST", "simpleenroll", "PinnedTLS"),
    ]
    assert [s.authorization is not None for s in harness.fake.seen] == [False, False, True]
    assert pki.spiffe_id(enrolled.chain[0]) == "spiffe://example.org/orders"
    assert enrolled.chain[1] == harness.ca.intermediate
    assert enrolled.roots == (harness.ca.root,)
    assert pki.key_matches_certificate(enrolled.key, enrolled.chain[0])


def test_wrong_fingerprint_is_refused_without_sending_the_token() -> None:
    harness = Harness()
    wrong = "ab" * 32
    failure = harness.enroll(harness.request(fingerprint=wrong))
    assert isinstance(failure, Failure) and failure.check(ESTError)
    assert f"pinned fingerprint {':'.join(['AB'] * 32)}" in str(failure.value)
    assert [(s.method, s.operation) for s in harness.fake.seen] == [("GET", "cacerts")]
    assert all(s.authorization is None for s in harness.fake.seen)
    assert harness.fake.issued == []


def test_refused_token_is_an_error_that_does_not_repeat_the_token() -> None:
    harness = Harness(tokens={"orders": "other"})
    failure = harness.enroll(harness.request())
    assert isinstance(failure, Failure) and failure.check(ESTError)
    assert failure.value.kind == "refused" and failure.value.status == 401
    assert "HTTP 401" in str(failure.value) and "s3cret" not in str(failure.value)


def test_an_unreachable_server_falls_over_to_the_next_url() -> None:
    harness = Harness()
    harness.down.add("https://127.0.0.2")
    enrolled = harness.enroll(harness.request(urls=("https://127.0.0.2:8443", URL)))
    assert isinstance(enrolled, Enrolled), enrolled
    assert len(harness.fake.seen) == 3


def test_a_refusal_is_final_and_not_tried_elsewhere() -> None:
    harness = Harness(tokens={})
    failure = harness.enroll(harness.request(urls=(URL, "https://127.0.0.3:8443")))
    assert isinstance(failure, Failure) and failure.value.status == 401
    assert [s.operation for s in harness.fake.seen] == ["cacerts", "cacerts", "simpleenroll"]


def test_every_server_unreachable_names_each() -> None:
    harness = Harness()
    harness.down.update({"https://127.0.0.2", "https://127.0.0.3"})
    failure = harness.enroll(harness.request(urls=("https://127.0.0.2:1", "https://127.0.0.3:2")))
    assert isinstance(failure, Failure) and failure.value.kind == "unreachable"
    assert "127.0.0.2:1" in str(failure.value) and "127.0.0.3:2" in str(failure.value)


def test_a_server_that_never_answers_times_out() -> None:
    harness = Harness()
    harness.hanging = True
    outcome: list[Any] = []
    client = ESTClient((URL,), harness.clock, BootstrapTLS(), timeout=5, http=harness.http)
    client.cacerts().addBoth(outcome.append)
    assert outcome == []
    harness.clock.advance(5)
    assert isinstance(outcome[0], Failure) and "no answer within 5 s" in str(outcome[0].value)


def test_a_token_is_never_sent_under_the_bootstrap_policy() -> None:
    harness = Harness()
    client = ESTClient((URL,), harness.clock, BootstrapTLS(), http=harness.http)
    outcome: list[Any] = []
    client.simpleenroll(make_csr(new_key(), "orders"), "orders", "s3cret").addBoth(outcome.append)
    assert isinstance(outcome[0], Failure) and "before the CA's root is pinned" in str(outcome[0].value)
    assert harness.fake.seen == []


def test_an_answer_without_a_certificate_for_our_key_is_refused() -> None:
    ca = TestCA.create()
    other = ca.issue("orders")
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(ESTError, match="no certificate for the key we sent"):
        issued_chain([other.leaf, ca.intermediate], new_key(), [ca.root], now)


def test_an_answer_from_another_ca_is_refused() -> None:
    ca, stranger = TestCA.create(), TestCA.create(cn="Stranger")
    key = new_key()
    issued = stranger.issue("orders", key=key)
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(ESTError, match="does not verify against the pinned root"):
        issued_chain(issued.chain, key, [ca.root], now)


def test_pinned_root_ignores_intermediates_with_the_fingerprint() -> None:
    """Only a self-signed certificate can be the pinned root."""
    ca = TestCA.create()
    with pytest.raises(ESTError):
        pinned_root([ca.intermediate], est.fingerprint(ca.intermediate))
    assert pinned_root([ca.intermediate, ca.root], est.fingerprint(ca.root)) == ca.root


def test_operation_urls() -> None:
    assert operation_url("https://ca:8443", "cacerts") == "https://ca:8443/.well-known/est/cacerts"
    assert operation_url("https://ca:8443/", "simpleenroll") == "https://ca:8443/.well-known/est/simpleenroll"
    assert operation_url("https://ca/.well-known/est/lab", "cacerts") == "https://ca/.well-known/est/lab/cacerts"


def test_written_files_have_their_modes(tmp_path: Path) -> None:
    harness = Harness()
    enrolled = harness.enroll(harness.request())
    assert isinstance(enrolled, Enrolled)
    paths = write_enrolled(enrolled, tmp_path / "certs", "orders")
    assert [p.name for p in paths] == ["orders.key", "orders.pem", "bundle.pem"]
    assert (tmp_path / "certs" / "orders.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "certs" / "orders.pem").stat().st_mode & 0o777 == 0o644
    chain = pki.load_certificates(tmp_path / "certs" / "orders.pem")
    assert chain == list(enrolled.chain)
    assert pki.load_certificates(tmp_path / "certs" / "bundle.pem") == [harness.ca.root]


def test_an_answer_is_read_by_key_and_signature_not_by_order() -> None:
    """PKCS#7 keeps no order: roots are the self-signed ones, the leaf is the one for our key."""
    ca = TestCA.create()
    key = new_key()
    leaf = ca.issue("orders", key=key).leaf
    shuffled = [ca.intermediate, ca.root, leaf]
    assert est.roots_in(shuffled) == [ca.root]
    assert est.certificate_for_key(shuffled, key.public_key()) == leaf
    assert est.certificate_for_key(shuffled, ca.root_key.public_key()) is None
    assert est.chain_for(leaf, shuffled) == [leaf, ca.intermediate]


def test_a_shared_failover_keeps_the_est_server_in_use_and_goes_back_when_the_first_recovers() -> None:
    """Renewal keeps one Failover: once the first server failed, the next requests start at the
    second; a background check brings the first back without spending a request on it."""
    from s2sgw.enroll.client import BootstrapTLS, ESTClient
    from s2sgw.wire.failover import Failover

    harness = Harness()
    first, second = "https://127.0.0.2:8443", URL
    reachable = {"first": False}

    def probe(url: str) -> defer.Deferred[object]:
        return defer.succeed(None) if reachable["first"] else defer.fail(ConnectionRefusedError(url))

    servers = Failover((first, second), harness.clock, probe=probe, recheck=5.0, label="EST server")
    client = ESTClient((first, second), harness.clock, BootstrapTLS(), http=harness.http, servers=servers)
    harness.down.add("https://127.0.0.2")

    def cacerts() -> Any:
        outcome: list[Any] = []
        client.cacerts().addBoth(outcome.append)
        harness.stub.flush()
        return outcome[0]

    assert isinstance(cacerts(), list) and servers.current == second
    asked = len(harness.fake.seen)
    assert isinstance(cacerts(), list) and len(harness.fake.seen) == asked + 1  # straight to the second
    harness.down.clear()
    reachable["first"] = True
    harness.clock.advance(5.0)
    assert servers.current == first
    servers.stop()
