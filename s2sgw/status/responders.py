"""Which status servers answer for which peers: a responder per trust root.

During a trust-anchor rotation the old and the new CA each answer only for their own
certificates, so a gateway asks about a peer the responder configured for the root its verified
chain ends at (``[[status.responder]]`` by the root's SHA-256 fingerprint), or the default one.
Each responder's URL lists are used through a :class:`~s2sgw.wire.failover.Failover`, kept
across reloads while its list stays the same.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from s2sgw.config import ResponderConfig, StatusConfig
from s2sgw.wire.failover import Failover

_KNOWN_ISSUERS = 1024  # issuer -> root answers remembered, at most


def fingerprint(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's DER, the way ``[[status.responder]]`` names roots."""
    return certificate.fingerprint(hashes.SHA256())


def feed_urls(responder: ResponderConfig, mode: str) -> tuple[str, ...]:
    """The revocation feed URLs of ``responder``: ``feed`` as URLs, or derived from each OCSP URL.

    ``feed = true`` means the same origin as each OCSP responder, path ``/revocations``, in
    mode ``ocsp``.
    """
    feed = responder.feed
    if feed is False or mode == "off":
        return ()
    if isinstance(feed, tuple):
        return feed
    if mode != "ocsp":
        return ()
    derived = []
    for url in responder.urls:
        parts = urllib.parse.urlsplit(url)
        derived.append(urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/revocations", "", "")))
    return tuple(dict.fromkeys(derived))


def root_of(issuer: x509.Certificate, roots: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The root among ``roots`` that ``issuer`` is, or that directly issued it (signature checked)."""
    issuer_print = fingerprint(issuer)
    for root in roots:
        if fingerprint(root) == issuer_print:
            return root
    for root in roots:
        if root.subject != issuer.issuer:
            continue
        try:
            issuer.verify_directly_issued_by(root)
        except Exception:  # wrong key, unsupported algorithm: not this root
            continue
        return root
    return None


@attrs.define(eq=False)
class Responders:
    """The responders in force: for a peer's issuer, the OCSP servers to ask.

    ``roots()`` returns the trust bundle's roots now. :meth:`configure` applies a reloaded
    ``[status]``; failovers whose URL list did not change keep their state.
    """

    config: StatusConfig
    reactor: Any
    roots: Callable[[], Sequence[x509.Certificate]]
    recheck: float = 5.0
    _ocsp: dict[bytes | None, Failover] = attrs.field(init=False, factory=dict)
    _issuers: dict[bytes, bytes | None] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self.configure(self.config)

    def configure(self, config: StatusConfig) -> None:
        """Use ``config``'s responders from now on (keeping the failovers of unchanged lists)."""
        old = self._ocsp
        self._ocsp = {}
        for responder in config.responders:
            if not responder.urls:
                continue
            kept = old.pop(responder.fingerprint, None)
            if kept is not None and kept.urls == responder.urls:
                self._ocsp[responder.fingerprint] = kept
            else:
                if kept is not None:
                    kept.stop()
                self._ocsp[responder.fingerprint] = self._failover(responder.urls, responder.fingerprint)
        for failover in old.values():
            failover.stop()
        self.config = config
        self._issuers.clear()

    def _failover(self, urls: tuple[str, ...], root: bytes | None) -> Failover:
        label = "status server" if root is None else f"status server for root {root.hex()[:16]}"
        return Failover(urls, self.reactor, recheck=self.recheck, label=label)

    def for_issuer(self, issuer: x509.Certificate) -> Failover | None:
        """The OCSP servers for certificates issued by ``issuer`` (None: no responder has URLs)."""
        return self._ocsp.get(self.root_key(issuer), self._ocsp.get(None))

    def root_key(self, issuer: x509.Certificate) -> bytes | None:
        """The fingerprint of a configured responder's root that ``issuer`` chains to, else None."""
        issuer_print = fingerprint(issuer)
        if issuer_print in self._issuers:
            return self._issuers[issuer_print]
        root = root_of(issuer, self.roots())
        named = {r.fingerprint for r in self.config.responders if r.fingerprint is not None}
        key = fingerprint(root) if root is not None and fingerprint(root) in named else None
        if len(self._issuers) >= _KNOWN_ISSUERS:
            self._issuers.clear()
        self._issuers[issuer_print] = key
        return key

    def forget_roots(self) -> None:
        """The trust bundle changed: match issuers to roots afresh."""
        self._issuers.clear()

    def stop(self) -> None:
        for failover in self._ocsp.values():
            failover.stop()

    def status(self) -> list[dict[str, Any]]:
        """For ``/status``: each responder's root and the OCSP URL in use."""
        listed = []
        for responder in self.config.responders:
            failover = self._ocsp.get(responder.fingerprint)
            entry: dict[str, Any] = {"root": None if responder.fingerprint is None else responder.fingerprint.hex()}
            entry.update(failover.status() if failover is not None else {"urls": [], "in_use": None, "failovers": 0})
            listed.append(entry)
        return listed
