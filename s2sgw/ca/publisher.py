"""What the CA status server publishes, kept current: pre-signed OCSP answers, the CRL, the feed.

:class:`StatusPublisher` holds everything the HTTP resources serve and is the one place every
revocation passes through; :class:`StoreWatcher` polls the store so that revocations made by
``s2sgw ca revoke`` in another process are published within a poll interval."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.ca.monitoring import PublisherCollector
from s2sgw.ca.ocsp import TRY_LATER_ANSWER, Answer, Query, Responder, SerialStatus
from s2sgw.ca.ocsp_multi import answer_each, combine
from s2sgw.ca.responders import Responders
from s2sgw.serials import serial_text
from s2sgw.timeutil import utc


def _read_changes(
    ca: Any, marker: int | None, last_seq: int, crl_number: int | None
) -> tuple[int, list[Any], int, tuple[int, bytes] | None] | None:
    """Thread side of one watcher step: None when nothing changed since ``marker``, else the
    new marker, the revocations since ``last_seq``, the last CRL number taken and a CRL that
    another status server on the same store published above ``crl_number`` (or None)."""
    current = ca.change_marker()
    if current == marker:
        return None
    return current, ca.revocations_since(last_seq), ca.store.crl_number(), ca.store.published_crl(crl_number or 0)


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
    crl_number: int | None = None  # the CRL number of crl_der
    marker: int | None = None
    last_seq: int = 0
    last_poll: float | None = None  # clock seconds of the last successful store poll
    # Called with each batch of revocation records _apply takes in (the revocation feed).
    listeners: list[Callable[[list[Any]], None]] = attrs.field(factory=list)
    feed: Any = None  # the RevocationFeed build_root attached, for health
    root_crl: Any = None  # the RootCRLFile build_root attached: followed on every refresh
    signer_renewal: Any = None  # a SignerRenewal: checked on every refresh
    issuing_reload: Any = None  # an IssuingReload: checked on every refresh

    _statuses: dict[int, SerialStatus] = attrs.field(factory=dict)
    _generation: int = 0
    _poll_failing: bool = False
    _polling: defer.Deferred[None] | None = None
    _poll_again: bool = False
    _crl_busy: bool = False
    _crl_again: bool = False  # asked for while one was being made: make another after it

    _log = Logger()

    def now(self) -> datetime.datetime:
        return utc(self.clock.seconds())

    # -- answering ------------------------------------------------------------------------

    def answer(self, body: bytes) -> Answer | defer.Deferred[Answer]:
        """An Answer at once when the status is in memory, else a Deferred after a store lookup.

        A request about several certificates gets one answer about all of them
        (:mod:`s2sgw.ca.ocsp_multi`).
        """
        each = answer_each(body, self._answer_one)
        if each is None:
            return self._answer_one(body)
        if isinstance(each, Answer):
            return each
        if not any(isinstance(part, defer.Deferred) for part in each):
            return combine(each, self._signers())
        parts = [part if isinstance(part, defer.Deferred) else defer.succeed(part) for part in each]
        return defer.gatherResults(parts).addCallback(lambda answers: combine(answers, self._signers()))

    def _signers(self) -> list[tuple[x509.Certificate, Any]]:
        """Every delegated signer answering now (one per issuing CA)."""
        members = self.responder.members if isinstance(self.responder, Responders) else (self.responder,)
        return [(member.signer_cert, member.signer_key) for member in members]

    def _answer_one(self, body: bytes) -> Answer | defer.Deferred[Answer]:
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
        self._log.failure("status lookup of serial {serial} failed", failure, serial=serial_text(query.serial))
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
        """One watcher step; never fails (a failing store is logged once, then retried).

        Steps never overlap: a poll asked for while one runs (a change notification during a
        timed poll) runs once that one is done, however many were asked for meanwhile.
        """
        if self._polling is not None:
            self._poll_again = True
            return defer.succeed(None)
        if self.marker is None:
            d = self.load()
        else:
            d = self.in_thread(_read_changes, self.ca, self.marker, self.last_seq, self.crl_number)
            d.addCallback(self._changes_read)
        d.addCallbacks(self._poll_ok, self._poll_failed)
        done: defer.Deferred[None] = defer.Deferred()
        self._polling = done

        def finished(_: object) -> None:
            self._polling = None
            if self._poll_again:
                self._poll_again = False
                self.poll().chainDeferred(done)
            else:
                done.callback(None)

        d.addBoth(finished)
        return done

    def _changes_read(
        self, result: tuple[int, list[Any], int, tuple[int, bytes] | None] | None
    ) -> defer.Deferred[None] | None:
        if result is None:
            return None
        marker, revocations, crl_number, published = result
        if published is not None:
            # Another status server on this store signed a newer CRL: serve that one, so every
            # server hands out the same, highest number (a gateway refuses a lower one).
            self._take_crl(published[1], "taken from the store")
        self._apply(marker, revocations)
        if revocations or self._overtaken(crl_number):
            return self.regenerate_crl()
        return None

    def _overtaken(self, crl_number: int) -> bool:
        """True when a CRL numbered above the published one was made elsewhere (``s2sgw ca crl``).

        A gateway that was handed that CRL refuses any lower number as a replay, so the server
        publishes a newer CRL at once rather than at half its lifetime.
        """
        return self.crl_number is not None and crl_number > self.crl_number

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
                "serial {serial} ({name}) revoked: {reason}; {resigned} cached answers re-signed",
                serial=serial_text(record.serial),
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
        if self.root_crl is not None:
            self.root_crl.poll()
        if self.issuing_reload is not None:
            self.issuing_reload.check()
        if self.signer_renewal is not None:
            self.signer_renewal.check()
        if self.crl_this_update is not None and self.crl_next_update is not None:
            half = self.crl_this_update + (self.crl_next_update - self.crl_this_update) / 2
            if self.now() >= half:
                return self.regenerate_crl().addErrback(
                    lambda failure: self._log.failure("CRL regeneration failed", failure)
                )
        return None

    def regenerate_crl(self) -> defer.Deferred[None]:
        if self._crl_busy:
            # The one being made may have read the store before this change: make another.
            self._crl_again = True
            return defer.succeed(None)
        self._crl_busy = True
        self._crl_again = False

        def make() -> bytes:
            crl = self.ca.make_crl(hours=self.crl_hours, now=utc(self.clock.seconds()))
            der = crl.public_bytes(serialization.Encoding.DER)
            self.ca.store.publish_crl(_crl_number(crl), der)  # for the other servers on this store
            return der

        def done(der: bytes) -> None:
            self._take_crl(der, "published")

        def finished(result: object) -> object:
            self._crl_busy = False
            if self._crl_again:
                self.regenerate_crl().addErrback(lambda failure: self._log.failure("CRL regeneration failed", failure))
            return result

        d = self.in_thread(make)
        d.addCallback(done)
        d.addBoth(finished)
        return d

    def _take_crl(self, der: bytes, how: str) -> None:
        """Serve ``der`` unless a CRL with a higher number is served already (never roll back)."""
        crl = x509.load_der_x509_crl(der)
        number = _crl_number(crl)
        if self.crl_number is not None and (number is None or number <= self.crl_number):
            return
        self.crl_der = der
        self.crl_etag = '"' + hashlib.sha256(der).hexdigest()[:32] + '"'
        self.crl_this_update = crl.last_update_utc
        self.crl_next_update = crl.next_update_utc
        self.crl_number = number
        self._log.info(
            "CRL {number} {how}, next update {next_update}",
            number=number,
            how=how,
            next_update=self.crl_next_update.isoformat() if self.crl_next_update else None,
        )

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
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


@attrs.define(eq=False, slots=False)
class StoreWatcher(Service):
    """Loads the publisher, then polls the store and refreshes answers on the injected clock.

    While it runs, the publisher's gauges are in ``registry`` (what ``/metrics`` serves): the same
    pattern as the gateway's services, see :mod:`s2sgw.ca.monitoring`.
    """

    publisher: StatusPublisher
    clock: IReactorTime
    poll_interval: float = 0.25
    refresh_interval: float = 1.0
    registry: CollectorRegistry = REGISTRY
    # A store that pushes its changes (``ICAStore.watch``, PostgreSQL's LISTEN): each one is
    # polled for at once, and the timed poll slows to ``pushed_poll_interval``, a safety net.
    watch: Callable[..., Callable[[], None] | None] | None = None
    call_from_thread: Callable[..., None] | None = None
    pushed_poll_interval: float = 2.0
    _loops: list[task.LoopingCall] = attrs.field(factory=list)
    _collector: PublisherCollector | None = attrs.field(default=None, init=False)
    _stop_watching: Callable[[], None] | None = attrs.field(default=None, init=False)

    _log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        self._collector = PublisherCollector(self.publisher)
        self.registry.register(self._collector)
        poll_interval = self.poll_interval
        if self.watch is not None and self.call_from_thread is not None:
            self._stop_watching = self.watch(self._changed, self._watch_failed)
            if self._stop_watching is not None:
                poll_interval = max(poll_interval, self.pushed_poll_interval)
        # Healthy means "polled lately": lately is relative to how often it polls.
        self.publisher.stale_after = max(self.publisher.stale_after, 3 * poll_interval)
        poll = task.LoopingCall(self.publisher.poll)
        refresh = task.LoopingCall(self.publisher.refresh)
        for loop, interval in ((poll, poll_interval), (refresh, self.refresh_interval)):
            loop.clock = self.clock
            self._loops.append(loop)
            loop.start(interval, now=True).addErrback(
                lambda failure: self._log.failure("store watcher stopped", failure)
            )

    def _changed(self) -> None:
        """From the store's listening thread: a change was committed somewhere."""
        assert self.call_from_thread is not None
        self.call_from_thread(self.publisher.poll)

    def _watch_failed(self, reason: str) -> None:
        assert self.call_from_thread is not None
        self.call_from_thread(
            self._log.warn, "listening for CA store changes failed ({reason}); reconnecting", reason=reason
        )

    def stopService(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        collector, self._collector = self._collector, None
        if collector is not None:
            self.registry.unregister(collector)
        stop, self._stop_watching = self._stop_watching, None
        if stop is not None:
            stop()
        Service.stopService(self)


InThread = Callable[..., defer.Deferred]


def thread_runner(reactor: Any) -> InThread:
    """``in_thread`` for a real reactor: its thread pool."""

    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run
