"""Is a peer's certificate still good? Ask the CA over OCSP, and remember the answer.

Each query carries a fresh nonce and is verified by :mod:`s2sgw.wire.ocsp`; good and revoked
answers are cached until ``nextUpdate`` (at most ``max_cache_age``), concurrent checks of one
certificate share one query, and revocations pushed by the feed override the cache.
"""

from __future__ import annotations

import collections
import datetime
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.config import StatusConfig
from s2sgw.interfaces import IStapleSource, IStatusCache, IStatusCacheStats, IStatusChecker, IStatusProbe
from s2sgw.ops.metrics import MetricSet
from s2sgw.serials import serial_text
from s2sgw.status.responders import Responders
from s2sgw.timeutil import utc
from s2sgw.wire.failover import Failover, another_server_might_answer
from s2sgw.wire.http import (
    KEEPALIVE_SECONDS,
    MAX_RESPONSE_BYTES,
    HTTPStatusError,
    ResponseTooLarge,
    http_client,
    read_limited,
    retry_on_fresh,
)
from s2sgw.wire.ocsp import (
    DEFAULT_LEEWAY,
    OCSP_REQUEST_TYPE,
    CertStatus,
    OCSPQuery,
    StatusInvalid,
    StatusUnavailable,
    build_request,
    key_hash,
    new_nonce,
    verify_response,
)

# Bounded label values for metrics.
OUTCOMES = ("good", "revoked", "unknown", "unavailable", "invalid")


class StatusMetrics(MetricSet):
    """OCSP queries and status cache lookups (registered by the gateway's MetricsService)."""

    def __init__(self) -> None:
        self.query_seconds = Histogram(
            "s2sgw_status_query_seconds",
            "Duration of OCSP queries to the CA status server.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=None,
        )
        self.queries = Counter(
            "s2sgw_status_queries",
            "OCSP queries to the CA status server, by outcome.",
            ["outcome"],
            registry=None,
        )
        self.cache_lookups = Counter(
            "s2sgw_status_cache_lookups",
            "Status checks by how they were answered: hit (cache), miss (new query), coalesced "
            "(joined a query already in flight), revoked (revocation pushed to the checker).",
            ["result"],
            registry=None,
        )
        self.members = (self.query_seconds, self.queries, self.cache_lookups)


# ---------------------------------------------------------------------------------------------
# OCSP client


class _HTTPStatus(HTTPStatusError, StatusUnavailable):
    """The status server answered with an HTTP error code."""

    def __init__(self, code: int) -> None:
        super().__init__(code, f"status server answered HTTP {code}")


def _next_server_might_answer(failure: Failure) -> bool:
    """Answers that do not verify are the server's word: the next server would say the same."""
    return another_server_might_answer(failure, StatusInvalid)


