"""The splice: bytes both ways, flow control, half-close, idle timeout, close reasons."""

from __future__ import annotations

import attrs
import pytest
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from s2sgw.interfaces import Reason
from s2sgw.relay import Relay, RelaySide, splice
from tests.tlshelpers import HalfCloseCollector, Wire, pump_all


@attrs.define(eq=False)
class Rig:
    """client <-wire1-> a [relay] b <-wire2-> backend, both sides paused as before a splice."""

    client: HalfCloseCollector
    a: RelaySide
    b: RelaySide
    backend: HalfCloseCollector
    wire1: Wire
    wire2: Wire
    clock: Clock
    closed: list[Relay]
    relay: Relay | None = None

    @classmethod
    def build(cls) -> Rig:
        client, a, b, backend = HalfCloseCollector(), RelaySide(), RelaySide(), HalfCloseCollector()
        wire1, wire2 = Wire(client, a), Wire(b, backend)
        a.transport.pauseProducing()
        b.transport.pauseProducing()
        return cls(client, a, b, backend, wire1, wire2, Clock(), [])

    def splice(self, idle: float | None = 60.0) -> Relay:
        self.relay = splice(self.a, self.b, clock=self.clock, idle_timeout=idle, on_close=self.closed.append)
        return self.relay

    def pump(self) -> None:
        pump_all(self.wire1, self.wire2)


def spliced(idle: float | None = 60.0) -> Rig:
    rig = Rig.build()
    rig.splice(idle)
    return rig


def test_bytes_flow_both_ways_and_are_counted() -> None:
    rig = spliced()
    rig.client.transport.write(b"request")
    rig.pump()
    rig.backend.transport.write(b"response!")
    rig.pump()
    assert bytes(rig.backend.received) == b"request"
    assert bytes(rig.client.received) == b"response!"
    assert rig.relay is not None
    assert (rig.relay.bytes_a_to_b, rig.relay.bytes_b_to_a) == (7, 9)


def test_nothing_moves_before_the_splice_and_early_bytes_go_first_in_order() -> None:
    rig = Rig.build()
    rig.a.transport.resumeProducing()  # as if bytes came with the handshake
    rig.client.transport.write(b"early ")
    rig.pump()
    rig.a.transport.pauseProducing()
    rig.client.transport.write(b"later")
    rig.pump()
    assert rig.backend.received == b""
    rig.splice()
    rig.pump()
    assert bytes(rig.backend.received) == b"early later"


def test_a_slow_consumer_pauses_the_producer_and_memory_stays_bounded() -> None:
    rig = spliced()
    rig.wire2.server.pauseProducing()  # the backend stops reading
    chunk = b"x" * 16384
    for _ in range(256):  # 4 MiB offered by the client
        rig.client.transport.write(chunk)
        rig.pump()
    assert rig.wire1.server.reading_paused, "the relay did not stop reading from the client"
    buffered_in_relay = rig.wire2.client.pending
    assert buffered_in_relay <= rig.wire2.client.buffer_limit + 2 * len(chunk)
    assert rig.wire1.client.pending > 3 * 1024 * 1024  # the rest waits at the sender
    rig.wire2.server.resumeProducing()
    rig.pump()
    assert len(rig.backend.received) == 256 * len(chunk)
    assert not rig.wire1.server.reading_paused


def test_flow_control_works_the_other_way_too() -> None:
    rig = spliced()
    rig.wire1.client.pauseProducing()  # the client stops reading
    for _ in range(64):
        rig.backend.transport.write(b"y" * 16384)
        rig.pump()
    assert rig.wire2.client.reading_paused
    rig.wire1.client.resumeProducing()
    rig.pump()
    assert len(rig.client.received) == 64 * 16384


def test_half_close_from_the_client_still_delivers_the_whole_answer() -> None:
    rig = spliced()
    rig.client.transport.write(b"upload")
    rig.client.transport.loseWriteConnection()
    rig.pump()
    assert rig.backend.eof, "the backend did not see the client's EOF"
    assert rig.backend.lost is None and rig.client.lost is None
    answer = b"a" * 300000
    rig.backend.transport.write(answer)
    rig.backend.transport.loseWriteConnection()
    rig.pump()
    assert bytes(rig.client.received) == answer
    assert rig.client.lost is not None and rig.backend.lost is not None
    assert len(rig.closed) == 1 and rig.closed[0].reason == Reason.PEER_CLOSED


