"""Status queries over kept-alive connections that the CA closes: no query is lost to the race.

The CA's own responder runs behind the CA's own site on loopback. One server closes every
kept-alive connection at the worst moment, as the next request arrives on it (what a CA idle
timeout does to a request sent just as it fires); another is the CA's site with a 1 s idle
timeout, queried at that spacing.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import task

from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.wire.http import KEEPALIVE_SECONDS, http_client
from tests.responderkit import CAResponder, closing_on_reuse, serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from s2sgw.ca.authority import CertificateAuthority

    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "s2s.test")


def _leaf_and_issuer(ca) -> tuple[x509.Certificate, x509.Certificate]:
    chain = x509.load_pem_x509_certificates(ca.issue("users").chain_pem)
    return chain[0], chain[1]


@pytest_twisted.ensureDeferred
async def test_every_query_is_answered_when_the_ca_closes_each_reused_connection_under_it(ca):
    """100 of 100 checks (the callers' path) and 100 of 100 probes (the readiness path) come back
    good, though the server closes every kept-alive connection as a request arrives on it."""
    from twisted.internet import reactor

    from s2sgw.ca.server import StatusSite

    responder = CAResponder(ca)
    site = closing_on_reuse(StatusSite)(responder, reactor=reactor)
    port, url = await serve(site)
    leaf, issuer = _leaf_and_issuer(ca)
    checker = OCSPStatusChecker(url, reactor, timeout=5)
    try:
        states = []
        for _ in range(100):
            checker.forget(leaf.serial_number)
            states.append((await checker.check(leaf, issuer)).state)
        probes = [(await checker.probe(leaf, issuer)).state for _ in range(100)]
    finally:
        await checker.close()
        await port.stopListening()
    assert states == ["good"] * 100
    assert probes == ["good"] * 100
    assert site.closed_under_request >= 100  # the race was met, not avoided
    assert responder.answered == 200


@pytest_twisted.ensureDeferred
async def test_queries_spaced_at_the_cas_idle_timeout_are_all_answered(ca):
    """The CA's site closes idle connections after 1 s; queries sent around that moment are all
    answered good."""
    from twisted.internet import reactor

    from s2sgw.ca.server import StatusSite

    responder = CAResponder(ca)
    port, url = await serve(StatusSite(responder, timeout=1.0, reactor=reactor))
    leaf, issuer = _leaf_and_issuer(ca)
    checker = OCSPStatusChecker(url, reactor, timeout=5)
    jitter = random.Random(21)
    try:
        states = []
        for _ in range(12):
            states.append((await checker.probe(leaf, issuer)).state)
            await task.deferLater(reactor, 1.0 + jitter.uniform(-0.01, 0.01), lambda: None)
    finally:
        await checker.close()
        await port.stopListening()
    assert states == ["good"] * 12


def test_kept_alive_status_connections_are_closed_before_the_cas_default_idle_timeout():
    """Our side closes idle connections first: sooner than the CA's default 10 s."""
    from s2sgw.ca.server import DEFAULT_TIMEOUT

    _, pool = http_client(task.Clock())
    assert pool.cachedConnectionTimeout == KEEPALIVE_SECONDS < DEFAULT_TIMEOUT


@pytest_twisted.ensureDeferred
async def test_a_query_the_first_status_server_cannot_take_is_answered_by_the_next_and_the_first_is_used_again(ca):
    """``status.url`` lists two servers; the first's port is closed: the caller's check is answered
    by the second, which stays in use until a background check finds the first listening again."""
    from twisted.internet import reactor

    from s2sgw.ca.server import StatusSite
    from tests.e2e import free_port

    first_port_number = free_port()
    first_url = f"http://127.0.0.1:{first_port_number}/ocsp"
    second = CAResponder(ca)
    second_port, second_url = await serve(StatusSite(second, reactor=reactor))
    leaf, issuer = _leaf_and_issuer(ca)
    checker = OCSPStatusChecker((first_url, second_url), reactor, timeout=5)
    servers = checker.servers_for(issuer)
    servers.recheck = 0.2
    first_port = None
    try:
        assert (await checker.check(leaf, issuer)).state == "good"
        assert second.answered == 1 and servers.current == second_url
        first = CAResponder(ca)
        from twisted.internet.endpoints import serverFromString

        first_port = await serverFromString(reactor, f"tcp:{first_port_number}:interface=127.0.0.1").listen(
            StatusSite(first, reactor=reactor)
        )
        for _ in range(50):
            if servers.current == first_url:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert servers.current == first_url and servers.failovers == 1
        assert (await checker.probe(leaf, issuer)).state == "good" and first.answered == 1
    finally:
        await checker.close()
        await second_port.stopListening()
        if first_port is not None:
            await first_port.stopListening()
