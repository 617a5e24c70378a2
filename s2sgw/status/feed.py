"""Follow the CA's revocation feed, so a revocation reaches this gateway within a second.

:class:`FeedSubscriber` long-polls ``GET /revocations?since=N`` on the CA status server (see
the document of :mod:`s2sgw.wire.feed`), verifies each answer like an OCSP answer (signed by the issuing CA or by
a certificate it issued for OCSP signing), checks that the sequence numbers continue where it
left off, and hands new revocations to ``on_revocations`` (the :class:`s2sgw.status.enforce.Enforcer`:
status cache and live connections). A failed poll is retried with exponential back-off and
resumes from the last sequence number seen; a CA whose sequence went backwards (restored from a
backup) is followed from 0 again.

Freshness: ``age()`` is how old the newest verified feed answer is. A connected subscriber gets
one at least every ``hold`` seconds (25 by default), so an age well above that means the feed
is cut and revocations arrive only through OCSP re-validation at ``nextUpdate``.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
from cryptography import x509
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.status.ocsp import _describe
from s2sgw.timeutil import utc
from s2sgw.wire.failover import Failover
from s2sgw.wire.feed import (
    DEFAULT_HOLD,
    DEFAULT_MAX_AGE,
    FeedDocument,
    FeedRollback,
    check_sequence,
    open_document,
)
from s2sgw.wire.http import ResponseTooLarge, http_client, read_limited
from s2sgw.wire.ocsp import DEFAULT_LEEWAY, StatusInvalid, StatusUnavailable

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

UTC = datetime.UTC


# ---------------------------------------------------------------------------------------------
# configuration: s2sgw.status.responders.feed_urls says which feeds a responder has.


# ---------------------------------------------------------------------------------------------
# codec (pure)


# ---------------------------------------------------------------------------------------------
# subscriber


class _HTTPError(Exception):
    def __init__(self, code: int, retry_after: float | None) -> None:
        super().__init__(f"feed answered HTTP {code}")
        self.code = code
        self.retry_after = retry_after


@attrs.define(eq=False)
class FeedSubscriber(Service):
    """Long-polls the revocation feed and hands each verified batch to ``on_revocations``.

    ``issuers()`` returns the CA certificates trusted now (the trust store's); ``http`` is
    treq-like (``.get(url, headers=)``), by default treq over its own one-connection pool.
    ``url`` is one feed or several servers of one feed, in order of preference: a connection
    error, a timeout or a 5xx answer moves the next poll to the next one (the sequence number
    carries over).
    """

    url: str | Sequence[str]
    clock: IReactorTime
    issuers: Callable[[], Sequence[x509.Certificate]]
    on_revocations: Callable[[FeedDocument], object]
    http: Any = None
    hold: float = DEFAULT_HOLD
    margin: float = 10.0  # beyond ``hold``: how long an answer may take before we give up
    connect_timeout: float = 5.0
    min_backoff: float = 0.25
    max_backoff: float = 30.0
    leeway: datetime.timedelta = DEFAULT_LEEWAY
    max_age: datetime.timedelta = DEFAULT_MAX_AGE
    seq: int = 0
    documents: int = 0  # verified answers taken in
    revocations: int = 0  # revocations handed on
    failures: int = 0  # failed polls in a row
    last_error: str | None = None
    last_document: float | None = None  # clock seconds when the newest verified answer arrived
    document_time: datetime.datetime | None = None  # the CA's time in that answer
    newest_revocation: datetime.datetime | None = None
    registry: CollectorRegistry = REGISTRY  # where the freshness gauges go while following
    _backoff: float = attrs.field(default=0.0, init=False)
    _polling: Deferred[Any] | None = attrs.field(default=None, init=False)
    _next: IDelayedCall | None = attrs.field(default=None, init=False)
    _pool: Any = attrs.field(default=None, init=False)
    servers: Failover = attrs.field(init=False)
    _collecting: bool = attrs.field(default=False, init=False)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        urls = (self.url,) if isinstance(self.url, str) else tuple(self.url)
        self.url = urls[0]  # the feed's name in metrics and logs, whichever server is in use
        self.servers = Failover(urls, self.clock, label="revocation feed")
        if self.http is None:
            self.http, self._pool = http_client(self.clock, max_per_host=1, connect_timeout=self.connect_timeout)

    # -- service

    def startService(self) -> None:
        super().startService()
        _collector_of(self.registry).add(self)
        self._collecting = True
        self._log.info("following the revocation feed at {url}", url=self.servers.current)
        self._schedule(0)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._collecting:
            self._collecting = False
            _collector_of(self.registry).remove(self)
        self.servers.stop()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        polling, self._polling = self._polling, None
        if polling is not None:
            polling.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    # -- freshness

    def age(self) -> float | None:
        """Seconds since the newest verified feed answer arrived (None: none yet)."""
        if self.last_document is None:
            return None
        return max(0.0, self.clock.seconds() - self.last_document)

    def status(self) -> dict[str, Any]:
        """The ``revocation_feed`` field of the gateway's status: plain JSON types."""
        age = self.age()
        return {
            "url": self.servers.current,
            "urls": list(self.servers.urls),
            "seq": self.seq,
            "following": self.failures == 0 and self.last_document is not None,
            "age_seconds": None if age is None else round(age, 3),
            "document_time": self.document_time.isoformat() if self.document_time else None,
            "newest_revocation": self.newest_revocation.isoformat() if self.newest_revocation else None,
            "documents": self.documents,
            "revocations": self.revocations,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    # -- polling

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        self._next = self.clock.callLater(delay, self.poll)

    def poll(self) -> Deferred[None]:
        """One long poll from ``seq``; schedules the next one whatever happens."""
        self._next = None
        since = self.seq
        # After a start or a failure, ask without waiting: learn at once where the feed stands.
        quick = self.last_document is None or self.failures > 0
        server = self.servers.current
        url = f"{server}?since={since}" + ("&wait=0" if quick else "")
        d = defer.maybeDeferred(self.http.get, url, headers={b"Accept": [b"application/json"]})
        d.addCallback(self._read)
        d.addTimeout(self.hold + self.margin, self.clock, onTimeoutCancel=self._timed_out)
        d.addCallback(self._verify)
        d.addCallback(self._take, since)
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(server,))
        self._polling = d
        return d

    def _read(self, response: Any) -> Deferred[bytes]:
        body = read_limited(response, MAX_DOCUMENT_BYTES)
        if response.code != 200:
            retry = _retry_after(response)
            code = response.code

            def refuse(_: object) -> None:
                raise _HTTPError(code, retry)

            body.addBoth(refuse)
        return body

    def _timed_out(self, result: object, timeout: float) -> Failure:
        return Failure(StatusUnavailable(f"no feed answer within {timeout:g}s"))

    def _verify(self, body: bytes) -> FeedDocument:
        return open_document(
            body, self.issuers(), now=utc(self.clock.seconds()), leeway=self.leeway, max_age=self.max_age
        )

    def _take(self, document: FeedDocument, since: int) -> None:
        try:
            check_sequence(document, since)
        except FeedRollback as rollback:
            self._log.warn(
                "revocation feed went backwards ({error}); following it again from 0", error=str(rollback)
            )
            self.seq = 0
            self._fresh(document)
            return
        self._fresh(document)
        self.seq = document.seq
        if document.revocations:
            self.revocations += len(document.revocations)
            newest = max(entry.revoked_at for entry in document.revocations)
            if self.newest_revocation is None or newest > self.newest_revocation:
                self.newest_revocation = newest
            self._log.info(
                "revocation feed: {count} revocations up to {seq}",
                count=len(document.revocations),
                seq=document.seq,
            )
            try:
                self.on_revocations(document)
            except Exception:
                self._log.failure("applying revocations {since}..{seq} failed", since=since, seq=document.seq)

    def _fresh(self, document: FeedDocument) -> None:
        self.documents += 1
        self.last_document = self.clock.seconds()
        self.document_time = document.time

    def _succeeded(self, _: object) -> None:
        self._polling = None
        if self.failures:
            self._log.info("revocation feed at {url} answers again", url=self.servers.current)
        self.failures = 0
        self.last_error = None
        self._backoff = 0.0
        self._schedule(0)

    def _failed(self, failure: Failure, server: str) -> None:
        self._polling = None
        if not self.running:
            return
        error = failure.value
        if isinstance(error, (StatusInvalid, StatusUnavailable, _HTTPError)):
            text = str(error)
        else:
            text = _describe(failure)
        if not isinstance(error, (StatusInvalid, FeedRollback, ResponseTooLarge)) and not (
            isinstance(error, _HTTPError) and error.code < 500
        ):
            self.servers.failed(server, text)  # connection error, timeout or 5xx: the next server
        self.failures += 1
        self.last_error = text
        self._backoff = min(self.max_backoff, max(self.min_backoff, self._backoff * 2))
        delay = self._backoff
        if isinstance(error, _HTTPError) and error.retry_after is not None:
            delay = min(self.max_backoff, max(delay, error.retry_after))
        if self.failures == 1 or isinstance(error, StatusInvalid):
            self._log.warn(
                "revocation feed at {url} failed ({error}); retrying from {seq} in {delay:.2f}s",
                url=server,
                error=text,
                seq=self.seq,
                delay=delay,
            )
        self._schedule(delay)


def _retry_after(response: Any) -> float | None:
    values = response.headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    try:
        return max(0.0, float(values[-1]))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# metrics


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _FeedCollector] = weakref.WeakKeyDictionary()


