"""The gateway's view of the root CRL: what it accepts, and what a held one says about intermediates."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.web import resource

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.cafiles import load_key
from s2sgw.ca.rotation import new_intermediate, sign_root_crl
from s2sgw.pki import crl_number as pki_crl_number
from s2sgw.config import ResponderConfig, StatusConfig
from s2sgw.status.root_crl import (
    IntermediateCheck,
    RootCRLFollower,
    RootCRLFollowers,
    RootCRLRefused,
    root_crl_urls,
    verify_root_crl,
)
from s2sgw.wire.ocsp import CertStatus, StatusUnavailable
from tests.doubles import result_of


@pytest.fixture
def rotated(tmp_path: Path) -> tuple[CertificateAuthority, x509.Certificate, object]:
    """A CA whose first issuing CA was replaced: (ca, the old intermediate, the root key)."""
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
    root_key = load_key(ca.directory / "root.key", ca.root_cert, "root key")
    old = ca.intermediate_cert
    new_intermediate(ca, root_key, now=datetime.datetime.now(datetime.timezone.utc))
    return CertificateAuthority.open(ca.directory), old, root_key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def test_urls_are_derived_from_each_responders_origin() -> None:
    ocsp = StatusConfig(
        mode="ocsp",
        responders=(
            ResponderConfig(urls=("http://ca-1:8080/ocsp", "http://ca-2:8080/ocsp")),
            ResponderConfig(fingerprint=b"\x01" * 32, urls=("http://old-ca:8080/ocsp",)),
            ResponderConfig(fingerprint=b"\x02" * 32, urls=("http://ca-1:8080/other",)),
        ),
    )
    assert root_crl_urls(ocsp) == [
        ("http://ca-1:8080/root.crl", "http://ca-2:8080/root.crl"),  # the replicas of one CA, in order
        ("http://old-ca:8080/root.crl",),
    ]
    crl = StatusConfig(mode="crl", crl=Path("/x"), responders=(ResponderConfig(crl_urls=("https://ca/pki/crl",)),))
    assert root_crl_urls(crl) == [("https://ca/root.crl",)]
    assert root_crl_urls(StatusConfig(mode="crl", crl=Path("/x"))) == []  # a CRL file kept by hand holds it
    assert root_crl_urls(StatusConfig(mode="off")) == []


def test_a_forged_stale_or_replayed_root_crl_is_refused(rotated) -> None:
    ca, old, root_key = rotated
    first = sign_root_crl(ca, root_key, now=_now())
    second = sign_root_crl(ca, root_key, revoke=[old.serial_number], now=_now())
    assert verify_root_crl(second, [ca.root_cert], _now(), first) == ca.root_cert
    with pytest.raises(RootCRLRefused, match="lower than the held"):
        verify_root_crl(first, [ca.root_cert], _now(), second)
    forger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(RootCRLRefused, match="not signed by a root"):
        verify_root_crl(sign_root_crl(ca, forger, now=_now()), [ca.root_cert], _now(), None)
    with pytest.raises(RootCRLRefused, match="stale"):
        verify_root_crl(second, [ca.root_cert], _now() + datetime.timedelta(days=31), None)
    with pytest.raises(RootCRLRefused, match="not signed by a root"):
        verify_root_crl(second, [ca.intermediate_cert], _now(), None)  # only a self-signed root speaks


class Inner:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> defer.Deferred[CertStatus]:
        self.asked.append(leaf.serial_number)
        return defer.succeed(CertStatus("good", _now(), None))

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class Served(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.der: bytes | None = None

    def render_GET(self, request):  # noqa: ANN001, ANN201
        if request.path == b"/unavailable":
            request.setResponseCode(503)
            return b"busy\n"
        if self.der is None:
            request.setResponseCode(404)
            return b"none\n"
        return self.der


def test_follower_and_check_refuse_leaves_of_a_revoked_intermediate(rotated) -> None:
    ca, old, root_key = rotated
    old_leaf = ca.issue("old").record.certificate()  # signed by the current: stands in for any leaf
    served = Served()
    clock = task.Clock()
    clock.advance(_now().timestamp())
    follower = RootCRLFollower(("http://ca/root.crl",), clock, lambda: (ca.root_cert,), http=StubTreq(served))
    inner = Inner()
    check = IntermediateCheck(inner, [follower], clock)
    changes: list[int | None] = []
    follower.on_change.append(lambda: changes.append(pki_crl_number(follower.crl)))

    result_of(follower.refresh())
    assert follower.published is False and follower.crl is None  # an older CA: no root CRL
    assert result_of(check.check(old_leaf, old)).state == "good"

    crl = sign_root_crl(ca, root_key, revoke=[old.serial_number], reason="keyCompromise", now=_now())
    served.der = crl.public_bytes(serialization.Encoding.DER)
    result_of(follower.refresh())
    assert follower.published is True and follower.crl == crl
    result_of(follower.refresh())  # the same one again: no change to act on
    assert changes == [pki_crl_number(crl)]
    status = result_of(check.check(old_leaf, old))
    assert status.state == "revoked" and status.revocation_reason == "keyCompromise"
    assert result_of(check.check(old_leaf, ca.intermediate_cert)).state == "good"  # the new one is not on it
    asked = len(inner.asked)

    served.der = None  # a 404 later does not forget a revocation
    result_of(follower.refresh())
    assert follower.crl == crl and result_of(check.check(old_leaf, old)).state == "revoked"
    assert len(inner.asked) == asked and len(changes) == 1

    clock.advance(31 * 86400)  # the held root CRL goes stale: status.fail decides
    failure = check.check(old_leaf, ca.intermediate_cert)
    with pytest.raises(StatusUnavailable, match="stale"):
        result_of(failure)


class FirstReplicaDown:
    """HTTP to two replicas: the first refuses connections or answers 503, the second serves."""

    def __init__(self, served: Served, first: str) -> None:
        self.stub, self.first, self.asked = StubTreq(served), first, []

    def get(self, url: str, **kwargs: object) -> defer.Deferred:
        self.asked.append(url)
        if url.startswith("http://ca-1/"):
            if self.first == "refused":
                return defer.fail(ConnectionRefusedError("connection refused"))
            return self.stub.get("http://ca-1/unavailable")
        return self.stub.get(url)


@pytest.mark.parametrize("first", ["refused", "503"])
def test_the_root_crl_comes_from_the_next_replica_when_the_first_cannot_answer(rotated, first: str) -> None:
    ca, old, root_key = rotated
    served = Served()
    crl = sign_root_crl(ca, root_key, revoke=[old.serial_number], now=_now())
    served.der = crl.public_bytes(serialization.Encoding.DER)
    clock = task.Clock()
    clock.advance(_now().timestamp())
    http = FirstReplicaDown(served, first)
    urls = ("http://ca-1/root.crl", "http://ca-2/root.crl")
    follower = RootCRLFollower(urls, clock, lambda: (ca.root_cert,), http=http)
    result_of(follower.refresh())
    assert follower.crl == crl and http.asked == list(urls)
    assert follower.status()["url"] == "http://ca-2/root.crl" and follower.last_error is None
    result_of(follower.refresh())  # stays on the replica that answers
    assert http.asked[-1] == "http://ca-2/root.crl"


def test_followers_follow_the_responders_in_force_and_keep_what_they_hold(rotated) -> None:
    ca, old, root_key = rotated
    clock = task.Clock()
    followers = RootCRLFollowers(clock, lambda: (ca.root_cert,), 300.0, 10.0)
    one = StatusConfig(mode="ocsp", responders=(ResponderConfig(urls=("http://ca-1/ocsp",)),))
    followers.configure(one)
    (first,) = followers.active
    first.crl = sign_root_crl(ca, root_key, revoke=[old.serial_number], now=_now())  # as if fetched
    check = IntermediateCheck(Inner(), followers.active, clock)
    clock.advance(_now().timestamp())
    leaf = ca.issue("orders").record.certificate()
    assert result_of(check.check(leaf, old)).state == "revoked"

    replicas = StatusConfig(
        mode="ocsp",
        responders=(
            ResponderConfig(urls=("http://ca-1/ocsp", "http://ca-2/ocsp")),
            ResponderConfig(fingerprint=b"\x01" * 32, urls=("http://other/ocsp",)),
        ),
    )
    followers.configure(replicas)
    assert [f.urls for f in followers.active] == [
        ("http://ca-1/root.crl", "http://ca-2/root.crl"), ("http://other/root.crl",)
    ]
    assert followers.active[0].crl == first.crl  # a replica added: the revocation is not forgotten
    assert result_of(check.check(leaf, old)).state == "revoked"  # the same check sees the new followers
    assert first.parent is None and all(f.parent is followers for f in followers.active)

    followers.configure(StatusConfig(mode="ocsp"))
    assert followers.active == [] and list(followers) == []
