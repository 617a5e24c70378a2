"""Mode ``crl``: fetch the CA's CRL on an interval, check it, write it atomically, swap it in.

A fetched CRL goes through the trust store's own checks first (signature by a CA we trust,
freshness, a CRL number never lower than the current one: a replayed older CRL is refused and
logged). Only then is it written over the configured ``status.crl`` file (temp file + rename, in a
thread) and the gateway reloads, so the file on disk, the trust store and the status checker all
hold the same CRL and a restart starts from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw import pki
from s2sgw.config import ConfigError
from s2sgw.files import write_atomically
from s2sgw.ops.metrics import MetricSet
from s2sgw.interfaces import IStatusChecker, ITrustStore
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.wire.failover import Failover, another_server_might_answer
from s2sgw.wire.http import HTTPStatusError, ResponseTooLarge, http_client, read_limited

MAX_CRL_BYTES = 4 * 1024 * 1024
CRL_ACCEPT = b"application/pkix-crl, application/x-pem-file;q=0.5"


class CRLRefreshMetrics(MetricSet):
    """CRL fetches by outcome (registered by the gateway's MetricsService, in every mode)."""

    def __init__(self) -> None:
        # outcome: updated (new CRL in use), unchanged (304 or same number), refused (failed our
        # checks: forged, stale, replayed), failed (CA unreachable, HTTP error, write or reload failed).
        self.refreshes = Counter(
            "s2sgw_crl_refreshes", "CRL fetches from the CA, by outcome.", ["outcome"], registry=None
        )
        self.members = (self.refreshes,)


class CRLFetchError(Exception):
    """The CRL could not be fetched (HTTP status, timeout) or put in use (write, reload)."""


def reload_following_crl(store: ITrustStore, checker: IStatusChecker) -> Callable[[], Deferred[int]]:
    """``store.reload`` that afterwards hands the store's CRL to a CRL status checker.

    Every reload path (SIGHUP, timer, CRL refresh) goes through this, so the checker never
    judges with an older CRL than the trust store holds.
    """

    def follow(generation: int) -> int:
        material = store.material
        if isinstance(checker, CRLStatusChecker) and material.crl is not None and (
            material.crl is not checker.crl or material.other_crls != checker.others
        ):
            _hand_over(material, checker)
        return generation

    if isinstance(checker, CRLStatusChecker) and store.crl is not None:
        _hand_over(store.material, checker)  # the store's start-up CRLs are the checked ones

    def reload() -> Deferred[int]:
        return store.reload().addCallback(follow)

    return reload


def _hand_over(material: Any, checker: CRLStatusChecker) -> None:
    """Give the checker the material's CRLs and the CA certificates that verify a root's CRL."""
    checker.replace(material.crl, tuple(material.other_crls), tuple(material.ca_certificates))


@attrs.define(eq=False)
class CRLRefreshService(Service):
    """Every ``interval`` seconds: GET the CRL at the store's ``status.crl_url``, check, write, reload.

    ``store`` is the :class:`~s2sgw.truststore.TrustStore` (``config``, ``crl``,
    ``check_crl_bytes``); ``reload`` fires the new generation once the written file is in use
    (pass the gateway's reload, so the status checker follows). ``http`` is treq-like (``get``).
    ``on_reloaded`` gets the new generation after a CRL-driven reload, like ReloadService's hook,
    so whatever follows reloads (live-connection checks, status summaries) sees this one too.
    The URL and file are read from the store's current configuration at each fetch; the
    interval is fixed at start. A fetch never fails the timer: every outcome is logged.
    """

    store: ITrustStore
    reload: Callable[[], Deferred[int]]
    reactor: Any
    interval: float
    http: Any = None
    timeout: float = 10.0
    max_bytes: int = MAX_CRL_BYTES
    threadpool: Any = None
    on_reloaded: Callable[[int], None] | None = None
    failures: int = 0
    refused: int = 0
    updates: int = 0
    last_error: str | None = None
    last_success: float | None = None  # clock seconds of the last fetch that ended updated or unchanged
    metrics: CRLRefreshMetrics = attrs.field(factory=CRLRefreshMetrics)  # handed over by build_gateway
    _log = Logger()

    _timer: LoopingCall | None = attrs.field(default=None, init=False)
    _running: Deferred | None = attrs.field(default=None, init=False)
    _etag: bytes | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _servers: Failover | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            self.http, _ = http_client(self.reactor, persistent=False)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._timer = LoopingCall(self.refresh)
        self._timer.clock = self.reactor
        self._timer.start(self.interval, now=True)

    def stopService(self) -> Deferred | None:
        self._stopping = True
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        super().stopService()
        if self._running is not None:
            self._running.cancel()
        if self._servers is not None:
            self._servers.stop()
        return None

    def status(self) -> dict[str, Any]:
        """The ``crl_refresh`` field of the gateway's status: plain JSON types."""
        status = self.store.config.status
        crl = self.store.crl
        next_update = crl.next_update_utc if crl is not None else None
        servers = self.servers()
        return {
            "url": None if servers is None else servers.current,
            "urls": list(status.default.crl_urls),
            "file": str(status.crl) if status.crl is not None else None,
            "interval": self.interval,
            "crl_number": pki.crl_number(crl) if crl is not None else None,
            "next_update": next_update.isoformat() if next_update is not None else None,
            "seconds_since_success": (
                None if self.last_success is None else round(self.reactor.seconds() - self.last_success, 3)
            ),
            "updates": self.updates,
            "refused": self.refused,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def servers(self) -> Failover | None:
        """The CRL servers in force (``status.crl_url``), kept while the list stays the same."""
        urls = self.store.config.status.default.crl_urls
        if not urls:
            return None
        if self._servers is None or self._servers.urls != urls:
            if self._servers is not None:
                self._servers.stop()
            self._servers = Failover(urls, self.reactor, label="CRL server")
        return self._servers

    def refresh(self) -> Deferred[str]:
        """Fetch once; fire with the outcome (``updated``, ``unchanged``, ``refused``, ``failed``)."""
        if self._running is not None or self._stopping:
            return defer.succeed("busy")
        status = self.store.config.status
        servers, path = self.servers(), status.crl
        if status.mode != "crl" or servers is None or path is None:
            return defer.succeed("unchanged")
        headers = {b"Accept": [CRL_ACCEPT]}
        if self._etag is not None:
            headers[b"If-None-Match"] = [self._etag]
        used: list[str] = []

        def fetch(url: str) -> Deferred[tuple[bytes, bytes | None] | None]:
            used.append(url)
            d = defer.maybeDeferred(self.http.get, url, headers=headers)
            d.addCallback(self._read)
            d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)
            return d

        d = self._running = servers.request(fetch, _next_server_might_answer)
        d.addCallback(lambda fetched: self._apply(fetched, used[-1], Path(path)))
        d.addErrback(lambda failure: self._settle_failure(failure, used[-1] if used else servers.current))
        d.addErrback(lambda failure: self._bug(failure, servers.current))
        d.addBoth(self._done)  # last: also right when everything above ran synchronously
        return d

    def _read(self, response: Any) -> Deferred[tuple[bytes, bytes | None] | None]:
        code = response.code
        body = read_limited(response, self.max_bytes)
        if code == 304:
            return body.addCallback(lambda _: None)
        if code != 200:

            def refuse(_: object) -> None:
                raise _CRLHTTPStatus(code)

            return body.addBoth(refuse)
        etag = response.headers.getRawHeaders(b"ETag", [None])[0]
        return body.addCallback(lambda data: (data, etag))

    def _timed_out(self, result: object, timeout: float) -> Failure:
        return Failure(CRLFetchError(f"timed out after {timeout} s"))

    def _apply(self, fetched: tuple[bytes, bytes | None] | None, url: str, path: Path) -> Deferred[str] | str:
        if fetched is None:
            self.last_success = self.reactor.seconds()
            self.metrics.refreshes.labels("unchanged").inc()
            self._log.debug("CRL at {url} not modified", url=url)
            return "unchanged"
        data, etag = fetched
        crl = self.store.check_crl_bytes(data, source=f"CRL from {url}")  # ConfigError: refused
        material = self.store.material
        number, current = pki.crl_number(crl), material.crl_of(crl.issuer)
        if current is not None and number == pki.crl_number(current) and _same(crl, current):
            self._etag = etag
            self.last_success = self.reactor.seconds()
            self.metrics.refreshes.labels("unchanged").inc()
            return "unchanged"
        # The file also holds the CRLs of other CAs (the root's): they stay, after the fetched one.
        kept = [held for held in material.crls if held.issuer != crl.issuer]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (crl, *kept))
        threadpool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        d = deferToThreadPool(self.reactor, threadpool, write_atomically, path, pem)
        d.addCallback(lambda _: self._reload_after_write(url, number))
        d.addCallback(self._updated, url, number, etag)
        return d

    def _reload_after_write(self, url: str, number: int | None) -> Deferred[int]:
        if self._stopping:
            raise CRLFetchError("shutting down; the written CRL applies at the next start")

        def failed(failure: Failure) -> None:
            # The store logged why; keep a failed reload apart from a refused CRL.
            raise CRLFetchError(f"CRL {number} written, but the reload failed: {failure.getErrorMessage()}")

        return self.reload().addErrback(failed)

    def _updated(self, generation: int, url: str, number: int | None, etag: bytes | None) -> str:
        self._etag = etag
        self.last_error = None
        self.updates += 1
        self.last_success = self.reactor.seconds()
        self.metrics.refreshes.labels("updated").inc()
        self._log.info(
            "CRL {number} from {url} in use (trust generation {generation})",
            number=number,
            url=url,
            generation=generation,
        )
        if self.on_reloaded is not None:
            self.on_reloaded(generation)
        return "updated"

    def _settle_failure(self, failure: Failure, url: str) -> str:
        if failure.check(defer.CancelledError) and self._stopping:
            return "failed"
        # ConfigError: our checks refused it; the rest: the CA could not be asked or the write failed.
        # Agent failures (ResponseFailed, ConnectError, ...) arrive as various Exception types.
        failure.trap(Exception)
        message = _describe(failure)
        self.last_error = message
        if failure.check(ConfigError):
            self.refused += 1
            self.metrics.refreshes.labels("refused").inc()
            self._log.warn("CRL from {url} refused, keeping the current one: {error}", url=url, error=message)
            return "refused"
        self.failures += 1
        self.metrics.refreshes.labels("failed").inc()
        self._log.warn("CRL refresh from {url} failed, keeping the current one: {error}", url=url, error=message)
        return "failed"

    def _bug(self, failure: Failure, url: str) -> str:  # pragma: no cover - defensive
        self._log.failure("CRL refresh from {url} failed unexpectedly", failure, url=url)
        return "failed"

    def _done(self, outcome: str) -> str:
        self._running = None
        return outcome


class _CRLHTTPStatus(HTTPStatusError, CRLFetchError):
    """The CRL server answered with an HTTP error code."""


def _next_server_might_answer(failure: Failure) -> bool:
    """A CRL our checks refuse is the server's word: the next server would say the same."""
    return another_server_might_answer(failure, ConfigError)


def _same(a: x509.CertificateRevocationList, b: x509.CertificateRevocationList) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    if failure.check(ConfigError, CRLFetchError, ResponseTooLarge):
        return str(failure.value)
    return f"{failure.type.__name__}: {failure.getErrorMessage()}".rstrip(": ")
