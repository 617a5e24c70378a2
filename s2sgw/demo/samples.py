"""The demo's sample parts: the "users" REST service, a raw client, free ports, the root's fingerprint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web import resource, server

USER = {"id": 1, "name": "John Doe", "email": "john.doe@example.com"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UserResource(resource.Resource):
    """The sample REST service: GET /api/users/1."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/api/users/1":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(USER).encode()
        request.setResponseCode(404)
        return b'{"error": "not found"}'


class Collect(Protocol):
    """Send a request, collect whatever comes back until the connection ends."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


def root_fingerprint(bundle: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in ``bundle``, as openssl prints it."""
    from s2sgw import pki
    from s2sgw.enroll.client import display_fingerprint
    from s2sgw.wire import est

    return display_fingerprint(est.fingerprint(pki.load_certificates(bundle)[0]))
