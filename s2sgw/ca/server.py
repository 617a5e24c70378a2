"""The CA status server: OCSP over HTTP, the CRL, the trust bundle and a health check.

:class:`StatusPublisher` holds what the resources serve and keeps it in step with the CA store:
a watcher polls :meth:`CertificateAuthority.change_marker` every quarter second in a thread and
applies new revocations at once (cached answers re-signed, CRL regenerated), so ``s2sgw ca
revoke`` shows within a second without a restart. Statuses of serials nobody asked about yet are
looked up on demand with ``CertificateAuthority.lookup`` in a thread and then kept in memory;
SQLite is never touched on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Callable
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from s2sgw.ca.feed import DEFAULT_HOLD, FeedResource, RevocationFeed
from s2sgw.ca.ocsp import TRY_LATER_ANSWER, Answer, Query, Responder, SerialStatus

OCSP_REQUEST_TYPE = b"application/ocsp-request"
OCSP_RESPONSE_TYPE = b"application/ocsp-response"
CRL_TYPE = b"application/pkix-crl"
PEM_TYPE = b"application/x-pem-file"

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_TIMEOUT = 10.0

InThread = Callable[..., defer.Deferred]

_log = Logger()


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _http_date(moment: datetime.datetime) -> bytes:
    return http.datetimeToString(moment.timestamp())


def _read_changes(ca: Any, marker: int | None, last_seq: int) -> tuple[int, list[Any]] | None:
    """Thread side of one watcher step: None when nothing changed since ``marker``."""
    current = ca.change_marker()
    if current == marker:
        return None
    return current, ca.revocations_since(last_seq)


@attrs.define(eq=False)
class StatusPublisher:
    """Everything the status server hands out for one CA, kept current from its store.

    ``in_thread(f, *args)`` runs blocking store work and fires with its result; a real server
    passes ``deferToThread``, unit tests a synchronous stand-in.
    """

    ca: Any  # s2sgw.ca.authority.CertificateAuthority
    responder: Responder
    clock: IReactorTime
    in_thread: InThread
    crl_hours: float = 24.0
    max_statuses: int = 100_000
    stale_after: float = 5.0

    bundle_pem: bytes | None = None
    crl_der: bytes | None = None
    crl_etag: str | None = None
    crl_this_update: datetime.datetime | None = None
    crl_next_update: datetime.datetime | None = None
    marker: int | None = None
    last_seq: int = 0
    last_poll: float | None = None  # clock seconds of the last successful store poll
    # Called with each batch of revocation records _apply takes in (the revocation feed).
    listeners: list[Callable[[list[Any]], None]] = attrs.field(factory=list)
    feed: Any = None  # the RevocationFeed build_root attached, for health

    _statuses: dict[int, SerialStatus] = attrs.field(factory=dict)
    _generation: int = 0
    _poll_failing: bool = False
    _crl_busy: bool = False

    _log = Logger()

    def now(self) -> datetime.datetime:
        return _utc(self.clock.seconds())

    # -- answering ------------------------------------------------------------------------

    def answer(self, body: bytes) -> Answer | defer.Deferred[Answer]:
        """An Answer at once when the status is in memory, else a Deferred after a store lookup."""
        parsed = self.responder.parse(body)
        if isinstance(parsed, Answer):
            return parsed
        now = self.now()
        hit = self.responder.cached(parsed, now)
        if hit is not None:
            return hit
        status = self._statuses.get(parsed.serial)
        if status is not None:
            return self.responder.respond(parsed, status, now)
        generation = self._generation
        d = self.in_thread(self.ca.lookup, parsed.serial)
        d.addCallback(self._looked_up, parsed, generation)
        d.addErrback(self._lookup_failed, parsed)
        return d

    def _looked_up(self, record: Any, query: Query, generation: int) -> Answer:
        status = SerialStatus.from_record(record)
        # A change applied while the lookup ran may be newer than what it read: answer this
        # asker (as if it had come a moment earlier) but keep nothing.
        current = generation == self._generation
        if current:
            self._remember(query.serial, status)
        return self.responder.respond(query, status, self.now(), cache=current)

    def _lookup_failed(self, failure: Failure, query: Query) -> Answer:
        self._log.failure("status lookup of serial {serial:x} failed", failure, serial=query.serial)
        return TRY_LATER_ANSWER

    def _remember(self, serial: int, status: SerialStatus) -> None:
        self._statuses.pop(serial, None)
        while len(self._statuses) >= self.max_statuses:
            del self._statuses[next(iter(self._statuses))]
        self._statuses[serial] = status

    # -- keeping up with the store --------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.marker is not None and self.bundle_pem is not None and self.crl_der is not None

    def healthy(self) -> bool:
        if not self.ready or self.last_poll is None:
            return False
        if self.clock.seconds() - self.last_poll > self.stale_after:
            return False
        return self.crl_next_update is None or self.now() < self.crl_next_update

    def load(self) -> defer.Deferred[None]:
        """Read the bundle, the revocations so far and a fresh CRL; then start from that marker."""

        def read() -> tuple[bytes, int, list[Any]]:
            bundle = (self.ca.directory / "bundle.pem").read_bytes()
            marker = self.ca.change_marker()
            return bundle, marker, self.ca.revocations_since(0)

        d = self.in_thread(read)

        def loaded(result: tuple[bytes, int, list[Any]]) -> defer.Deferred[None]:
            bundle, marker, revocations = result
            self.bundle_pem = bundle
            self._apply(marker, revocations)
            self.last_poll = self.clock.seconds()
            self._log.info(
                "status server loaded {count} revocations, change marker {marker}",
                count=len(revocations),
                marker=marker,
            )
            return self.regenerate_crl()

        d.addCallback(loaded)
        return d

    def poll(self) -> defer.Deferred[None]:
        """One watcher step; never fails (a failing store is logged once, then retried)."""
        if self.marker is None:
            d = self.load()
        else:
            d = self.in_thread(_read_changes, self.ca, self.marker, self.last_seq)
            d.addCallback(self._changes_read)
        d.addCallbacks(self._poll_ok, self._poll_failed)
        return d

    def _changes_read(self, result: tuple[int, list[Any]] | None) -> defer.Deferred[None] | None:
        if result is None:
            return None
        marker, revocations = result
        self._apply(marker, revocations)
        if revocations:
            return self.regenerate_crl()
        return None

    def _poll_ok(self, _: object) -> None:
        self.last_poll = self.clock.seconds()
        if self._poll_failing:
            self._poll_failing = False
            self._log.info("CA store readable again")

    def _poll_failed(self, failure: Failure) -> None:
        if not self._poll_failing:
            self._poll_failing = True
            self._log.failure("reading the CA store failed; answers may be stale", failure)

    def _apply(self, marker: int, revocations: list[Any]) -> None:
        """Take in what changed: revoked serials re-signed now, forgotten unknowns dropped."""
        now = self.now()
        self._generation += 1
        dropped = self.responder.forget_unknown()
        for serial in [s for s, status in self._statuses.items() if status.state == "unknown"]:
            del self._statuses[serial]
        for record in revocations:
            status = SerialStatus.from_record(record)
            self._remember(record.serial, status)
            resigned = self.responder.update(record.serial, status, now)
            if record.revocation_seq is not None:
                self.last_seq = max(self.last_seq, record.revocation_seq)
            self._log.info(
                "serial {serial:x} ({name}) revoked: {reason}; {resigned} cached answers re-signed",
                serial=record.serial,
                name=record.name,
                reason=record.reason,
                resigned=resigned,
            )
        if self.marker is not None and marker != self.marker:
            self._log.debug(
                "CA store changed ({old} -> {new}); {dropped} unknown answers dropped",
                old=self.marker,
                new=marker,
                dropped=dropped,
            )
        self.marker = marker
        for listener in self.listeners:
            try:
                listener(revocations)
            except Exception:
                self._log.failure("a revocation listener failed")

    # -- periodic work --------------------------------------------------------------------

    def refresh(self) -> defer.Deferred[None] | None:
        """Re-sign answers before they go stale; regenerate the CRL past half its life."""
        self.responder.refresh(self.now())
        if self.crl_this_update is not None and self.crl_next_update is not None:
            half = self.crl_this_update + (self.crl_next_update - self.crl_this_update) / 2
            if self.now() >= half:
                return self.regenerate_crl().addErrback(
                    lambda failure: self._log.failure("CRL regeneration failed", failure)
                )
        return None

    def regenerate_crl(self) -> defer.Deferred[None]:
        if self._crl_busy:
            return defer.succeed(None)
        self._crl_busy = True

        def make() -> bytes:
            return self.ca.make_crl(hours=self.crl_hours, now=_utc(self.clock.seconds())).public_bytes(
                serialization.Encoding.DER
            )

        def done(der: bytes) -> None:
            from cryptography import x509

            crl = x509.load_der_x509_crl(der)
            self.crl_der = der
            self.crl_etag = '"' + hashlib.sha256(der).hexdigest()[:32] + '"'
            self.crl_this_update = crl.last_update_utc
            self.crl_next_update = crl.next_update_utc
            self._log.info(
                "CRL {number} published, next update {next_update}",
                number=_crl_number(crl),
                next_update=self.crl_next_update.isoformat() if self.crl_next_update else None,
            )

        def finished(result: object) -> object:
            self._crl_busy = False
            return result

        d = self.in_thread(make)
        d.addCallback(done)
        d.addBoth(finished)
        return d

    def health(self) -> dict[str, object]:
        now = self.clock.seconds()
        return {
            "status": "ok" if self.healthy() else ("starting" if not self.ready else "stale"),
            "change_marker": self.marker,
            "revocation_seq": self.last_seq,
            "cached_answers": len(self.responder),
            "known_statuses": len(self._statuses),
            "signatures": self.responder.signatures,
            "last_poll_age": None if self.last_poll is None else round(now - self.last_poll, 3),
            "crl_next_update": self.crl_next_update.isoformat() if self.crl_next_update else None,
            "feed_waiting": None if self.feed is None else self.feed.waiting,
        }


def _crl_number(crl: Any) -> int | None:
    from cryptography import x509

    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


@attrs.define(eq=False, slots=False)
class StoreWatcher(Service):
    """Loads the publisher, then polls the store and refreshes answers on the injected clock."""

    publisher: StatusPublisher
    clock: IReactorTime
    poll_interval: float = 0.25
    refresh_interval: float = 1.0
    _loops: list[task.LoopingCall] = attrs.field(factory=list)

    _log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        poll = task.LoopingCall(self.publisher.poll)
        refresh = task.LoopingCall(self.publisher.refresh)
        for loop, interval in ((poll, self.poll_interval), (refresh, self.refresh_interval)):
            loop.clock = self.clock
            self._loops.append(loop)
            loop.start(interval, now=True).addErrback(
                lambda failure: self._log.failure("store watcher stopped", failure)
            )

    def stopService(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        Service.stopService(self)


# -- HTTP ---------------------------------------------------------------------------------


def decode_get_path(segments: list[bytes]) -> bytes | None:
    """The DER request from ``/ocsp/{base64}`` (already URL-decoded per segment), or None.

    Standard base64 may hold ``/``, so the segments are joined again; URL-safe letters and
    missing padding are accepted too, as some clients send them.
    """
    text = b"/".join(segments).strip()
    if not text:
        return None
    text = text.replace(b"-", b"+").replace(b"_", b"/").replace(b" ", b"+")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _etag_matches(request: server.Request, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): a list of tags, weak ones compared by their opaque part."""
    header = request.getHeader(b"If-None-Match")
    if not header:
        return False
    tags = {tag.strip().removeprefix(b"W/") for tag in header.split(b",")}
    return b"*" in tags or etag.encode("ascii") in tags


