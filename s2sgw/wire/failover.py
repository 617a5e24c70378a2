"""Several servers for one job (status replicas, feeds, CRLs, EST), used in order.

Requests go to the server in use, the first listed while it works. A connection error or a
timeout there moves the gateway to the next one (the request itself is tried there too, so a
caller's query is not lost to a dead server), and from then on a background check asks the
first server every ``recheck`` seconds whether it accepts connections again; when it does, the
gateway goes back to it. Callers' queries are never spent on finding out.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.wire.http import HTTPStatusError, ResponseTooLarge

_T = TypeVar("_T")

DEFAULT_RECHECK = 5.0  # seconds between checks that the first server is back


def another_server_might_answer(failure: Failure, *servers_word: type[BaseException]) -> bool:
    """The ``switch`` of :meth:`Failover.request` for HTTP fetches: connection errors, timeouts
    and 5xx answers move to the next server; a cancel, an answer too large, a 4xx answer and
    ``servers_word`` (an answer that does not verify) do not: the next server would say the same."""
    if failure.check(defer.CancelledError, ResponseTooLarge):
        return False
    if failure.check(HTTPStatusError):
        return failure.value.code >= 500
    return not servers_word or failure.check(*servers_word) is None


@attrs.define(eq=False)
class Failover:
    """Which of ``urls`` is in use, moving on failures and back when the first recovers.

    ``reactor`` gives time and, for the default check, TCP connections; ``probe(url)`` fires
    when the server at ``url`` is reachable (default: it accepts a TCP connection).
    """

    urls: tuple[str, ...]
    reactor: Any
    probe: Callable[[str], Deferred[object]] | None = None
    recheck: float = DEFAULT_RECHECK
    label: str = "server"
    failovers: int = 0  # moves away from a failing server
    _index: int = attrs.field(default=0, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _probing: Deferred[object] | None = attrs.field(default=None, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a failover needs at least one URL")

    @property
    def current(self) -> str:
        """The URL in use."""
        return self.urls[self._index]

    def candidates(self) -> tuple[str, ...]:
        """Every URL once, the one in use first, then the ones after it in the listed order."""
        return self.urls[self._index :] + self.urls[: self._index]

    def failed(self, url: str, error: str) -> None:
        """``url`` failed with a connection error or a timeout: move on if it is the one in use."""
        if len(self.urls) == 1 or url != self.current:
            return
        self._index = (self._index + 1) % len(self.urls)
        self.failovers += 1
        self._log.warn(
            "{label} {url} failed ({error}); using {next}", label=self.label, url=url, error=error, next=self.current
        )
        self._schedule()

    def request(self, work: Callable[[str], Deferred[_T]], switch: Callable[[Failure], bool]) -> Deferred[_T]:
        """``work(url)`` on the server in use and, while it fails in a way ``switch`` accepts,
        on each following server once; the last failure if none answers.

        Cancelling the result cancels the attempt that runs and starts no other.
        """
        state: dict[str, Any] = {"cancelled": False, "running": None}

        def cancel(_: Deferred[_T]) -> None:
            state["cancelled"] = True
            if state["running"] is not None:
                state["running"].cancel()

        result: Deferred[_T] = Deferred(cancel)
        remaining = list(self.candidates())

        def attempt() -> None:
            url = remaining.pop(0)
            state["running"] = running = defer.maybeDeferred(work, url)
            running.addCallbacks(answered, failed, errbackArgs=(url,))

        def answered(value: _T) -> None:
            if not result.called:
                result.callback(value)

        def failed(failure: Failure, url: str) -> None:
            if state["cancelled"] or result.called:
                return
            if not switch(failure):
                result.errback(failure)
                return
            self.failed(url, failure.getErrorMessage())
            if not remaining:
                result.errback(failure)
                return
            attempt()

        attempt()
        return result

    def status(self) -> dict[str, Any]:
        """For ``/status``: the URLs, which one is in use, how often it moved."""
        return {"urls": list(self.urls), "in_use": self.current, "failovers": self.failovers}

    def stop(self) -> None:
        """Stop checking whether the first server is back (a service's stopService)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    # -- coming back

    def _schedule(self) -> None:
        if self._index == 0 or self._timer is not None or self._probing is not None:
            return
        self._timer = self.reactor.callLater(self.recheck, self._check_first)

    def _check_first(self) -> None:
        self._timer = None
        first = self.urls[0]
        probe = self.probe if self.probe is not None else self._connects
        self._probing = probing = defer.maybeDeferred(probe, first)
        probing.addCallbacks(self._recovered, self._still_down)

    def _recovered(self, _: object) -> None:
        self._probing = None
        if self._index != 0:
            self._log.info("{label} {url} is back; using it again", label=self.label, url=self.urls[0])
            self._index = 0

    def _still_down(self, failure: Failure) -> None:
        self._probing = None
        if not failure.check(defer.CancelledError):
            self._schedule()

    def _connects(self, url: str) -> Deferred[object]:
        """Fires when the server of ``url`` accepts a TCP connection (closed at once)."""
        from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        endpoint = HostnameEndpoint(self.reactor, parts.hostname or "", port, timeout=self.recheck)
        connecting = connectProtocol(endpoint, Protocol())
        connecting.addCallback(lambda protocol: protocol.transport.loseConnection())
        return connecting
