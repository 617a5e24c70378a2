"""EST over HTTP (RFC 7030): ``/.well-known/est/cacerts``, ``simpleenroll`` and ``simplereenroll``.

The resources parse and answer; :class:`~s2sgw.ca.enroll.Enroller` decides, in a thread. Every
request that ends without a certificate logs one ``EST refused`` line with its status and reason,
every certificate one ``EST issued`` line, both under the ``s2sgw.ca.est`` namespace. Nothing of
a token or key is ever logged: names, serials, addresses and reasons only.

Statuses: 401 (with ``WWW-Authenticate: Basic realm="s2sgw"``) for missing credentials or an
unknown, spent or expired token; 403 for a token bound to another name and for any client
certificate problem on simplereenroll (none, foreign, unknown, revoked, expired); 400 for a body
that is not a base64 CSR we would sign; 413 for a body over ``--max-body``; 415 for a
Content-Type other than ``application/pkcs10``; 429 with ``Retry-After`` past the rate limit.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, pages, resource, server

from s2sgw.ca.authority import CAError, validate_service_name
from s2sgw.ca.enroll import UNAUTHORIZED, Enroller, Issued, PeerCertificate, Refusal
from s2sgw.ca.publisher import InThread
from s2sgw.ca.server import DEFAULT_MAX_BODY, DEFAULT_TIMEOUT, LimitedRequest, StatusSite
from s2sgw.serials import serial_text
from s2sgw.wire import est as wire

NAMESPACE = "s2sgw.ca.est"
REALM = b'Basic realm="s2sgw"'

ISSUED_FORMAT = "EST issued identity={identity} serial={serial} authorized={via} client={client} not_after={not_after}"
REFUSED_FORMAT = "EST refused {operation} identity={identity} client={client} status={status} reason={reason}"

PeerLookup = Callable[[server.Request], PeerCertificate | None]

_log = Logger(namespace=NAMESPACE)


def _printable(text: str, limit: int = 300) -> str:
    """One log line per event whatever a client sent: no control characters, bounded length."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _client(request: server.Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "-"))


def basic_credentials(request: server.Request) -> tuple[str, str] | None:
    """(name, token) from ``Authorization: Basic``, or None when absent or malformed."""
    header = request.getHeader(b"Authorization")
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, token = decoded.partition(":")
    if not colon or not token:
        return None
    return name, token


def refused(operation: str, client: str, refusal: Refusal) -> None:
    """The one log line of a refusal."""
    _log.warn(
        REFUSED_FORMAT,
        operation=operation,
        identity=_printable(refusal.identity),
        client=client,
        status=refusal.status,
        reason=_printable(refusal.reason),
    )


def _plain(request: server.Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return (text + "\n").encode("utf-8")


def _refuse(request: server.Request, operation: str, refusal: Refusal) -> bytes:
    refused(operation, _client(request), refusal)
    if refusal.status == UNAUTHORIZED:
        request.setHeader(b"WWW-Authenticate", REALM)
    if refusal.retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % refusal.retry_after)
    return _plain(request, refusal.status, refusal.reason)


class CACertsResource(resource.Resource):
    """``GET /.well-known/est/cacerts``: the trust anchors and the issuing intermediate, certs-only."""

    isLeaf = True

    def __init__(self, enroller: Enroller, in_thread: InThread) -> None:
        super().__init__()
        self._enroller = enroller
        self._in_thread = in_thread

    def render_GET(self, request: server.Request) -> int:
        finished = _watch(request)

        def deliver(certificates: list[Any]) -> None:
            if finished[0]:
                return
            body = wire.encode_certs_only(certificates)
            request.setHeader(b"Content-Type", wire.CACERTS_CONTENT_TYPE.encode("ascii"))
            request.setHeader(b"Content-Transfer-Encoding", wire.TRANSFER_ENCODING.encode("ascii"))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        d = self._in_thread(self._enroller.cacerts)
        d.addCallback(deliver)
        d.addErrback(_internal_error, request, finished, "cacerts")
        return server.NOT_DONE_YET

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"Allow", b"GET, HEAD")
        return _refuse(request, wire.CACERTS, Refusal(http.NOT_ALLOWED, "cacerts is read with GET"))