class OCSPResource(resource.Resource):
    """``POST /ocsp`` and ``GET /ocsp/{base64 request}``."""

    isLeaf = True
    _log = Logger()

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_POST(self, request: server.Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        return self._reply(request, body, get=False)

    def render_GET(self, request: server.Request) -> bytes | int:
        body = decode_get_path(request.postpath or [])
        return self._reply(request, body if body is not None else b"", get=True)

    def _reply(self, request: server.Request, body: bytes, *, get: bool) -> bytes | int:
        try:
            result = self._publisher.answer(body)
        except Exception:
            self._log.failure("OCSP request handling failed")
            result = _INTERNAL_ERROR
        if isinstance(result, Answer):
            return self._write(request, result, get)
        finished = [False]
        request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))

        def deliver(answer: Answer) -> None:
            if finished[0]:
                return
            body = self._write(request, answer, get)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        result.addCallback(deliver)
        result.addErrback(lambda failure: self._log.failure("OCSP answer not delivered", failure))
        return server.NOT_DONE_YET

    def _write(self, request: server.Request, answer: Answer, get: bool) -> bytes:
        request.setHeader(b"Content-Type", OCSP_RESPONSE_TYPE)
        if not (get and answer.cacheable):
            request.setHeader(b"Cache-Control", b"no-store")
            return answer.der
        assert answer.this_update is not None and answer.next_update is not None
        max_age = max(0, int((answer.next_update - self._publisher.now()).total_seconds()))
        request.setHeader(
            b"Cache-Control", b"max-age=%d, public, no-transform, must-revalidate" % max_age
        )
        request.setHeader(b"Last-Modified", _http_date(answer.this_update))
        request.setHeader(b"Expires", _http_date(answer.next_update))
        if answer.etag is not None:
            request.setHeader(b"ETag", answer.etag.encode("ascii"))
            if _etag_matches(request, answer.etag):
                request.setResponseCode(http.NOT_MODIFIED)
                return b""
        return answer.der