def test_a_half_close_before_the_splice_is_propagated_after_the_early_bytes() -> None:
    rig = Rig.build()
    rig.a.transport.resumeProducing()
    rig.client.transport.write(b"all of it")
    rig.client.transport.loseWriteConnection()
    rig.pump()
    assert rig.backend.received == b"" and not rig.backend.eof
    rig.splice()
    rig.pump()
    assert bytes(rig.backend.received) == b"all of it" and rig.backend.eof


def test_when_one_side_closes_the_other_is_closed_after_its_data_is_flushed() -> None:
    rig = spliced()
    rig.wire1.client.pauseProducing()
    rig.backend.transport.write(b"last words")
    rig.backend.transport.loseConnection()
    rig.pump()
    assert rig.client.lost is None  # still flushing to a paused reader
    rig.wire1.client.resumeProducing()
    rig.pump()
    assert bytes(rig.client.received) == b"last words"
    assert rig.client.lost is not None
    assert len(rig.closed) == 1
    assert rig.closed[0].reason == Reason.PEER_CLOSED and rig.closed[0].closed_by == "b"


def test_an_idle_relay_is_aborted_after_the_idle_timeout() -> None:
    rig = spliced(idle=30.0)
    rig.clock.advance(20)
    rig.client.transport.write(b"still here")
    rig.pump()
    rig.clock.advance(20)  # 40s since the start, 20s since the last byte
    rig.pump()
    assert rig.closed == []
    rig.clock.advance(10)
    rig.pump()
    assert rig.wire1.server.aborted and rig.wire2.client.aborted
    assert len(rig.closed) == 1 and rig.closed[0].reason == Reason.IDLE_TIMEOUT
    assert not rig.clock.getDelayedCalls()


def test_abort_records_the_reason_and_calls_on_close_once() -> None:
    rig = spliced()
    assert rig.relay is not None
    rig.relay.abort(Reason.SHUTDOWN)
    rig.relay.abort(Reason.IDLE_TIMEOUT)
    rig.pump()
    assert [r.reason for r in rig.closed] == [Reason.SHUTDOWN]


def test_no_idle_timer_when_disabled() -> None:
    rig = spliced(idle=None)
    assert not rig.clock.getDelayedCalls()
    rig.client.transport.loseConnection()
    rig.pump()
    assert len(rig.closed) == 1




def test_a_side_that_never_reads_is_aborted_after_the_close_grace() -> None:
    """The client vanished; the backend stopped reading: its unflushed bytes are dropped after the grace."""
    rig = spliced(idle=None)
    rig.wire2.server.pauseProducing()  # the backend never reads
    rig.client.transport.write(b"z" * 262144)
    rig.pump()
    rig.client.transport.abortConnection()
    rig.pump()
    assert rig.backend.lost is None and rig.closed == []
    assert rig.relay is not None
    rig.clock.advance(rig.relay.close_grace)
    rig.pump()
    assert rig.wire2.client.aborted
    assert len(rig.closed) == 1 and rig.closed[0].reason == Reason.PEER_CLOSED
    assert not rig.clock.getDelayedCalls()


def test_a_tls_failure_on_a_live_connection_is_recorded_as_tls_error() -> None:
    """A connection lost with an OpenSSL error (e.g. a refused renegotiation) is not an ordinary close."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure

    rig = spliced()
    rig.a.connectionLost(Failure(SSL.Error([("SSL routines", "", "no renegotiation")])))
    rig.pump()
    assert rig.relay is not None and rig.relay.reason == Reason.TLS_ERROR


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (SSL.Error([("SSL routines", "", "no renegotiation")]), "no renegotiation"),
        (SSL.Error([]), "Error without details from OpenSSL"),
    ],
)
def test_a_tls_failure_on_a_live_connection_says_what_failed(error: Exception, words: str) -> None:
    """The relay keeps OpenSSL's words for the audit line, and never leaves them empty."""
    rig = spliced()
    rig.a.connectionLost(Failure(error))
    rig.pump()
    assert rig.relay is not None and (rig.relay.reason, rig.relay.detail) == (Reason.TLS_ERROR, words)
