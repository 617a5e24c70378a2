"""ReloadService: SIGHUP and timed reloads are scheduled on the reactor and coalesce."""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from s2sgw.config import ConfigError
from s2sgw.reload import ReloadService


class ReactorDouble(Clock):
    """A Clock that also records callFromThread, as the signal handler uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list = []

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.from_thread.append((f, args, kwargs))

    def run_from_thread(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


class StoreDouble:
    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def reload(self) -> Deferred:
        d = Deferred()
        self.pending.append(d)
        return d


def test_sighup_schedules_a_reload_on_the_reactor() -> None:
    """The signal handler does nothing but schedule; the reload starts on the reactor."""
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert store.pending == []
        reactor.run_from_thread()
        assert len(store.pending) == 1
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) is not service._on_sighup


def test_reloads_during_a_reload_coalesce_into_one_more() -> None:
    """Three requests while one reload runs lead to exactly one further reload."""
    reactor, store = ReactorDouble(), StoreDouble()
    generations: list[int] = []
    service = ReloadService(store.reload, reactor, install_signal=False, on_reloaded=generations.append)
    service.startService()
    service.request_reload()
    for _ in range(3):
        service.request_reload()
    assert len(store.pending) == 1
    store.pending[0].callback(2)
    assert len(store.pending) == 2
    store.pending[1].callback(3)
    assert generations == [2, 3]
    assert len(store.pending) == 2
    service.stopService()


def test_failed_reload_is_logged_and_later_reloads_still_run() -> None:
    """A failing reload keeps the service usable for the next request."""
    reactor = ReactorDouble()
    calls: list[str] = []

    def reload() -> Deferred:
        calls.append("reload")
        return fail(ConfigError("bundle.pem: truncated PEM"))

    service = ReloadService(reload, reactor, install_signal=False)
    service.startService()
    service.request_reload()
    service.request_reload()
    assert calls == ["reload", "reload"]
    service.stopService()


def test_timed_reload_runs_every_interval() -> None:
    """reload_interval reloads without a signal."""
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, interval=30.0, install_signal=False)
    service.startService()
    reactor.advance(29)
    assert store.pending == []
    reactor.advance(1)
    assert len(store.pending) == 1
    store.pending[0].callback(2)
    reactor.advance(30)
    assert len(store.pending) == 2
    store.pending[1].callback(3)
    service.stopService()


def test_reload_requested_during_shutdown_is_ignored() -> None:
    """After stopService a SIGHUP-triggered request does not start a reload."""
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, install_signal=False)
    service.startService()
    service.stopService()
    service.request_reload()
    assert store.pending == []


def test_coalesced_calls_during_a_run_share_exactly_one_more_run() -> None:
    """The one coalescing rule of reloads: N calls during a run cause one more run, and every
    caller hears the outcome of the run that covers its call."""
    from s2sgw.reload import Coalesced

    runs: list[Deferred] = []

    def work() -> Deferred:
        runs.append(Deferred())
        return runs[-1]

    coalesced = Coalesced(work)
    first = coalesced()
    later = [coalesced() for _ in range(3)]
    idle = coalesced.idle()
    assert len(runs) == 1
    runs[0].callback(1)
    assert first.result == 1 and len(runs) == 2 and not idle.called
    runs[1].callback(2)
    assert [d.result for d in later] == [2, 2, 2]
    assert idle.called and coalesced.idle().called


def test_reload_now_waits_for_a_reload_that_starts_after_the_request() -> None:
    """Files written before reload_now are read by the reload it fires for, not by one already running."""
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, install_signal=False)
    service.startService()
    service.request_reload()  # already running when the caller wrote its files
    outcome: list = []
    service.reload_now().addBoth(outcome.append)
    store.pending[0].callback(2)
    assert outcome == [] and len(store.pending) == 2
    store.pending[1].callback(3)
    assert outcome == [3]
    service.stopService()


def test_reload_now_shares_one_run_and_reports_its_failure() -> None:
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, install_signal=False)
    service.startService()
    first: list = []
    second: list = []
    service.reload_now().addBoth(first.append)
    service.reload_now().addBoth(second.append)
    store.pending[0].errback(ConfigError("orders.key: key does not match"))
    assert len(store.pending) == 2  # the second request was made while the first ran
    assert first[0].check(ConfigError)
    store.pending[1].callback(2)
    assert second == [2]
    service.stopService()


def test_reload_now_during_shutdown_fails_at_once() -> None:
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, install_signal=False)
    service.startService()
    service.stopService()
    outcome: list = []
    service.reload_now().addBoth(outcome.append)
    assert store.pending == [] and "shutting down" in outcome[0].getErrorMessage()


def test_a_cancelled_reload_now_does_not_break_the_reload() -> None:
    reactor, store = ReactorDouble(), StoreDouble()
    service = ReloadService(store.reload, reactor, install_signal=False)
    service.startService()
    waiting = service.reload_now()
    waiting.addErrback(lambda failure: None)
    waiting.cancel()
    store.pending[0].callback(2)
    service.reload_now()
    assert len(store.pending) == 2
    store.pending[1].callback(3)
    service.stopService()