_INTERNAL_ERROR = Answer(
    der=x509_ocsp.OCSPResponseBuilder.build_unsuccessful(
        x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR
    ).public_bytes(serialization.Encoding.DER),
    status=x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR,
)


class CRLResource(resource.Resource):
    """``GET /crl``: the current CRL in DER, from memory."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        p = self._publisher
        if p.crl_der is None or p.crl_this_update is None:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"CRL not generated yet\n"
        request.setHeader(b"Content-Type", CRL_TYPE)
        request.setHeader(b"Last-Modified", _http_date(p.crl_this_update))
        if p.crl_next_update is not None:
            request.setHeader(b"Expires", _http_date(p.crl_next_update))
            # Revocations publish a new CRL at once: let caches hold it no longer than an
            # OCSP answer lives, so both views of revocation age alike.
            left = (p.crl_next_update - p.now()).total_seconds()
            max_age = max(0, int(min(left, p.responder.validity.total_seconds())))
            request.setHeader(b"Cache-Control", b"max-age=%d, public, no-transform" % max_age)
        if p.crl_etag is not None:
            request.setHeader(b"ETag", p.crl_etag.encode("ascii"))
            if _etag_matches(request, p.crl_etag):
                request.setResponseCode(http.NOT_MODIFIED)
                return b""
        return p.crl_der


class BundleResource(resource.Resource):
    """``GET /bundle.pem``: the trust anchors gateways load."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        if self._publisher.bundle_pem is None:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"bundle not loaded yet\n"
        request.setHeader(b"Content-Type", PEM_TYPE)
        return self._publisher.bundle_pem


