"""The one HTTP client builder of the status clients: each keeps its own pool settings.

The Agent's pool and connect timeout are read through treq's and Twisted's private attributes
(``_agent``, ``_pool``, ``_endpointFactory``): the settings are the point of these tests.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import HTTPConnectionPool

from s2sgw.status.crl_refresh import CRLRefreshService
from s2sgw.status.feed import FeedSubscriber
from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.wire.http import http_client


def test_a_client_gets_a_pool_of_its_own_with_twisteds_defaults_unless_told() -> None:
    reactor = MemoryReactorClock()
    (client, first), (_, second) = http_client(reactor), http_client(reactor)
    assert first is not second and client._agent._pool is first
    assert first.persistent and first.maxPersistentPerHost == HTTPConnectionPool.maxPersistentPerHost
    assert client._agent._endpointFactory._connectTimeout is None
    client, pool = http_client(reactor, persistent=False, max_per_host=3, connect_timeout=7.0)
    assert not pool.persistent and pool.maxPersistentPerHost == 3
    assert client._agent._endpointFactory._connectTimeout == 7.0


def test_the_ocsp_checker_keeps_up_to_four_connections_to_the_ca() -> None:
    checker = OCSPStatusChecker("http://ca.test/ocsp", MemoryReactorClock())
    assert checker.http._agent._pool is checker._pool
    assert checker._pool.persistent and checker._pool.maxPersistentPerHost == 4
    assert checker.http._agent._endpointFactory._connectTimeout is None


def test_the_feed_subscriber_keeps_one_connection_for_its_long_poll() -> None:
    subscriber = FeedSubscriber(
        "http://ca.test/revocations", MemoryReactorClock(), lambda: (), lambda d: None, connect_timeout=3.0
    )
    assert subscriber.http._agent._pool is subscriber._pool
    assert subscriber._pool.persistent and subscriber._pool.maxPersistentPerHost == 1
    assert subscriber.http._agent._endpointFactory._connectTimeout == 3.0


def test_the_crl_refresh_opens_a_connection_per_fetch() -> None:
    reactor = MemoryReactorClock()
    refresher = CRLRefreshService(store=None, reload=lambda: None, reactor=reactor, interval=60.0)  # type: ignore[arg-type]
    assert not refresher.http._agent._pool.persistent  # nothing kept open between fetches
    assert refresher.http._agent._endpointFactory._connectTimeout is None


def test_a_request_lost_on_a_stale_connection_is_sent_once_more_and_nothing_else_is() -> None:
    from twisted.internet import defer
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    from s2sgw.wire.http import retry_on_fresh

    stale = ResponseNeverReceived([Failure(ConnectionDone())])
    calls: list[str] = []

    def attempt(name: str, outcome):
        def run():
            calls.append(name)
            return defer.fail(outcome) if isinstance(outcome, Exception) else defer.succeed(outcome)

        return run

    results: list = []
    retry_on_fresh(attempt("kept-alive", stale), attempt("fresh", "answer")).addCallback(results.append)
    assert (calls, results) == (["kept-alive", "fresh"], ["answer"])

    calls.clear()
    errors: list = []
    d = retry_on_fresh(attempt("kept-alive", ValueError("refused")), attempt("fresh", "answer"))
    d.addErrback(errors.append)
    assert calls == ["kept-alive"] and errors[0].check(ValueError)

    calls.clear()
    pending: defer.Deferred = defer.Deferred()
    d = retry_on_fresh(lambda: pending, attempt("fresh", "answer"))
    d.cancel()
    errors.clear()
    d.addErrback(errors.append)
    assert calls == [] and errors[0].check(defer.CancelledError)