class EnrollResource(resource.Resource):
    """``POST`` simpleenroll (token in HTTP Basic) or simplereenroll (TLS client certificate)."""

    isLeaf = True

    def __init__(
        self,
        operation: str,
        enroller: Enroller,
        in_thread: InThread,
        clock: IReactorTime,
        peer: PeerLookup,
    ) -> None:
        super().__init__()
        self._operation = operation
        self._enroller = enroller
        self._in_thread = in_thread
        self._clock = clock
        self._peer = peer

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Allow", b"POST")
        return _refuse(request, self._operation, Refusal(http.NOT_ALLOWED, f"{self._operation} takes a POST"))

    def render_POST(self, request: server.Request) -> bytes | int:
        content_type = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip().lower()
        if content_type != wire.CSR_CONTENT_TYPE.encode("ascii"):
            shown = _printable(content_type.decode("latin-1")) or "none"
            return _refuse(
                request,
                self._operation,
                Refusal(http.UNSUPPORTED_MEDIA_TYPE, f"Content-Type {shown}, expected {wire.CSR_CONTENT_TYPE}"),
            )
        body = request.content.read() if request.content is not None else b""
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.timezone.utc)
        if self._operation == wire.SIMPLEENROLL:
            credentials = basic_credentials(request)
            if credentials is None:
                return _refuse(request, self._operation, Refusal(UNAUTHORIZED, "no HTTP Basic credentials"))
            name, token = credentials
            try:
                validate_service_name(name)
            except CAError:
                return _refuse(request, self._operation, Refusal(UNAUTHORIZED, "user name is not a service name"))
            d = self._in_thread(self._enroller.enroll, name, token, body, now)
        else:
            try:
                peer = self._peer(request)
            except Exception as error:  # fail closed: an unreadable certificate is no certificate
                peer = None
                _log.warn("reading the client certificate failed: {error!r}", error=error)
            d = self._in_thread(self._enroller.reenroll, peer, body, now)
        finished = _watch(request)
        d.addCallbacks(self._issued, self._refused, callbackArgs=(request, finished), errbackArgs=(request, finished))
        d.addErrback(_internal_error, request, finished, self._operation)
        return server.NOT_DONE_YET

    def _issued(self, issued: Issued, request: server.Request, finished: list[bool]) -> None:
        record = issued.record
        _log.info(
            ISSUED_FORMAT,
            identity=issued.identity,
            serial=serial_text(record.serial),
            via=issued.via,
            client=_client(request),
            not_after=record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        if finished[0]:
            return
        body = wire.encode_certs_only(list(issued.chain))
        request.setHeader(b"Content-Type", wire.CERTS_ONLY_CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Content-Transfer-Encoding", wire.TRANSFER_ENCODING.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _refused(self, failure: Failure, request: server.Request, finished: list[bool]) -> None:
        failure.trap(Refusal)
        body = _refuse(request, self._operation, failure.value)
        if not finished[0]:
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()


def _watch(request: server.Request) -> list[bool]:
    """A flag set when the client goes away, so a late answer is not written to a dead request."""
    finished = [False]
    request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))
    return finished


def _internal_error(failure: Failure, request: server.Request, finished: list[bool], operation: str) -> None:
    _log.failure("EST {operation} failed", failure, operation=operation)
    refused(operation, _client(request), Refusal(http.INTERNAL_SERVER_ERROR, "internal error"))
    if not finished[0]:
        body = _plain(request, http.INTERNAL_SERVER_ERROR, "internal error")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()


class _Directory(resource.Resource):
    """A path level: its children, and a plain 404 for anything else (serverkeygen, csrattrs, ...)."""

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return pages.notFound()

    def render(self, request: server.Request) -> bytes:
        return pages.notFound().render(request)


def build_est_root(
    enroller: Enroller, in_thread: InThread, clock: IReactorTime, peer: PeerLookup
) -> resource.Resource:
    """``/.well-known/est/...`` and nothing else."""
    est = _Directory()
    est.putChild(wire.CACERTS.encode("ascii"), CACertsResource(enroller, in_thread))
    for operation in (wire.SIMPLEENROLL, wire.SIMPLEREENROLL):
        est.putChild(operation.encode("ascii"), EnrollResource(operation, enroller, in_thread, clock, peer))
    well_known = _Directory()
    well_known.putChild(b"est", est)
    root = _Directory()
    root.putChild(b".well-known", well_known)
    return root


class EstRequest(LimitedRequest):
    """A bounded request whose 413 leaves an ``EST refused`` line like every other refusal."""

    def _refuse(self) -> None:
        if not self._refused:
            path = getattr(self.channel, "_path", b"") or b""
            operation = path.rsplit(b"/", 1)[-1].decode("ascii", "replace")
            address = self.channel.transport.getPeer() if self.channel.transport is not None else None
            refused(
                _printable(operation, 40),
                str(getattr(address, "host", "-")),
                Refusal(http.REQUEST_ENTITY_TOO_LARGE, f"body larger than {self._limit()} bytes"),
            )
        super()._refuse()


class EstSite(StatusSite):
    """The EST listener's site: bounded bodies, idle timeout, EST refusal lines for 413."""

    def __init__(
        self,
        root: resource.Resource,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        super().__init__(root, max_body=max_body, timeout=timeout, reactor=reactor)
        self.requestFactory = EstRequest