def _collector_of(registry: CollectorRegistry) -> _FeedCollector:
    """The one collector of ``registry`` for every running subscriber (one per feed)."""
    collector = _COLLECTORS.get(registry)
    if collector is None:
        collector = _COLLECTORS[registry] = _FeedCollector(registry)
    return collector


class _FeedCollector:
    """``s2sgw_revocation_feed_*``: computed when scraped from the running subscribers, one
    series per feed (labelled with its first URL); registered while any subscriber runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sources: list[FeedSubscriber] = []

    def add(self, source: FeedSubscriber) -> None:
        if not self.sources:
            self.registry.register(self)
        self.sources.append(source)

    def remove(self, source: FeedSubscriber) -> None:
        self.sources.remove(source)
        if not self.sources:
            self.registry.unregister(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "s2sgw_revocation_feed_age_seconds",
            "Age of the newest verified revocation feed answer (at most the hold time, ~25 s, "
            "while the feed is followed); NaN before the first.",
            labels=["url"],
        )
        seq = GaugeMetricFamily(
            "s2sgw_revocation_feed_seq", "Newest revocation sequence number seen on the feed.", labels=["url"]
        )
        failures = GaugeMetricFamily(
            "s2sgw_revocation_feed_failures", "Failed feed polls in a row (0 while following).", labels=["url"]
        )
        events = CounterMetricFamily(
            "s2sgw_revocation_feed_revocations", "Revocations received from the feed.", labels=["url"]
        )
        for source in self.sources:
            value = source.age()
            age.add_metric([source.url], float("nan") if value is None else value)
            seq.add_metric([source.url], source.seq)
            failures.add_metric([source.url], source.failures)
            events.add_metric([source.url], source.revocations)
        yield age
        yield seq
        yield failures
        yield events