class HealthResource(resource.Resource):
    """``GET /healthz``: 200 when loaded, polling the store and the CRL is current; else 503."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        state = self._publisher.health()
        if state["status"] != "ok":
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(state, sort_keys=True).encode("utf-8") + b"\n"


def build_root(publisher: StatusPublisher, *, feed_hold: float = DEFAULT_HOLD) -> resource.Resource:
    """The status server's resources; ``/revocations`` is fed by every ``_apply``."""
    feed = RevocationFeed(
        issuer=publisher.responder.issuer,
        signer_cert=publisher.responder.signer_cert,
        signer_key=publisher.responder.signer_key,
        clock=publisher.clock,
        hold=feed_hold,
    )
    publisher.listeners.append(feed.publish)
    if publisher.marker is not None:
        # Loaded already: what it applied so far is read again from the store.
        feed.seeding = True
        publisher.in_thread(publisher.ca.revocations_since, 0).addCallbacks(
            feed.seed, lambda failure: _log.failure("reading revocations for the feed failed", failure)
        )
    publisher.feed = feed
    root = resource.Resource()
    root.putChild(b"revocations", FeedResource(feed))
    root.putChild(b"ocsp", OCSPResource(publisher))
    root.putChild(b"crl", CRLResource(publisher))
    root.putChild(b"bundle.pem", BundleResource(publisher))
    root.putChild(b"healthz", HealthResource(publisher))
    return root


_TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


class LimitedRequest(server.Request):
    """A request whose body may not exceed the site's ``max_body``.

    A declared length over the limit is refused before any of the body is read; a chunked body
    is refused as soon as it passes the limit. Either way the answer is a bare 413 and the
    connection closes, so the rest is never read.
    """

    _body_received = 0
    _refused = False

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body", DEFAULT_MAX_BODY)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_received += len(data)
        if self._body_received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(_TOO_LARGE)
            transport.loseConnection()


class StatusSite(server.Site):
    """The status server's site: bounded bodies, idle timeout, no per-request access log."""

    def __init__(
        self,
        root: resource.Resource,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        # OCSP bodies are DER, never forms: parsing them as multipart costs ~50 us per request.
        super().__init__(
            root,
            requestFactory=LimitedRequest,
            parsePOSTFormSubmission=False,
            timeout=timeout,
            reactor=reactor,
        )
        self.max_body = max_body

    def log(self, request: server.Request) -> None:
        """No access log: at thousands of answers a second it would cost more than the answers."""


def thread_runner(reactor: Any) -> InThread:
    """``in_thread`` for a real reactor: its thread pool."""

    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run
