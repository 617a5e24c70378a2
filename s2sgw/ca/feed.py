"""The revocation feed: ``GET /revocations?since=N``, a signed long poll of new revocations.

OCSP tells a gateway about one certificate when it asks; the feed tells every gateway about
every revocation as it happens. A gateway asks for the revocations after the last sequence
number it has seen; the request is held open until a newer revocation exists or ``hold``
seconds pass, then answered with what there is (possibly nothing). Waiting requests cost a
Deferred and a timer each, never a thread: :meth:`RevocationFeed.publish`, called from
:meth:`StatusPublisher._apply` (the one place every revocation passes through), wakes them.

Documents are signed with the CA's OCSP signing key, so a gateway trusts them exactly as far as
it trusts OCSP answers, and can tell a gap or a rollback from a quiet CA::

    {"payload": base64(JSON), "signature": base64, "hash": "sha256" | null, "signer": base64(DER)}

    payload = {"type": "s2sgw-revocations", "version": 1, "issuer": hex(SHA-1 of the issuer key),
               "since": N, "seq": M, "latest": L, "more": false, "time": ISO 8601 UTC,
               "revocations": [{"seq", "serial" (hex), "revoked_at", "reason"}, ...]}

``wait=0`` asks for an answer at once (a subscriber's first poll, to learn where the feed
stands). ``revocations`` holds every revocation with ``since < seq <= M`` in order (sequence numbers
are contiguous, starting at 1); ``latest`` is the newest the CA knows; ``more`` says that the
batch was cut at ``max_batch`` and the asker should come straight back with ``since = M``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import http, resource, server

from s2sgw.wire.feed import (
    DEFAULT_HOLD,
    FEED_CONTENT_TYPE,
    FeedDocument,
    FeedEntry,
    sign,
)
from s2sgw.wire.ocsp import key_hash

DEFAULT_MAX_WAITERS = 10_000
DEFAULT_MAX_BATCH = 1000


# ---------------------------------------------------------------------------------------------
# values and codec (pure)


# ---------------------------------------------------------------------------------------------
# the feed


@attrs.define(eq=False)
class _Waiter:
    since: int
    deliver: Callable[[bytes], None]
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class RevocationFeed:
    """Every revocation the status server has seen, in order, and the requests waiting for more.

    Nothing is known until the first :meth:`publish` (the publisher's initial load): until then
    requests are answered 503, so a gateway never mistakes "not loaded yet" for "no revocations".
    """

    issuer: x509.Certificate
    signer_cert: x509.Certificate
    signer_key: Any
    clock: IReactorTime
    hold: float = DEFAULT_HOLD
    max_waiters: int = DEFAULT_MAX_WAITERS
    max_batch: int = DEFAULT_MAX_BATCH
    loaded: bool = False
    seeding: bool = False  # waiting for seed(): publish() alone does not make the feed complete
    signatures: int = 0
    _entries: list[FeedEntry] = attrs.field(factory=list)
    _waiters: set[_Waiter] = attrs.field(factory=set)
    _signed: dict[int, tuple[float, bytes]] = attrs.field(factory=dict)
    _issuer_hash: bytes = attrs.field(init=False)
    _signer_der: bytes = attrs.field(init=False)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._issuer_hash = key_hash(self.issuer)
        self._signer_der = self.signer_cert.public_bytes(serialization.Encoding.DER)

    def replace_issuer(self, issuer: x509.Certificate, cert: x509.Certificate, key: Any) -> None:
        """Speak for a new issuing CA (after ``s2sgw ca intermediate``), signed by its signer."""
        self.issuer = issuer
        self._issuer_hash = key_hash(issuer)
        self.replace_signer(cert, key)

    def replace_signer(self, cert: x509.Certificate, key: Any) -> None:
        """Sign from now on with a renewed delegated signer; documents signed before are dropped."""
        self.signer_cert, self.signer_key = cert, key
        self._signer_der = cert.public_bytes(serialization.Encoding.DER)
        self._signed.clear()

    @property
    def latest(self) -> int:
        return self._entries[-1].seq if self._entries else 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def publish(self, records: Sequence[Any]) -> None:
        """Take in revocation records (CertRecords) and wake the requests they answer.

        Records may arrive more than once and out of order (a seed read racing the watcher);
        entries are kept by sequence number.
        """
        if not self.seeding:
            self.loaded = True
        known = {entry.seq for entry in self._entries}
        fresh = [e for e in map(FeedEntry.from_record, records) if e is not None and e.seq not in known]
        if not fresh:
            return
        self._entries = sorted({e.seq: e for e in (*self._entries, *fresh)}.values(), key=lambda e: e.seq)
        self._signed.clear()
        if not self.loaded:
            return
        latest = self.latest
        for waiter in [w for w in self._waiters if w.since < latest]:
            self._answer(waiter)

    def seed(self, records: Sequence[Any]) -> None:
        """Every revocation so far, read after the publisher had loaded; then answer requests."""
        self.seeding = False
        self.publish(records)

    def document(self, since: int) -> FeedDocument:
        """What a request for the revocations after ``since`` gets now."""
        start = self._index_after(since)
        batch = tuple(self._entries[start : start + self.max_batch])
        more = start + len(batch) < len(self._entries)
        seq = batch[-1].seq if batch else min(since, self.latest)
        return FeedDocument(
            issuer_key_hash=self._issuer_hash,
            since=since,
            seq=seq,
            latest=self.latest,
            time=datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC),
            revocations=batch,
            more=more,
        )

    def signed(self, since: int) -> bytes:
        """The signed answer for ``since``; one signature per ``since`` and second, however many ask."""
        now = self.clock.seconds()
        cached = self._signed.get(since)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        body = sign(self.document(since).payload(), self.signer_key, self._signer_der)
        self.signatures += 1
        if len(self._signed) > 64:
            self._signed.clear()
        self._signed[since] = (now, body)
        return body

    def wait(
        self, since: int, deliver: Callable[[bytes], None], *, hold: bool = True
    ) -> Callable[[], None] | None:
        """Answer at once if there is news after ``since`` (or ``hold`` is off), else hold the request.

        Returns a cancel function for a held request (the asker went away), None if answered.
        Raises :class:`FeedBusy` when ``max_waiters`` requests are held already.
        """
        if since != self.latest or not hold:
            deliver(self.signed(since))  # news, or the asker is ahead of us (a CA rolled back)
            return None
        if len(self._waiters) >= self.max_waiters:
            raise FeedBusy(f"{self.max_waiters} requests are waiting already")
        waiter = _Waiter(since, deliver)
        waiter.timer = self.clock.callLater(self.hold, self._answer, waiter)
        self._waiters.add(waiter)
        return lambda: self._drop(waiter)

    def _answer(self, waiter: _Waiter) -> None:
        if waiter not in self._waiters:
            return
        self._drop(waiter)
        try:
            body = self.signed(waiter.since)
        except Exception:
            self._log.failure("signing a revocation feed answer failed")
            return
        waiter.deliver(body)

    def _drop(self, waiter: _Waiter) -> None:
        self._waiters.discard(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def close(self) -> None:
        """Answer every held request now (the server is stopping)."""
        for waiter in list(self._waiters):
            self._answer(waiter)

    def _index_after(self, since: int) -> int:
        """Index of the first entry with seq > ``since`` (entries are sorted by seq)."""
        low, high = 0, len(self._entries)
        while low < high:
            middle = (low + high) // 2
            if self._entries[middle].seq <= since:
                low = middle + 1
            else:
                high = middle
        return low


class FeedBusy(Exception):
    """Too many requests are held open; the asker should come back later."""


# ---------------------------------------------------------------------------------------------
# HTTP


class FeedResource(resource.Resource):
    """``GET /revocations?since=N``: the long poll."""

    isLeaf = True
    _log = Logger()

    def __init__(self, feed: RevocationFeed, retry_after: int = 5) -> None:
        super().__init__()
        self._feed = feed
        self._retry_after = retry_after

    def render_GET(self, request: server.Request) -> bytes | int:
        request.setHeader(b"Cache-Control", b"no-store")
        since = _since(request)
        if since is None:
            return _plain(request, http.BAD_REQUEST, b"since must be a non-negative integer\n")
        if not self._feed.loaded:
            request.setHeader(b"Retry-After", b"%d" % self._retry_after)
            return _plain(request, http.SERVICE_UNAVAILABLE, b"revocations not loaded yet\n")
        finished = [False]

        def deliver(body: bytes) -> None:
            if finished[0]:
                return
            finished[0] = True
            request.setHeader(b"Content-Type", FEED_CONTENT_TYPE)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        try:
            cancel = self._feed.wait(since, deliver, hold=_arg(request, b"wait") != b"0")
        except FeedBusy as busy:
            request.setHeader(b"Retry-After", b"%d" % self._retry_after)
            return _plain(request, http.SERVICE_UNAVAILABLE, f"{busy}\n".encode())
        if cancel is not None:

            def gone(_: object) -> None:
                finished[0] = True
                cancel()

            request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET


def _arg(request: server.Request, name: bytes) -> bytes | None:
    values = (request.args or {}).get(name)
    return values[-1].strip() if values else None


def _since(request: server.Request) -> int | None:
    text = _arg(request, b"since") or b"0"
    if not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _plain(request: server.Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body
