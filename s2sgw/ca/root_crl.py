"""``GET /root.crl``: the root's CRL as ``s2sgw ca crl --root`` last wrote it to ``DIR/root.crl``.

The root is offline, so this server cannot sign it: it only hands out the file, re-read (in a
thread) whenever the file changes. 404 while there is none: a CA that never revoked an issuing
CA may publish none, and gateways take that as "no root CRL" (see docs/ca.rst).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

CRL_TYPE = b"application/pkix-crl"


def _read(path: Path, seen: tuple[int, int, int] | None) -> tuple[tuple[int, int, int] | None, bytes | None] | None:
    """Thread side: None when the file is unchanged since ``seen``, else (its stamp, its bytes)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None if seen is None else (None, None)
    stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
    if stamp == seen:
        return None
    return stamp, path.read_bytes()


@attrs.define(eq=False)
class RootCRLFile:
    """The root's CRL in memory, followed from its file."""

    path: Path
    in_thread: Any  # like StatusPublisher.in_thread
    der: bytes | None = None
    etag: str | None = None
    _stamp: tuple[int, int, int] | None = None
    _log = Logger()

    def poll(self) -> defer.Deferred[None]:
        d = self.in_thread(_read, self.path, self._stamp)
        d.addCallback(self._take)
        d.addErrback(lambda failure: self._log.failure("reading the root CRL {path} failed", failure, path=str(self.path)))
        return d

    def _take(self, result: tuple[tuple[int, int, int] | None, bytes | None] | None) -> None:
        if result is None:
            return
        stamp, data = result
        if data is not None:
            try:
                crl = x509.load_der_x509_crl(data)
            except ValueError:
                self._log.warn("root CRL {path} is not a DER CRL; still serving the previous one", path=str(self.path))
                return
            self._log.info(
                "root CRL {path} published: {count} revoked issuing CAs, next update {next_update}",
                path=str(self.path), count=len(crl), next_update=str(crl.next_update_utc),
            )
        self._stamp, self.der = stamp, data
        self.etag = None if data is None else '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


class RootCRLResource(resource.Resource):
    isLeaf = True

    def __init__(self, root_crl: RootCRLFile) -> None:
        super().__init__()
        self._root_crl = root_crl

    def render_GET(self, request: server.Request) -> bytes:
        der, etag = self._root_crl.der, self._root_crl.etag
        if der is None:
            request.setResponseCode(http.NOT_FOUND)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"this CA publishes no root CRL\n"
        request.setHeader(b"Content-Type", CRL_TYPE)
        request.setHeader(b"Cache-Control", b"max-age=60, public, no-transform")
        if etag is not None:
            request.setHeader(b"ETag", etag.encode("ascii"))
            if etag in (request.getHeader(b"If-None-Match") or b"").decode("latin-1"):
                request.setResponseCode(http.NOT_MODIFIED)
                return b""
        return der
