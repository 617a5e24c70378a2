"""Trust reloads: on SIGHUP and on a timer, coalesced, never during shutdown.

The signal handler only schedules work on the reactor; the trust store does the loading off the
reactor and swaps atomically, or keeps the old material and says why.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.errors import S2sgwError


class ReloadRefused(S2sgwError):
    """A reload was asked for while the gateway shuts down."""


@attrs.define(eq=False)
class ReloadService(Service):
    """Reload the trust store on SIGHUP and every ``interval`` seconds (if set).

    ``reload`` is the store's ``reload`` (-> Deferred[int]). Reloads requested while one runs
    coalesce into one more run after it; requests after stopService are ignored.
    ``reload_now`` is the same request for code that must know when its files are in force.
    """

    reload: Callable[[], Deferred]
    reactor: Any
    interval: float | None = None
    install_signal: bool = True
    on_reloaded: Callable[[int], None] | None = None
    _log = Logger()

    _running_reload: Deferred | None = attrs.field(default=None, init=False)
    _again: bool = attrs.field(default=False, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _previous_handler: Any = attrs.field(default=None, init=False)
    _timer: LoopingCall | None = attrs.field(default=None, init=False)
    _waiting: list[Deferred] = attrs.field(factory=list, init=False)  # for the next run to start

    def startService(self) -> None:
        super().startService()
        self._draining = False
        if self.install_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.interval:
            self._timer = LoopingCall(self.request_reload)
            self._timer.clock = self.reactor
            self._timer.start(self.interval, now=False)

    def stopService(self) -> Deferred | None:
        self._draining = True
        if self.install_signal and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        super().stopService()
        return self._running_reload or succeed(None)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.request_reload)

    def request_reload(self) -> None:
        """Start a reload now, or once more after the one in progress."""
        if self._draining:
            self._log.info("reload ignored: shutting down")
            self._release(Failure(ReloadRefused("the gateway is shutting down")))
            return
        if self._running_reload is not None:
            self._again = True
            return
        self._log.info("reloading trust material")
        waiters, self._waiting = self._waiting, []
        self._running_reload = self.reload()
        self._running_reload.addCallbacks(self._reloaded, self._failed)
        self._running_reload.addBoth(self._finished, waiters)

    def reload_now(self) -> Deferred[int]:
        """Request a reload like SIGHUP does; fire with the generation of the first reload that
        starts after this call (so it reads files written before it), or its failure."""
        waiter: Deferred[int] = Deferred()
        self._waiting.append(waiter)
        self.request_reload()
        return waiter

    def _reloaded(self, generation: int) -> int:
        self._log.info("reload done: trust generation {generation}", generation=generation)
        if self.on_reloaded is not None:
            self.on_reloaded(generation)
        return generation

    def _failed(self, failure: Failure) -> Failure:
        # The store kept its old material; this is an operator's problem, not a crash.
        self._log.warn("reload failed, keeping the old trust material: {error}", error=failure.getErrorMessage())
        return failure

    def _finished(self, outcome: int | Failure, waiters: list[Deferred]) -> None:
        self._running_reload = None
        for waiter in waiters:
            if waiter.called:  # cancelled meanwhile
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
        if self._again:
            self._again = False
            self.request_reload()

    def _release(self, failure: Failure) -> None:
        waiters, self._waiting = self._waiting, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(failure)
