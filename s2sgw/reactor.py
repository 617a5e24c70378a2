"""The gateway's reactor: Twisted's epoll reactor, minus the logging context around relay events.

Why: for every socket event, Twisted's reactors call ``log.callWithLogger(selectable, ...)``,
which asks the selectable for its ``logPrefix()`` and pushes ``{"system": prefix}`` on the legacy
logging context (a thread-local look-up, a list push and pop, three extra Python frames) so that
legacy ``log.msg`` calls made while handling the event carry that prefix. The relay's own
sockets log through ``twisted.logger`` with explicit keys and never read that context, and on
the small-request path it was about a tenth of the gateway's samples (docs/benchmarks.rst).

:class:`DirectEventsReactor` dispatches events of selectables that declare
``direct_events = True`` (the relay's ports and connections in :mod:`s2sgw.transport`) straight
to ``_doReadOrWrite``, which already catches and logs what ``doRead``/``doWrite`` raise; every
other selectable (the admin endpoint, treq's HTTP clients, the waker) keeps Twisted's path.
Nothing is patched: the class is a subclass, installed only where s2sgw chooses the reactor
(``twistd s2sgw`` when no ``--reactor`` was given, and every worker process). ``doPoll`` mirrors
``EPollReactor.doPoll`` of Twisted 26.x (tested in tests/test_reactor.py).
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log


class DirectEventsReactor(EPollReactor):
    """``EPollReactor`` whose relay selectables are dispatched without ``callWithLogger``."""

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if getattr(selectable, "direct_events", False):
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=_prefix(selectable))
            else:
                log.callWithLogger(selectable, dispatch, selectable, fd, event)

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


def install() -> DirectEventsReactor:
    """Install :class:`DirectEventsReactor` as the global reactor (before anything imports one)."""
    from twisted.internet.main import installReactor

    reactor = DirectEventsReactor()
    installReactor(reactor)
    return reactor


def current_or_install() -> Any:
    """The global reactor: ours if none is installed yet, else whichever one is (``--reactor``)."""
    if "twisted.internet.reactor" not in sys.modules:
        return install()
    from twisted.internet import reactor

    return reactor
