"""Status changes applied to connections that are already open.

A peer is judged once, at its handshake; a database pool or an AMQP channel may then stay open
for hours. :class:`Enforcer` keeps judging the live ones:

- a pushed revocation (the revocation feed) goes into the status checker, so every new
  handshake with that serial is refused at once, and closes every live connection, inbound or
  outbound, whose peer holds the serial (audit reason ``revoked``);
- re-validation: every ``interval`` seconds the peers of live connections are looked up in the
  status cache; a peer whose cached answer has run out (``nextUpdate`` or ``max_cache_age``)
  is asked about again, and one that is now revoked or unknown is disconnected, as is one the
  CA cannot vouch for under ``fail = "closed"`` (``ca_unreachable``, ``status_invalid``);
  a peer certificate that expires while connected is disconnected (``expired``);
- after a trust reload, live connections whose peer chain no longer verifies against the new
  bundle close (``untrusted_chain``);
- a newer root CRL that revokes an issuing CA closes every live connection whose peer's
  certificate that CA issued (``revoked``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.config import FailMode
from s2sgw.interfaces import IStatusCache, IStatusChecker, Reason
from s2sgw.ops.metrics import MetricSet
from s2sgw.serials import serial_text
from s2sgw.timeutil import utc
from s2sgw.wire.feed import FeedDocument
from s2sgw.wire.ocsp import CertStatus, StatusInvalid, StatusUnavailable, key_hash

if TYPE_CHECKING:
    from s2sgw.routes.gate import Session

UTC = datetime.UTC
_SHA256 = hashes.SHA256()


class LiveCloseMetrics(MetricSet):
    """Live connections the Enforcer closed (registered by the gateway's MetricsService)."""

    def __init__(self) -> None:
        self.closes = Counter(
            "s2sgw_live_closes",
            "Live connections closed because their peer's status changed, by reason and cause "
            "(feed | revalidation | reload | root_crl).",
            ["reason", "cause"],
            registry=None,
        )
        self.members = (self.closes,)



def _gates_of(routes: Any) -> Callable[[], Iterable[Any]]:
    """``gates()`` for a mapping of route name -> InboundListener / OutboundConnector."""
    return lambda: [route.gate for route in routes.values()]


@implementer(IStatusChecker, IStatusCache)
@attrs.define(eq=False)
class PushedRevocations:
    """A checker that answers ``revoked`` for pushed serials and asks ``inner`` otherwise.

    For checkers without a status cache of their own (CRL, off), so a revocation from the feed
    is refused on the next handshake in every mode.
    """

    inner: IStatusChecker
    clock: IReactorTime
    max_entries: int = 100_000
    _revoked: dict[int, CertStatus] = attrs.field(factory=dict, init=False)
    _inner_cache: IStatusCache | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._inner_cache = IStatusCache(self.inner, None)

    # -- IStatusChecker

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> defer.Deferred[CertStatus]:
        pushed = self._revoked.get(leaf.serial_number)
        if pushed is not None:
            return defer.succeed(pushed)
        return self.inner.check(leaf, issuer)

    def close(self) -> defer.Deferred[None]:
        return self.inner.close()

    # -- IStatusCache

    def lookup(self, leaf: x509.Certificate, issuer: x509.Certificate) -> CertStatus | None:
        pushed = self._revoked.get(leaf.serial_number)
        if pushed is not None:
            return pushed
        return self._inner_cache.lookup(leaf, issuer) if self._inner_cache is not None else None

    def revoke(self, serial: int, revoked_at: datetime.datetime | None = None, reason: str | None = None) -> None:
        now = utc(self.clock.seconds())
        self._revoked.pop(serial, None)
        while len(self._revoked) >= self.max_entries:
            del self._revoked[next(iter(self._revoked))]
        self._revoked[serial] = CertStatus("revoked", now, None, revoked_at=revoked_at or now, revocation_reason=reason)


@attrs.define(eq=False)
class Enforcer(Service):
    """Closes live connections whose peer is revoked, no longer vouched for, or untrusted.

    ``gates()`` returns the RouteGates of this process; sessions carry the peer's verified chain
    (``Session.chain``) once authorized. ``verify_chain`` is the trust store's. ``cache`` holds
    the statuses ``checker`` answers from, when it keeps any: re-validation reads it before asking,
    and pushed revocations go into it (without one, re-validation asks ``checker`` every time).
    """

    gates: Callable[[], Iterable[Any]]
    checker: IStatusChecker
    clock: IReactorTime
    fail: FailMode = "closed"
    verify_chain: Callable[[Sequence[x509.Certificate]], bool] | None = None
    interval: float | None = 1.0
    retry: float = 5.0  # seconds before asking again about a peer the CA could not vouch for (fail open)
    metrics: LiveCloseMetrics = attrs.field(factory=LiveCloseMetrics)  # handed over by build_gateway
    cache: IStatusCache | None = None
    closed: int = 0
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _asking: set[tuple[int, bytes]] = attrs.field(factory=set, init=False)
    _not_before: dict[tuple[int, bytes], float] = attrs.field(factory=dict, init=False)

    _log = Logger()

    @classmethod
    def for_routes(cls, routes: Any, checker: IStatusChecker, clock: IReactorTime, **kwargs: Any) -> Enforcer:
        return cls(_gates_of(routes), checker, clock, **kwargs)

    # -- service

    def startService(self) -> None:
        super().startService()
        if self.interval:
            self._loop = LoopingCall(self.revalidate)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda failure: self._log.failure("re-validation of live connections stopped", failure)
            )

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()

    # -- closing

    def _sessions(self) -> list[Session]:
        return [s for gate in self.gates() for s in list(gate.live) if not s.ended]

    def _close(self, sessions: Iterable[Any], reason: str, detail: str, cause: str) -> int:
        """Close ``sessions`` through their gates (RouteGate.close_peers), logging each."""
        doomed = {session for session in sessions if not session.ended}
        if not doomed:
            return 0

        def pick(session: Any) -> bool:
            if session not in doomed:
                return False
            self._log.info(
                "closing {direction} connection on route {route} to {peer} (serial {serial}): {reason}, {detail}",
                direction=session.direction,
                route=session.route,
                peer=session.peer,
                serial=session.serial,
                reason=reason,
                detail=detail,
            )
            return True

        count = sum(gate.close_peers(pick, reason, detail) for gate in self.gates())
        if count:
            self.metrics.closes.labels(reason, cause).inc(count)
            self.closed += count
        return count

    # -- pushed revocations

    def revoked(self, document: FeedDocument) -> int:
        """A feed batch: mark each serial revoked in the cache, close its live connections."""
        by_serial = {}
        for entry in document.revocations:
            by_serial[entry.serial] = entry
            if self.cache is not None:
                self.cache.revoke(entry.serial, entry.revoked_at, entry.reason)
        if not by_serial:
            return 0
        doomed: dict[str, list[Any]] = {}
        for session in self._sessions():
            entry = by_serial.get(_serial_of(session))
            if entry is None:
                continue
            chain = session.chain
            if len(chain) >= 2 and _issuer_hash(chain[1]) != document.issuer_key_hash:
                continue  # same number, another issuer
            detail = f"revoked at {entry.revoked_at.isoformat()} ({entry.reason or 'unspecified'}), from the revocation feed"
            doomed.setdefault(detail, []).append(session)
        return sum(self._close(sessions, Reason.REVOKED, detail, "feed") for detail, sessions in doomed.items())

    # -- revoked issuing CAs

    def issuers_revoked(self, judge: Callable[[x509.Certificate], CertStatus | None]) -> int:
        """A newer root CRL: close live connections whose peer's issuing CA ``judge`` calls revoked
        (``IntermediateCheck.issuer_status``), judging each issuing CA once."""
        verdicts: dict[bytes, CertStatus | None] = {}
        doomed: dict[str, list[Any]] = {}
        for session in self._sessions():
            chain = session.chain
            if len(chain) < 2:
                continue
            issuer = chain[1]
            key = issuer.fingerprint(_SHA256)
            if key not in verdicts:
                try:
                    verdicts[key] = judge(issuer)
                except StatusUnavailable:
                    verdicts[key] = None  # a stale root CRL: re-validation and new handshakes decide
            status = verdicts[key]
            if status is None or status.state != "revoked":
                continue
            when = status.revoked_at.isoformat() if status.revoked_at else "unknown time"
            detail = (
                f"issuing CA serial {serial_text(issuer.serial_number)} revoked at {when} "
                f"({status.revocation_reason or 'unspecified'}), from the root CRL"
            )
            doomed.setdefault(detail, []).append(session)
        return sum(self._close(sessions, Reason.REVOKED, detail, "root_crl") for detail, sessions in doomed.items())

    # -- re-validation

    def revalidate(self) -> None:
        """One pass over the live connections: expired peers close, stale statuses are asked again."""
        now = self.clock.seconds()
        moment = utc(now)
        groups: dict[tuple[int, bytes], list[Any]] = {}
        for session in self._sessions():
            chain = session.chain
            if session.relay is None or len(chain) < 2:
                continue  # not admitted yet: the authorizer is still deciding
            leaf = chain[0]
            if leaf.not_valid_after_utc <= moment:
                self._close([session], Reason.EXPIRED, "the peer's certificate expired while connected", "revalidation")
                continue
            groups.setdefault((leaf.serial_number, _issuer_hash(chain[1])), []).append(session)
        for key, sessions in groups.items():
            if key in self._asking or self._not_before.get(key, 0.0) > now:
                continue
            leaf, issuer = sessions[0].chain[0], sessions[0].chain[1]
            if self.cache is not None:
                status = self.cache.lookup(leaf, issuer)
                if status is not None:
                    if status.state != "good":
                        self._judged(status, key)
                    continue
            self._ask(key, leaf, issuer)
        for key in [k for k, t in self._not_before.items() if t <= now]:
            del self._not_before[key]

    def _ask(self, key: tuple[int, bytes], leaf: x509.Certificate, issuer: x509.Certificate) -> None:
        self._asking.add(key)
        d = defer.maybeDeferred(self.checker.check, leaf, issuer)
        d.addCallbacks(self._judged, self._unjudged, callbackArgs=(key,), errbackArgs=(key,))
        d.addBoth(self._asked, key)

    def _asked(self, result: object, key: tuple[int, bytes]) -> None:
        self._asking.discard(key)
        if isinstance(result, Failure):
            self._log.failure("re-validation of serial {serial} failed", result, serial=serial_text(key[0]))

    def _matching(self, key: tuple[int, bytes]) -> list[Any]:
        serial, issuer_hash = key
        return [
            s
            for s in self._sessions()
            if len(s.chain) >= 2
            and s.chain[0].serial_number == serial
            and _issuer_hash(s.chain[1]) == issuer_hash
        ]

    def _judged(self, status: CertStatus, key: tuple[int, bytes]) -> None:
        if status.state == "good":
            return
        if status.state == "revoked":
            when = status.revoked_at.isoformat() if status.revoked_at else "unknown time"
            detail = f"revoked at {when} ({status.revocation_reason or 'unspecified'}), found on re-validation"
            self._close(self._matching(key), Reason.REVOKED, detail, "revalidation")
        else:
            self._close(
                self._matching(key), Reason.STATUS_UNKNOWN, "the CA no longer knows this certificate", "revalidation"
            )

    def _unjudged(self, failure: Failure, key: tuple[int, bytes]) -> None:
        unavailable = failure.check(StatusUnavailable) is not None
        invalid = failure.check(StatusInvalid) is not None
        if not (unavailable or invalid):
            self._log.failure("re-validation of serial {serial} raised", failure, serial=serial_text(key[0]))
        reason = Reason.CA_UNREACHABLE if unavailable else Reason.STATUS_INVALID
        error = failure.getErrorMessage()
        if self.fail == "open":
            self._not_before[key] = self.clock.seconds() + self.retry
            self._log.warn(
                "re-validation of serial {serial} failed ({reason}: {error}); connections stay open because fail = open",
                serial=serial_text(key[0]),
                reason=reason,
                error=error,
            )
            return
        self._close(self._matching(key), reason, f"re-validation failed: {error}", "revalidation")

    # -- trust reloads

    def trust_reloaded(self, generation: int | None = None) -> int:
        """Close live connections whose peer chain no longer verifies against the current bundle."""
        if self.verify_chain is None:
            return 0
        verdicts: dict[tuple[bytes, ...], bool] = {}
        doomed = []
        for session in self._sessions():
            chain = tuple(session.chain)
            if not chain:
                continue
            key = tuple(c.fingerprint(_SHA256) for c in chain)
            verdict = verdicts.get(key)
            if verdict is None:
                verdict = verdicts[key] = self.verify_chain(list(chain))
            if not verdict:
                doomed.append(session)
        count = self._close(
            doomed, Reason.UNTRUSTED_CHAIN, f"the peer's chain does not verify against trust generation {generation}", "reload"
        )
        if count:
            self._log.warn(
                "trust generation {generation}: closed {count} live connections whose peers are no longer trusted",
                generation=generation,
                count=count,
            )
        return count


_issuer_hashes: dict[int, tuple[x509.Certificate, bytes]] = {}


def _issuer_hash(certificate: x509.Certificate) -> bytes:
    """key_hash, remembered per certificate object (every sweep asks for every live session)."""
    known = _issuer_hashes.get(id(certificate))
    if known is not None and known[0] is certificate:
        return known[1]
    if len(_issuer_hashes) > 10_000:
        _issuer_hashes.clear()
    digest = key_hash(certificate)
    _issuer_hashes[id(certificate)] = (certificate, digest)
    return digest


def _serial_of(session: Session) -> int | None:
    chain = session.chain
    if chain:
        return chain[0].serial_number
    text = session.serial
    try:
        return int(text, 16)
    except (TypeError, ValueError):
        return None

