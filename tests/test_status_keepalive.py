"""Status queries over kept-alive connections that the CA closes: no query is lost to the race.

The CA's own responder runs behind the CA's own site on loopback. One server closes every
kept-alive connection at the worst moment, as the next request arrives on it (what a CA idle
timeout does to a request sent just as it fires); another is the CA's site with a 1 s idle
timeout, queried at that spacing.
"""

from __future__ import annotations

import datetime
import random

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import task
from twisted.web import http
from twisted.web.resource import Resource

from s2sgw.status.ocsp import OCSPStatusChecker
from s2sgw.wire.http import KEEPALIVE_SECONDS, http_client

pytestmark = pytest.mark.e2e


class CAResponder(Resource):
    """The CA's OCSP answers for the certificates of ``ca``."""

    isLeaf = True

    def __init__(self, ca) -> None:
        super().__init__()
        from s2sgw.ca.ocsp import Responder, SerialStatus

        self.responder = Responder(ca.intermediate_cert, ca.ocsp_cert, ca.ocsp_key)
        self.lookup = lambda serial: SerialStatus.from_record(ca.lookup(serial))
        self.answered = 0

    def render_POST(self, request):
        self.answered += 1
        now = datetime.datetime.now(datetime.UTC)
        request.setHeader(b"content-type", b"application/ocsp-response")
        return self.responder.answer(request.content.read(), now, self.lookup).der


def _closing_on_reuse(site_class):
    """A site whose connections serve one request, stay open, and close as a second one arrives."""

    class OneRequestChannel(http.HTTPChannel):
        served = 0

        def dataReceived(self, data: bytes) -> None:
            if self.served:
                if not self.transport.disconnecting:
                    self.site.closed_under_request += 1
                    self.transport.loseConnection()
                return
            super().dataReceived(data)

        def requestDone(self, request) -> None:
            self.served += 1
            super().requestDone(request)

    class Site(site_class):
        closed_under_request = 0

        def buildProtocol(self, addr):
            channel = OneRequestChannel()
            channel.requestFactory = self.requestFactory
            channel.site = self
            channel.factory = self
            return channel

    return Site


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from s2sgw.ca.authority import CertificateAuthority

    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "s2s.test")


def _leaf_and_issuer(ca) -> tuple[x509.Certificate, x509.Certificate]:
    chain = x509.load_pem_x509_certificates(ca.issue("users").chain_pem)
    return chain[0], chain[1]


async def _serve(site):
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    return port, f"http://127.0.0.1:{port.getHost().port}/ocsp"


@pytest_twisted.ensureDeferred
async def test_every_query_is_answered_when_the_ca_closes_each_reused_connection_under_it(ca):
    """100 of 100 checks (the callers' path) and 100 of 100 probes (the readiness path) come back
    good, though the server closes every kept-alive connection as a request arrives on it."""
    from twisted.internet import reactor

    from s2sgw.ca.server import StatusSite

    responder = CAResponder(ca)
    site = _closing_on_reuse(StatusSite)(responder, reactor=reactor)
    port, url = await _serve(site)
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
    port, url = await _serve(StatusSite(responder, timeout=1.0, reactor=reactor))
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
