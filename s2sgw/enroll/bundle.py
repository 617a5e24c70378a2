"""The trust bundle follows the CA's ``/cacerts``: new roots arrive, retired roots leave safely.

A root the CA starts publishing is added, so a new trust anchor reaches every gateway before
certificates chaining to it do. A root leaves only when the CA, having published it since the
gateway started, no longer does, and none of the gateway's own certificates chains to it (its
peers' certificates come from the same CA, so they move with ours). Roots the CA never published
(added by hand) are left alone. An answer without the pinned root is refused whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509

from s2sgw import pki
from s2sgw.errors import S2sgwError
from s2sgw.wire import est


class BundleRefused(S2sgwError):
    """A ``/cacerts`` answer that must not change the trust bundle."""


@attrs.frozen
class BundleUpdate:
    """The bundle after one ``/cacerts`` answer, and what changed."""

    roots: tuple[x509.Certificate, ...]
    added: tuple[x509.Certificate, ...] = ()
    dropped: tuple[x509.Certificate, ...] = ()
    published: frozenset[str] = frozenset()  # fingerprints of the roots in the answer

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped)


def published_roots(answer: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The roots of a ``/cacerts`` answer: self-signed CA certificates (intermediates are not trust anchors)."""
    return [root for root in est.roots_in(list(answer)) if pki.is_ca(root)]


def anchors(root: x509.Certificate, chains: Iterable[Sequence[x509.Certificate]]) -> bool:
    """Whether any of ``chains`` (leaf first) ends in ``root`` or in a certificate it issued."""
    for chain in chains:
        if not chain:
            continue
        top = chain[-1]
        if top == root or pki.issuer_of(top, [root]) is not None:
            return True
    return False


def merge(
    current: Sequence[x509.Certificate],
    answer: Sequence[x509.Certificate],
    pinned: str,
    seen: Iterable[str],
    chains: Iterable[Sequence[x509.Certificate]],
) -> BundleUpdate:
    """The bundle that follows ``answer``, given the ``current`` roots.

    ``pinned`` is the fingerprint the answer must hold; ``seen`` the fingerprints the CA
    published in earlier answers; ``chains`` the gateway's own certificate chains.
    """
    roots = published_roots(answer)
    published = frozenset(est.fingerprint(root) for root in roots)
    if pinned not in published:
        raise BundleRefused(f"the CA's /cacerts answer does not hold the pinned root {pinned}; keeping the bundle")
    chains = [tuple(chain) for chain in chains]
    seen = set(seen)
    kept: list[x509.Certificate] = []
    dropped: list[x509.Certificate] = []
    for root in current:
        fingerprint = est.fingerprint(root)
        retired = fingerprint in seen and fingerprint not in published
        if retired and not anchors(root, chains):
            dropped.append(root)
        else:
            kept.append(root)
    held = {est.fingerprint(root) for root in current}
    added: list[x509.Certificate] = []
    for root in roots:
        if est.fingerprint(root) not in held:
            held.add(est.fingerprint(root))
            added.append(root)
    return BundleUpdate(tuple(kept + added), tuple(added), tuple(dropped), published)
