"""Splice two connected protocols: bytes each way, flow control, half-close, idle timeout.

Each connection of a relay is a :class:`RelaySide` protocol. Before :func:`splice` joins two
sides, a side keeps what it receives (reading is paused, so this is at most one read) and
remembers an early half-close; after it, every read becomes exactly one write to the other side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.handshake import failure_words
from s2sgw.interfaces import Reason


@implementer(IPushProducer)
@attrs.define(eq=False)
class _Pauser:
    """The producer one side registers on the other's transport: pause/resume its reading.

    ``stopProducing`` is deliberately inert: a transport calls it when it loses its connection,
    and the relay then closes the other side itself, gracefully (flushing what is buffered and,
    over TLS, sending ``close_notify``), instead of the raw TCP close stopProducing would do.
    """

    transport: Any

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class RelaySide(Protocol):
    """One connection of a relay; subclasses add handshake and authorization steps."""

    relay: Relay | None = None
    bytes_received = 0
    read_closed = False  # the peer shut its write side (or the connection is gone)
    lost = False
    lost_reason: Failure | None = None
    _has_producer = False
    _sink: Callable[[bytes], None] | None = None
    _last: Callable[[], float] | None = None

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._pending.append(data)
            return
        self.bytes_received += len(data)
        self.relay.last_activity = self._last()  # type: ignore[union-attr,misc]
        sink(data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        if self.relay is not None:
            self.relay._read_closed(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.read_closed = True
        self.lost_reason = reason
        self._sink = None
        if self.relay is not None:
            self.relay._side_lost(self)
        else:
            self.lost_before_splice(reason)

    def lost_before_splice(self, reason: Failure) -> None:
        """Hook for subclasses: the connection ended before it was spliced."""

    def _take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        return pending


def _connected(side: RelaySide) -> bool:
    return not side.lost and side.transport is not None


@attrs.define(eq=False)
class Relay:
    """Two spliced sides: ``a`` is the accepted connection, ``b`` the one we dialed."""

    _log = Logger()

    a: RelaySide
    b: RelaySide
    clock: IReactorTime
    idle_timeout: float | None
    on_close: Callable[[Relay], object]
    started: float = 0.0
    last_activity: float = 0.0
    reason: str | None = None  # why it closed: a Reason code
    detail: str = ""  # words for the audit line (a TLS error says what OpenSSL said)
    closed_by: str | None = None  # "a" | "b" | None (timeout, shutdown)
    finished: bool = False
    close_grace: float = 10.0  # after one side is gone, how long the other may take to flush
    b_closed: str = Reason.PEER_CLOSED  # the reason when ``b`` ends first (inbound: backend_closed)
    _idle_call: IDelayedCall | None = None
    _grace_call: IDelayedCall | None = None
    _ended_first: RelaySide | None = None  # the side whose end (EOF or close) came first

    @property
    def bytes_a_to_b(self) -> int:
        return self.a.bytes_received

    @property
    def bytes_b_to_a(self) -> int:
        return self.b.bytes_received

    def _start(self, a_sink: Callable[[bytes], None] | None = None) -> None:
        a, b = self.a, self.b
        self.started = self.last_activity = self.clock.seconds()
        a.relay = b.relay = self
        a._last = b._last = self.clock.seconds
        a.transport.registerProducer(_Pauser(b.transport), True)
        b.transport.registerProducer(_Pauser(a.transport), True)
        a._has_producer = b._has_producer = True
        for side, other in ((a, b), (b, a)):
            pending = side._take_pending()
            side._sink = a_sink if side is a and a_sink is not None else other.transport.write
            for data in pending:
                side.dataReceived(data)
        if self.idle_timeout:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._check_idle)
        # An early half-close (before the splice) is propagated now that the data went first.
        for side in (a, b):
            if side.read_closed and not self.finished:
                self._read_closed(side)
        for side in (a, b):
            if _connected(side):
                side.transport.resumeProducing()

    def _other(self, side: RelaySide) -> RelaySide:
        return self.b if side is self.a else self.a

    def _ordinary_close(self, side: RelaySide) -> str:
        """The reason for an ordinary end: named after the side that ended first."""
        if self._ended_first is None:
            self._ended_first = side
        return self.b_closed if self._ended_first is self.b else Reason.PEER_CLOSED

    def _read_closed(self, side: RelaySide) -> None:
        other = self._other(side)
        reason = self._ordinary_close(side)
        if other.read_closed:
            self._close_both(reason, None)
            return
        if _connected(other):
            shut = getattr(other.transport, "loseWriteConnection", None)
            if shut is not None:
                shut()
            else:  # a transport that cannot half-close
                self._close_gracefully(other)

    def _side_lost(self, side: RelaySide) -> None:
        if self.reason is None:
            # A TLS failure on a live connection (a renegotiation attempt, a bad record) is not
            # an ordinary close.
            failed_tls = side.lost_reason is not None and side.lost_reason.check(SSL.Error)
            self.reason = Reason.TLS_ERROR if failed_tls else self._ordinary_close(side)
            if failed_tls:
                self.detail = failure_words(side.lost_reason)
            self.closed_by = "a" if side is self.a else "b"
        other = self._other(side)
        if _connected(other):
            self._close_gracefully(other)
            # A peer that never reads would hold the flush (and its buffer) forever.
            if self._grace_call is None:
                self._grace_call = self.clock.callLater(self.close_grace, self._abort_remaining)
        self._maybe_finish()

    def _abort_remaining(self) -> None:
        self._grace_call = None
        for side in (self.a, self.b):
            if _connected(side):
                side.transport.abortConnection()

    def _close_gracefully(self, side: RelaySide) -> None:
        # A transport with a registered producer never closes: unregister first.
        if side._has_producer:
            side._has_producer = False
            side.transport.unregisterProducer()
        side.transport.loseConnection()

    def _close_both(self, reason: str, closed_by: str | None) -> None:
        if self.reason is None:
            self.reason = reason
            self.closed_by = closed_by
        for side in (self.a, self.b):
            if _connected(side):
                self._close_gracefully(side)

    def close(self, reason: str) -> None:
        """Close both sides after flushing what is buffered."""
        self._close_both(reason, None)

    def abort(self, reason: str) -> None:
        """Drop both sides now (idle timeout, end of a drain)."""
        if self.reason is None:
            self.reason = reason
        for side in (self.a, self.b):
            if _connected(side):
                side.transport.abortConnection()

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.finished:
            return
        assert self.idle_timeout is not None
        quiet = self.clock.seconds() - self.last_activity
        if quiet >= self.idle_timeout:
            self._log.info("relay idle for {quiet:.1f}s, closing", quiet=quiet)
            self.abort(Reason.IDLE_TIMEOUT)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout - quiet, self._check_idle)

    def _maybe_finish(self) -> None:
        if self.finished or not (self.a.lost and self.b.lost):
            return
        self.finished = True
        for call in (self._idle_call, self._grace_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._grace_call = None
        self.on_close(self)


def splice(
    a: RelaySide,
    b: RelaySide,
    *,
    clock: IReactorTime,
    idle_timeout: float | None,
    on_close: Callable[[Relay], object] = lambda relay: None,
    a_sink: Callable[[bytes], None] | None = None,
    b_closed: str = Reason.PEER_CLOSED,
) -> Relay:
    """Join two connected sides; both must have paused reading until now (this resumes them).

    ``on_close`` is called once, after both connections are gone. ``a_sink``, if given, receives
    ``a``'s bytes instead of ``b``'s transport (an identity layer that rewrites them on the way).
    ``b_closed`` is the reason recorded when ``b``'s connection ends first.
    """
    relay = Relay(a, b, clock, idle_timeout, on_close, b_closed=b_closed)
    relay._start(a_sink)
    return relay
