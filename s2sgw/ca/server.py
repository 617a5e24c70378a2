"""The CA status server: OCSP over HTTP, the CRL, the trust bundle and a health check.

:class:`StatusPublisher` holds what the resources serve and keeps it in step with the CA store:
a watcher polls :meth:`CertificateAuthority.change_marker` every quarter second in a thread and
applies new revocations at once (cached answers re-signed, CRL regenerated), so ``s2sgw ca
revoke`` shows within a second without a restart. Statuses of serials nobody asked about yet are
looked up on demand with ``CertificateAuthority.lookup`` in a thread and then kept in memory;
SQLite is never touched on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp
from twisted.logger import Logger
from twisted.web import http, resource, server

from s2sgw.ca.ceremony import ROOT_CRL
from s2sgw.ca.feed import FeedResource, RevocationFeed
from s2sgw.ca.ocsp import Answer
from s2sgw.ca.publisher import StatusPublisher
from s2sgw.ca.root_crl import RootCRLFile, RootCRLResource
from s2sgw.wire.feed import DEFAULT_HOLD

OCSP_REQUEST_TYPE = b"application/ocsp-request"
OCSP_RESPONSE_TYPE = b"application/ocsp-response"
CRL_TYPE = b"application/pkix-crl"
PEM_TYPE = b"application/x-pem-file"

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_TIMEOUT = 10.0


_log = Logger()


def _http_date(moment: datetime.datetime) -> bytes:
    return http.datetimeToString(moment.timestamp())


# -- HTTP ---------------------------------------------------------------------------------


def decode_get_path(segments: list[bytes]) -> bytes | None:
    """The DER request from ``/ocsp/{base64}`` (already URL-decoded per segment), or None.

    Standard base64 may hold ``/``, so the segments are joined again; URL-safe letters and
    missing padding are accepted too, as some clients send them.
    """
    text = b"/".join(segments).strip()
    if not text:
        return None
    text = text.replace(b"-", b"+").replace(b"_", b"/").replace(b" ", b"+")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _etag_matches(request: server.Request, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): a list of tags, weak ones compared by their opaque part."""
    header = request.getHeader(b"If-None-Match")
    if not header:
        return False
    tags = {tag.strip().removeprefix(b"W/") for tag in header.split(b",")}
    return b"*" in tags or etag.encode("ascii") in tags


class OCSPResource(resource.Resource):
    """``POST /ocsp`` and ``GET /ocsp/{base64 request}``."""

    isLeaf = True
    _log = Logger()

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_POST(self, request: server.Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        return self._reply(request, body, get=False)

    def render_GET(self, request: server.Request) -> bytes | int:
        body = decode_get_path(request.postpath or [])
        return self._reply(request, body if body is not None else b"", get=True)

    def _reply(self, request: server.Request, body: bytes, *, get: bool) -> bytes | int:
        try:
            result = self._publisher.answer(body)
        except Exception:
            self._log.failure("OCSP request handling failed")
            result = _INTERNAL_ERROR
        if isinstance(result, Answer):
            return self._write(request, result, get)
        finished = [False]
        request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))

        def deliver(answer: Answer) -> None:
            if finished[0]:
                return
            body = self._write(request, answer, get)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        result.addCallback(deliver)
        result.addErrback(lambda failure: self._log.failure("OCSP answer not delivered", failure))
        return server.NOT_DONE_YET

    def _write(self, request: server.Request, answer: Answer, get: bool) -> bytes:
        request.setHeader(b"Content-Type", OCSP_RESPONSE_TYPE)
        if not (get and answer.cacheable):
            request.setHeader(b"Cache-Control", b"no-store")
            return answer.der
        assert answer.this_update is not None and answer.next_update is not None
        max_age = max(0, int((answer.next_update - self._publisher.now()).total_seconds()))
        request.setHeader(
            b"Cache-Control", b"max-age=%d, public, no-transform, must-revalidate" % max_age
        )
        request.setHeader(b"Last-Modified", _http_date(answer.this_update))
        request.setHeader(b"Expires", _http_date(answer.next_update))
        if answer.etag is not None:
            request.setHeader(b"ETag", answer.etag.encode("ascii"))
            if _etag_matches(request, answer.etag):
                request.setResponseCode(http.NOT_MODIFIED)
                return b""
        return answer.der


