"""The gateway's reactor: relay sockets without Twisted's per-event logging context, others as before."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.python import context, log

from s2sgw.reactor import DirectEventsReactor
from s2sgw.transport import EagerClient, EagerPort, EagerServer


class _Readable(FileDescriptor):
    """One end of a socket pair that records the legacy logging context of each read."""

    def __init__(self, reactor: DirectEventsReactor, sock: socket.socket, direct: bool) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.direct_events = direct
        self.seen: list[object] = []
        self.fail_on_lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "relay-socket"

    def doRead(self) -> None:
        self.sock.recv(100)
        self.seen.append(context.get(log.ILogContext)["system"])

    def connectionLost(self, reason: object) -> None:
        super().connectionLost(reason)
        if self.fail_on_lost:
            raise RuntimeError("connectionLost went wrong")


_SOCKETS: list[socket.socket] = []


@pytest.fixture
def reactor():
    """A reactor of its own (not installed, never run), its sockets closed afterwards."""
    made = DirectEventsReactor()
    yield made
    made.removeAll()
    made._poller.close()
    while _SOCKETS:
        _SOCKETS.pop().close()


def _readable(reactor: DirectEventsReactor, direct: bool) -> tuple[_Readable, socket.socket]:
    ours, theirs = socket.socketpair()
    _SOCKETS.extend((ours, theirs))
    readable = _Readable(reactor, ours, direct)
    reactor.addReader(readable)
    theirs.send(b"x")
    return readable, theirs


def test_relay_sockets_are_dispatched_without_the_logging_context(reactor):
    """A selectable that declares direct_events reads with no "system" context pushed."""
    readable, theirs = _readable(reactor, direct=True)
    reactor.doPoll(1.0)
    assert readable.seen == ["-"]


def test_other_sockets_keep_twisteds_logging_context(reactor):
    """Every other selectable (admin endpoint, HTTP clients) is dispatched as by Twisted's reactor."""
    readable, theirs = _readable(reactor, direct=False)
    reactor.doPoll(1.0)
    assert readable.seen == ["relay-socket"]


def test_an_error_escaping_a_relay_event_is_logged_and_the_reactor_goes_on(reactor, logged_errors):
    """What Twisted's callWithLogger would catch is still caught and logged with the socket's prefix."""
    logged_errors.expect("connectionLost went wrong")
    readable, theirs = _readable(reactor, direct=True)
    readable.fail_on_lost = True
    theirs.close()  # EOF: doRead reads b"" ... then the close makes _doReadOrWrite disconnect it
    readable.doRead = lambda: readable.sock.recv(100) or "closed"  # type: ignore[method-assign]
    reactor.doPoll(1.0)
    assert [event for event in logged_errors.events if event.get("system") == "relay-socket"]
    assert readable not in reactor.getReaders()
    later, _ = _readable(reactor, direct=True)
    reactor.doPoll(1.0)
    assert later.seen == ["-"]


def test_the_relays_ports_and_connections_declare_direct_events():
    assert EagerPort.direct_events and EagerServer.direct_events and EagerClient.direct_events
