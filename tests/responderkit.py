"""The CA's own OCSP responder behind a site on loopback, for status client tests with real sockets."""

from __future__ import annotations

import datetime

from twisted.web import http
from twisted.web.resource import Resource


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


def closing_on_reuse(site_class):
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


async def serve(site) -> tuple[object, str]:
    """Listen on a free loopback port: (port, the OCSP URL there)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    return port, f"http://127.0.0.1:{port.getHost().port}/ocsp"
