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
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from s2sgw.errors import S2sgwError


class ReloadRefused(S2sgwError):
    """A reload was asked for while the gateway shuts down."""
from twisted.python.failure import Failure


@attrs.define(eq=False)
class Coalesced:
    """Run ``work`` at most once at a time; calls made while it runs share one more run after it.

    Every call gets its own Deferred with the outcome of the run that covers it, so a change
    made during a run (a file rewritten, a signal) is never missed and never reloaded twice.
    """

    work: Callable[[], Deferred[Any]]
    _running: Deferred[Any] | None = attrs.field(default=None, init=False)
    _next: list[Deferred[Any]] = attrs.field(factory=list, init=False)
    _idle: list[Deferred[None]] = attrs.field(factory=list, init=False)

    def __call__(self) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        if self._running is None:
            self._start([result])
        else:
            self._next.append(result)
        return result

    def idle(self) -> Deferred[None]:
        """Fires once no run is in progress or queued (at once if none is)."""
        if self._running is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def _start(self, waiters: list[Deferred[Any]]) -> None:
        self._running = maybeDeferred(self.work)
        self._running.addBoth(self._finished, waiters)

    def _finished(self, outcome: object, waiters: list[Deferred[Any]]) -> None:
        self._running = None
        if self._next:
            next_waiters, self._next = self._next, []
            self._start(next_waiters)
        for waiter in waiters:
            if waiter.called:  # cancelled meanwhile
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
        if self._running is None:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)


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

    _runs: Coalesced = attrs.field(init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _previous_handler: Any = attrs.field(default=None, init=False)
    _timer: LoopingCall | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._runs = Coalesced(self._run_once)

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
        return self._runs.idle()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.request_reload)

    def request_reload(self) -> None:
        """Start a reload now, or once more after the one in progress."""
        if self._draining:
            self._log.info("reload ignored: shutting down")
            return
        self._runs().addErrback(lambda _: None)  # each run logs its own outcome

    def reload_now(self) -> Deferred[int]:
        """Request a reload like SIGHUP does; fire with the generation of the first reload that
        starts after this call (so it reads files written before it), or its failure."""
        if self._draining:
            self._log.info("reload ignored: shutting down")
            return fail(ReloadRefused("the gateway is shutting down"))
        return self._runs()

    def _run_once(self) -> Deferred:
        self._log.info("reloading trust material")
        run = self.reload()
        return run.addCallbacks(self._reloaded, self._failed)

    def _reloaded(self, generation: int) -> int:
        self._log.info("reload done: trust generation {generation}", generation=generation)
        if self.on_reloaded is not None:
            self.on_reloaded(generation)
        return generation

    def _failed(self, failure: Failure) -> Failure:
        # The store kept its old material; this is an operator's problem, not a crash.
        self._log.warn("reload failed, keeping the old trust material: {error}", error=failure.getErrorMessage())
        return failure
