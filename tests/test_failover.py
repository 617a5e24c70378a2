"""Several servers for one job: move on connection errors and timeouts, come back when the first
recovers (checked in the background, never with a caller's query)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from s2sgw.wire.failover import Failover

A, B, C = "http://a:8080/ocsp", "http://b:8080/ocsp", "http://c:8080/ocsp"


class Servers:
    """Which servers are down; ``work`` answers with the URL asked, or fails like a dead server."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.asked: list[str] = []
        self.probed: list[str] = []

    def work(self, url: str) -> defer.Deferred[str]:
        self.asked.append(url)
        if url in self.down:
            return defer.fail(ConnectionRefusedError(url))
        return defer.succeed(url)

    def probe(self, url: str) -> defer.Deferred[object]:
        self.probed.append(url)
        return self.work(url)


def _always(_: Failure) -> bool:
    return True


def _result(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


@pytest.fixture
def rig() -> tuple[Failover, Servers, Clock]:
    servers, clock = Servers(), Clock()
    return Failover((A, B, C), clock, probe=servers.probe, recheck=5.0), servers, clock


def test_the_first_server_is_used_while_it_answers(rig) -> None:
    failover, servers, _ = rig
    assert [_result(failover.request(servers.work, _always)) for _ in range(3)] == [A, A, A]
    assert servers.asked == [A, A, A] and failover.status() == {"urls": [A, B, C], "in_use": A, "failovers": 0}


def test_a_query_the_first_server_fails_is_answered_by_the_next_which_stays_in_use(rig) -> None:
    failover, servers, _ = rig
    servers.down = {A}
    assert _result(failover.request(servers.work, _always)) == B
    assert _result(failover.request(servers.work, _always)) == B
    assert servers.asked == [A, B, B]
    assert failover.status() == {"urls": [A, B, C], "in_use": B, "failovers": 1}


def test_every_server_is_tried_once_then_the_last_failure_is_the_answer(rig) -> None:
    failover, servers, _ = rig
    servers.down = {A, B, C}
    outcome = _result(failover.request(servers.work, _always))
    assert isinstance(outcome, Failure) and outcome.check(ConnectionRefusedError)
    assert servers.asked == [A, B, C]


def test_a_failure_the_caller_does_not_switch_on_stays_with_the_server(rig) -> None:
    failover, servers, _ = rig
    servers.down = {A}
    outcome = _result(failover.request(servers.work, lambda failure: False))
    assert isinstance(outcome, Failure) and servers.asked == [A] and failover.current == A


def test_the_gateway_goes_back_to_the_first_server_once_a_background_check_reaches_it(rig) -> None:
    failover, servers, clock = rig
    servers.down = {A}
    _result(failover.request(servers.work, _always))
    clock.advance(5.0)
    assert servers.probed == [A] and failover.current == B  # still down: check again later
    servers.down = set()
    clock.advance(4.9)
    assert failover.current == B
    clock.advance(0.1)
    assert servers.probed == [A, A] and failover.current == A
    clock.advance(60)
    assert servers.probed == [A, A]  # nothing to check while the first is in use
    assert _result(failover.request(servers.work, _always)) == A


def test_cancelling_a_request_cancels_the_attempt_and_tries_no_other(rig) -> None:
    failover, servers, _ = rig
    hanging: defer.Deferred[str] = defer.Deferred()
    asked: list[str] = []

    def work(url: str) -> defer.Deferred[str]:
        asked.append(url)
        return hanging

    d = failover.request(work, _always)
    d.cancel()
    assert isinstance(_result(d), Failure) and asked == [A] and failover.current == A


def test_stop_ends_the_background_check(rig) -> None:
    failover, servers, clock = rig
    servers.down = {A}
    _result(failover.request(servers.work, _always))
    failover.stop()
    clock.advance(60)
    assert servers.probed == []


def test_the_default_check_is_a_tcp_connection_to_the_first_servers_port() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    failover = Failover(("http://127.0.0.1:8080/ocsp", "https://ca-2.internal/ocsp"), reactor, recheck=2.0)
    failover.failed("http://127.0.0.1:8080/ocsp", "refused")
    reactor.advance(2.0)
    host, port = reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.1", 8080)