_INTERNAL_ERROR = Answer(
    der=x509_ocsp.OCSPResponseBuilder.build_unsuccessful(
        x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR
    ).public_bytes(serialization.Encoding.DER),
    status=x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR,
)


class CRLResource(resource.Resource):
    """``GET /crl``: the current CRL in DER, from memory."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        p = self._publisher
        if p.crl_der is None or p.crl_this_update is None:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"CRL not generated yet\n"
        request.setHeader(b"Content-Type", CRL_TYPE)
        request.setHeader(b"Last-Modified", _http_date(p.crl_this_update))
        if p.crl_next_update is not None:
            request.setHeader(b"Expires", _http_date(p.crl_next_update))
            # Revocations publish a new CRL at once: let caches hold it no longer than an
            # OCSP answer lives, so both views of revocation age alike.
            left = (p.crl_next_update - p.now()).total_seconds()
            max_age = max(0, int(min(left, p.responder.validity.total_seconds())))
            request.setHeader(b"Cache-Control", b"max-age=%d, public, no-transform" % max_age)
        if p.crl_etag is not None:
            request.setHeader(b"ETag", p.crl_etag.encode("ascii"))
            if _etag_matches(request, p.crl_etag):
                request.setResponseCode(http.NOT_MODIFIED)
                return b""
        return p.crl_der


class BundleResource(resource.Resource):
    """``GET /bundle.pem``: the trust anchors gateways load."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        if self._publisher.bundle_pem is None:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"bundle not loaded yet\n"
        request.setHeader(b"Content-Type", PEM_TYPE)
        return self._publisher.bundle_pem


class HealthResource(resource.Resource):
    """``GET /healthz``: 200 when loaded, polling the store and the CRL is current; else 503."""

    isLeaf = True

    def __init__(self, publisher: StatusPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: server.Request) -> bytes:
        state = self._publisher.health()
        if state["status"] != "ok":
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(state, sort_keys=True).encode("utf-8") + b"\n"


def build_root(publisher: StatusPublisher, *, feed_hold: float = DEFAULT_HOLD) -> resource.Resource:
    """The status server's resources; ``/revocations`` is fed by every ``_apply``."""
    feed = RevocationFeed(
        issuer=publisher.responder.issuer,
        signer_cert=publisher.responder.signer_cert,
        signer_key=publisher.responder.signer_key,
        clock=publisher.clock,
        hold=feed_hold,
    )
    publisher.listeners.append(feed.publish)
    if publisher.marker is not None:
        # Loaded already: what it applied so far is read again from the store.
        feed.seeding = True
        publisher.in_thread(publisher.ca.revocations_since, 0).addCallbacks(
            feed.seed, lambda failure: _log.failure("reading revocations for the feed failed", failure)
        )
    publisher.feed = feed
    if publisher.root_crl is None:
        publisher.root_crl = RootCRLFile(publisher.ca.directory / ROOT_CRL, publisher.in_thread)
    root = resource.Resource()
    root.putChild(b"revocations", FeedResource(feed))
    root.putChild(b"ocsp", OCSPResource(publisher))
    root.putChild(b"crl", CRLResource(publisher))
    root.putChild(b"root.crl", RootCRLResource(publisher.root_crl))
    root.putChild(b"bundle.pem", BundleResource(publisher))
    root.putChild(b"healthz", HealthResource(publisher))
    return root


_TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


class LimitedRequest(server.Request):
    """A request whose body may not exceed the site's ``max_body``.

    A declared length over the limit is refused before any of the body is read; a chunked body
    is refused as soon as it passes the limit. Either way the answer is a bare 413 and the
    connection closes, so the rest is never read.
    """

    _body_received = 0
    _refused = False

    def _limit(self) -> int:
        return self.channel.site.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_received += len(data)
        if self._body_received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(_TOO_LARGE)
            transport.loseConnection()


class StatusSite(server.Site):
    """The status server's site: bounded bodies, idle timeout, no per-request access log."""

    def __init__(
        self,
        root: resource.Resource,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        # OCSP bodies are DER, never forms: parsing them as multipart costs ~50 us per request.
        super().__init__(
            root,
            requestFactory=LimitedRequest,
            parsePOSTFormSubmission=False,
            timeout=timeout,
            reactor=reactor,
        )
        self.max_body = max_body

    def log(self, request: server.Request) -> None:
        """No access log: at thousands of answers a second it would cost more than the answers."""