def _describe(failure: Failure) -> str:
    """One line for a transport failure; Agent wraps its causes in a list of Failures."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    return f"{failure.type.__name__}: {failure.getErrorMessage()}".rstrip(": ")


@attrs.frozen
class _Entry:
    status: CertStatus
    expires: float  # clock seconds


@implementer(IStatusChecker, IStatusCache, IStatusCacheStats, IStapleSource, IStatusProbe)
@attrs.define(eq=False)
class OCSPStatusChecker:
    """Asks the CA status server over HTTP, verifies, caches and coalesces.

    Good and revoked answers are cached per (issuer key hash, serial) until their nextUpdate,
    capped at ``max_cache_age`` seconds, so repeated connections of one peer cost no query.
    Concurrent checks of one certificate share one query. A query whose kept-alive connection
    the server closed under it is sent once more on a fresh connection (``fresh_http``). Queries go
    to ``url`` (one URL or a list, with failover) or, with ``responders``, to the servers of the
    root the certificate's issuer chains to.
    """

    url: str | Sequence[str] | None
    clock: IReactorTime
    http: object = None  # treq-like: .post(url, data=, headers=); default treq over an Agent
    fresh_http: object = None  # the same, one connection per request; default ``http`` if that is given
    keepalive: float = KEEPALIVE_SECONDS  # idle kept-alive connections are closed after this
    timeout: float = 2.0
    max_cache_age: float = 300.0
    cache_size: int = 10000
    leeway: datetime.timedelta = DEFAULT_LEEWAY
    max_body: int = MAX_RESPONSE_BYTES
    nonce_source: Callable[[], bytes] = new_nonce
    responders: Responders | None = None
    hits: int = 0
    misses: int = 0
    queries: int = 0
    metrics: StatusMetrics = attrs.field(factory=StatusMetrics)  # handed over by build_gateway
    _cache: collections.OrderedDict = attrs.field(init=False, factory=collections.OrderedDict)
    _revoked: collections.OrderedDict = attrs.field(init=False, factory=collections.OrderedDict)
    _inflight: dict = attrs.field(init=False, factory=dict)
    _pool: object = attrs.field(init=False, default=None)
    _servers: Failover | None = attrs.field(init=False, default=None)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.url:
            urls = (self.url,) if isinstance(self.url, str) else tuple(self.url)
            self._servers = Failover(urls, self.clock, label="status server")
        if self.http is None:
            self.http, self._pool = http_client(self.clock, max_per_host=4, idle_timeout=self.keepalive)
            if self.fresh_http is None:
                self.fresh_http, _ = http_client(self.clock, persistent=False)
        if self.fresh_http is None:
            self.fresh_http = self.http

    def close(self) -> Deferred[None]:
        """Close kept-alive connections to the status server (a service's stopService)."""
        if self._servers is not None:
            self._servers.stop()
        if self.responders is not None:
            self.responders.stop()
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    def configure(self, config: StatusConfig) -> None:
        """Apply a reloaded ``[status]``: query timeout, cache limits and the responders."""
        self.timeout = config.timeout
        self.max_cache_age = config.max_cache_age
        self.cache_size = config.cache_size
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if self.responders is not None:
            self.responders.configure(config)

    # -- IStatusChecker

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        """Fire with a verified CertStatus, or fail with StatusUnavailable / StatusInvalid."""
        serial = leaf.serial_number
        pushed = self._revoked.get(serial)
        if pushed is not None:
            self.metrics.cache_lookups.labels("revoked").inc()
            self.hits += 1
            return defer.succeed(pushed)
        key = (key_hash(issuer), serial)
        cached = self.lookup_key(key)
        if cached is not None:
            self.metrics.cache_lookups.labels("hit").inc()
            self.hits += 1
            return defer.succeed(cached)
        self.misses += 1
        waiters = self._inflight.get(key)
        start = waiters is None
        if start:
            query = build_request(leaf, issuer, nonce=self.nonce_source())
            waiters = self._inflight[key] = []
        self.metrics.cache_lookups.labels("miss" if start else "coalesced").inc()

        def cancel(d: Deferred) -> None:
            if d in waiters:
                waiters.remove(d)

        waiter: Deferred[CertStatus] = Deferred(cancel)
        waiters.append(waiter)
        if start:
            # after appending: a query that fails synchronously settles its waiters at once
            self._query(key, query, issuer)
        return waiter

    # -- IStatusCache: cache access and hooks for a revocation feed

    def lookup(self, leaf: x509.Certificate, issuer: x509.Certificate) -> CertStatus | None:
        """The cached, still fresh status of ``leaf``, without asking the CA."""
        pushed = self._revoked.get(leaf.serial_number)
        if pushed is not None:
            return pushed
        key = (key_hash(issuer), leaf.serial_number)
        return self.lookup_key(key)

    def lookup_key(self, key: tuple[bytes, int]) -> CertStatus | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock.seconds():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.status

    def forget(self, serial: int) -> None:
        """Drop cached answers for ``serial`` so that the next check asks the CA again."""
        for key in [k for k in self._cache if k[1] == serial]:
            del self._cache[key]

    def revoke(
        self,
        serial: int,
        revoked_at: datetime.datetime | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer ``revoked`` for ``serial`` from now on, without asking (a pushed revocation)."""
        self.forget(serial)
        now = utc(self.clock.seconds())
        self._revoked[serial] = CertStatus(
            "revoked", now, None, revoked_at=revoked_at or now, revocation_reason=reason
        )
        self._revoked.move_to_end(serial)
        while len(self._revoked) > self.cache_size:
            self._revoked.popitem(last=False)

    @property
    def cache_entries(self) -> int:
        """How many answers the cache holds now (IStatusCacheStats)."""
        return len(self._cache)

    def remember(self, leaf: x509.Certificate, issuer: x509.Certificate, status: CertStatus) -> bool:
        """Cache a status proven without a query of ours (a verified staple); good/revoked only.

        It never replaces a revocation or a newer answer already cached: a revoked server may
        still hold an older "good" answer within its validity and staple it.
        """
        if status.state not in ("good", "revoked"):
            return False
        key = (key_hash(issuer), leaf.serial_number)
        known = self.lookup_key(key)
        if known is not None and (known.state == "revoked" or known.this_update >= status.this_update):
            return False
        self._store(key, status)
        return key in self._cache

    # -- IStapleSource

    def accept_staple(self, leaf: x509.Certificate, issuer: x509.Certificate, der: bytes) -> CertStatus:
        """Verify a stapled (nonce-less) answer about ``leaf`` and cache what it proves.

        Raises StatusInvalid / StatusUnavailable when it does not verify; nothing is cached then.
        """
        status = self._verify(der, build_request(leaf, issuer, nonce=None), issuer)
        self.remember(leaf, issuer, status)
        return status

    def fetch_staple(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[tuple[bytes, CertStatus]]:
        """Ask for a nonce-less answer about our own ``leaf``: (raw DER, verified status).

        For stapling: the DER is handed to peers as is, so it must not carry a nonce; the CA
        answers such queries from its pre-signed cache. Not cached and not counted as a peer check.
        """
        query = build_request(leaf, issuer, nonce=None)
        return self._ask(query, issuer).addErrback(self._classify)

    # -- IStatusProbe

    def in_use(self) -> str:
        """The OCSP URL in use, per responder when there are several."""
        if self.responders is not None:
            entries = self.responders.status()
            if len(entries) == 1:
                return str(entries[0]["in_use"])
            return ", ".join(
                f"{entry['in_use']} (root {entry['root'][:16] if entry['root'] else 'default'})" for entry in entries
            )
        return self._servers.current if self._servers is not None else "none"

    def probe(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        """Ask about ``leaf`` past the cache, with a fresh nonce; store nothing (readiness probes)."""
        query = build_request(leaf, issuer, nonce=new_nonce())
        d = self._ask(query, issuer)
        d.addCallback(lambda answer: answer[1])
        d.addErrback(lambda failure: failure if failure.check(defer.CancelledError) else self._classify(failure))
        return d

    # -- internals

    def servers_for(self, issuer: x509.Certificate) -> Failover | None:
        """The status servers that answer for certificates of ``issuer``."""
        if self.responders is not None:
            return self.responders.for_issuer(issuer)
        return self._servers

    def _ask(self, query: OCSPQuery, issuer: x509.Certificate) -> Deferred[tuple[bytes, CertStatus]]:
        """The one OCSP exchange, on the server in use for ``issuer`` and, on connection errors and
        timeouts, on the next ones -> (DER, status)."""
        servers = self.servers_for(issuer)
        if servers is None:
            return defer.fail(StatusUnavailable("no status server is configured for this issuer"))
        return servers.request(lambda url: self._exchange(url, query, issuer), _next_server_might_answer)

    def _exchange(self, url: str, query: OCSPQuery, issuer: x509.Certificate) -> Deferred[tuple[bytes, CertStatus]]:
        """POST (again on a fresh connection if a kept-alive one was closed under it), read a
        bounded body, time out, verify -> (DER, status)."""
        d = retry_on_fresh(lambda: self._post(self.http, url, query), lambda: self._post(self.fresh_http, url, query))
        d.addCallback(self._read_body)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)
        d.addErrback(self._classify)
        d.addCallback(lambda body: (body, self._verify(body, query, issuer)))
        return d

    def _post(self, http: object, url: str, query: OCSPQuery) -> Deferred[object]:
        return http.post(
            url,
            data=query.der,
            headers={b"Content-Type": [OCSP_REQUEST_TYPE], b"Accept": [b"application/ocsp-response"]},
        )

    def _query(self, key: tuple[bytes, int], query: OCSPQuery, issuer: x509.Certificate) -> None:
        started = self.clock.seconds()
        self.queries += 1
        d = self._ask(query, issuer)
        d.addCallback(lambda answer: answer[1])
        d.addErrback(self._classify)
        d.addBoth(self._settle, key, started)

    def _read_body(self, response) -> Deferred[bytes]:
        body = read_limited(response, self.max_body)
        if response.code != 200:
            code = response.code

            def refuse(_: object) -> None:
                raise _HTTPStatus(code)

            body.addBoth(refuse)
        return body

    def _verify(self, body: bytes, query: OCSPQuery, issuer: x509.Certificate) -> CertStatus:
        return verify_response(
            body,
            query,
            issuer,
            now=utc(self.clock.seconds()),
            leeway=self.leeway,
            max_age=datetime.timedelta(seconds=self.max_cache_age),
        )

    def _timed_out(self, result: object, timeout: float) -> Failure:
        # Agent wraps the cancellation (ResponseNeverReceived), so say what happened here.
        return Failure(StatusUnavailable(f"status query timed out after {timeout}s"))

    def _classify(self, failure: Failure) -> Failure:
        """Map transport failures to StatusUnavailable; leave verification failures as they are."""
        if failure.check(StatusUnavailable, StatusInvalid):
            return failure
        if failure.check(ResponseTooLarge):
            return Failure(StatusInvalid(str(failure.value)))
        # connection refused, reset, DNS, HTTP parse errors: the CA could not be asked
        return Failure(StatusUnavailable(f"status query failed: {_describe(failure)}"))

    def _settle(self, result: CertStatus | Failure, key: tuple[bytes, int], started: float) -> None:
        self.metrics.query_seconds.observe(max(0.0, self.clock.seconds() - started))
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            outcome = "unavailable" if result.check(StatusUnavailable) else "invalid"
            self.metrics.queries.labels(outcome).inc()
            self._log.info(
                "status query for serial {serial} failed: {error}",
                serial=serial_text(key[1]),
                error=result.getErrorMessage(),
            )
        else:
            self.metrics.queries.labels(result.state).inc()
            if result.state in ("good", "revoked"):
                self._store(key, result)
            pushed = self._revoked.get(key[1])
            if pushed is not None:
                result = pushed  # revoked while we were asking
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    def _store(self, key: tuple[bytes, int], status: CertStatus) -> None:
        now = self.clock.seconds()
        expires = now + self.max_cache_age
        if status.next_update is not None:
            expires = min(expires, status.next_update.timestamp())
        else:
            expires = min(expires, status.this_update.timestamp() + self.max_cache_age)
        if expires <= now:
            return
        self._cache[key] = _Entry(status, expires)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# CRL and off


