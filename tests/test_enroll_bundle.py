"""Trust bundle merging: roots the CA publishes are added; one leaves only when the CA retired it
and nothing we hold chains to it; an answer without the pinned root changes nothing."""

from __future__ import annotations

import pytest

from s2sgw.enroll.bundle import BundleRefused, merge
from s2sgw.wire import est
from tests.pkifactory import TestCA


def fp(ca: TestCA) -> str:
    return est.fingerprint(ca.root)


def test_a_newly_published_root_is_added_after_the_current_ones() -> None:
    old, new = TestCA.create(cn="Old"), TestCA.create(cn="New")
    update = merge([old.root], [old.root, new.root, new.intermediate], fp(old), set(), [])
    assert update.roots == (old.root, new.root)
    assert update.added == (new.root,) and update.dropped == ()
    assert update.changed


def test_the_same_roots_change_nothing() -> None:
    ca = TestCA.create()
    update = merge([ca.root], [ca.intermediate, ca.root], fp(ca), {fp(ca)}, [])
    assert update.roots == (ca.root,) and not update.changed


def test_intermediates_never_become_trust_anchors() -> None:
    ca = TestCA.create()
    update = merge([ca.root], [ca.root, ca.intermediate], fp(ca), set(), [])
    assert ca.intermediate not in update.roots


def test_an_answer_without_the_pinned_root_is_refused() -> None:
    ca, stranger = TestCA.create(), TestCA.create(cn="Stranger")
    with pytest.raises(BundleRefused, match="does not hold the pinned root"):
        merge([ca.root], [stranger.root, stranger.intermediate], fp(ca), set(), [])


def test_a_retired_root_nothing_chains_to_is_dropped() -> None:
    old, new = TestCA.create(cn="Old"), TestCA.create(cn="New")
    ours = new.issue("orders").chain
    update = merge([old.root, new.root], [new.root], fp(new), {fp(old), fp(new)}, [ours])
    assert update.roots == (new.root,) and update.dropped == (old.root,)


def test_a_retired_root_our_certificate_chains_to_stays() -> None:
    old, new = TestCA.create(cn="Old"), TestCA.create(cn="New")
    ours = old.issue("orders").chain
    update = merge([old.root, new.root], [new.root], fp(new), {fp(old), fp(new)}, [ours])
    assert update.roots == (old.root, new.root) and not update.changed


def test_a_root_the_ca_never_published_stays() -> None:
    """Added by hand (another trust domain): not the CA's to withdraw."""
    ca, partner = TestCA.create(), TestCA.create(cn="Partner")
    update = merge([ca.root, partner.root], [ca.root], fp(ca), {fp(ca)}, [])
    assert update.roots == (ca.root, partner.root) and not update.changed


def test_a_root_published_twice_is_added_once() -> None:
    ca, new = TestCA.create(), TestCA.create(cn="New")
    update = merge([ca.root], [ca.root, new.root, new.root], fp(ca), set(), [])
    assert update.added == (new.root,)
    assert update.published == frozenset({fp(ca), fp(new)})
