"""Rewrite the heads of HTTP/1.x requests in a byte stream; pass everything else untouched.

The identity layer of ``http-headers`` and ``jwt`` routes sits on one direction of a relay
(caller -> backend). It parses only what it must to find where each request head starts and
ends: the request line, the header fields, and the body framing (``Content-Length`` or
``chunked``). Bodies, chunk framing and trailers are forwarded byte for byte as they arrive;
pipelined requests are handled one after another, in order. For each head a
:class:`HeadPolicy` names the fields to remove and the fields to add.

Names are matched after folding letter case and ``_`` to ``-`` (:func:`fold_name`), because some
backends do the same: gunicorn with ``--header-map dangerous`` turns both
``X_Forwarded_Client_Cert`` and ``X-Forwarded-Client-Cert`` into ``HTTP_X_FORWARDED_CLIENT_CERT``,
and nginx with ``underscores_in_headers on`` shows both as ``$http_x_forwarded_client_cert``.
The fields the policy adds go first, right after the request line, so a backend that keeps only
the first N fields of a head still sees them. A head that would reach the backend with more
than ``max_fields`` fields, the caller's (stripped ones included) plus the gateway's, is refused
(431): a backend whose limit is 100 fields (gunicorn, Apache and Python's http.server by default)
never refuses, for its field count, a head the gateway forwarded.

Anything this parser cannot frame with certainty is refused rather than guessed at, because a
request the gateway and the backend frame differently is how a caller would smuggle a forged
identity header past the rewriter: bare CR or LF (refused as soon as it arrives, not when the
head is complete), obsolete line folding, whitespace before the colon, ``Content_Length`` or
``Transfer_Encoding`` spelled with ``_``, ``Transfer-Encoding`` together with ``Content-Length``,
conflicting lengths, a ``Transfer-Encoding`` whose last coding is not ``chunked``, and heads over
``max_head`` bytes.
``Upgrade`` (WebSocket, h2c) and ``CONNECT`` are refused too: after a switch the stream is no
longer HTTP/1.1, so later "requests" could not be rewritten.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from s2sgw.interfaces import Reason

MAX_HEAD = 64 * 1024  # request line + header fields + the empty line
MAX_HEADER_FIELDS = 100  # the caller's header fields plus the gateway's, in one head
MAX_CHUNK_LINE = 4096


def fold_name(name: bytes) -> bytes:
    """A header name as backends that treat ``_`` like ``-`` see it: lowercase, ``_`` -> ``-``."""
    return name.lower().replace(b"_", b"-")


XFCC = b"x-forwarded-client-cert"
CLIENT_CERT = b"client-cert"  # RFC 9440
CLIENT_CERT_CHAIN = b"client-cert-chain"  # RFC 9440
# Every name the gateway writes or a backend may read as the caller's identity (folded). Every
# HTTP identity mode removes them from every request, whatever the caller's spelling.
IDENTITY_HEADERS = frozenset({XFCC, CLIENT_CERT, CLIENT_CERT_CHAIN})
# Framing fields: the gateway frames by their exact names, so a ``_`` spelling a backend might
# fold into one of them would make the two frame the request differently.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

Header = tuple[bytes, bytes]  # (name as sent, value without surrounding whitespace)


class Refusal(Exception):
    """A request the gateway will not forward: the answer's status and the audit reason."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@attrs.frozen
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: tuple[Header, ...]

    def values(self, lowered_name: bytes) -> list[bytes]:
        return [value for name, value in self.headers if name.lower() == lowered_name]


class HeadPolicy(Protocol):
    """What a route does to each request head."""

    strip: frozenset[bytes]  # folded names (:func:`fold_name`) removed from every request

    def headers_for(self, head: RequestHead) -> Sequence[Header]:
        """Fields to write first, right after the request line; raise :class:`Refusal` to refuse."""
        ...


_STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 431: "Request Header Fields Too Large", 501: "Not Implemented"}


def error_response(status: int, reason: str) -> bytes:
    """A minimal closing HTTP/1.1 answer whose body is the reason code."""
    body = f"{reason}\n".encode("ascii")
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


def _bare_cr_or_lf(data: bytes, pos: int, end: int) -> bool:
    """Whether ``data[pos:end]``, a line holding no CRLF yet, already has a bare CR or LF."""
    return data.find(b"\n", pos, end) >= 0 or data.find(b"\r", pos, end - 1) >= 0


# States of the parser.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DEAD = range(7)


@attrs.define(eq=False)
class RequestRewriter:
    """Feed it the caller's bytes with :meth:`feed`; it calls ``forward`` once per feed at most.

    On a request it will not forward it calls ``refuse(refusal)`` once and drops everything
    after; bytes of earlier requests already forwarded stay forwarded.
    """

    policy: HeadPolicy
    forward: Callable[[bytes], None]
    refuse: Callable[[Refusal], None]
    max_head: int = MAX_HEAD
    max_fields: int = MAX_HEADER_FIELDS
    requests: int = 0  # heads rewritten so far
    _state: int = _HEAD
    _buffer: bytes = b""
    _scanned: int = 0  # bytes of the buffered, incomplete head already checked
    _lines: int = 0  # CRLF-ended lines in those bytes
    _remaining: int = 0  # body or chunk bytes still to pass
    _trailer_bytes: int = 0

    @property
    def refused(self) -> bool:
        return self._state == _DEAD

    def feed(self, data: bytes) -> None:
        if self._state == _DEAD:
            return
        out: list[bytes] = []
        try:
            self._consume(data, out)
        except Refusal as refusal:
            self._state = _DEAD
            self._buffer = b""
            if out:
                self.forward(b"".join(out))
            self.refuse(refusal)
            return
        if out:
            self.forward(out[0] if len(out) == 1 else b"".join(out))

    def _consume(self, data: bytes, out: list[bytes]) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                out.append(data[pos : pos + take] if (pos or take < end) else data)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEAD if state == _LENGTH else _CHUNK_END
            elif state == _HEAD:
                # Empty lines before a request line are allowed (RFC 9112 section 2.2).
                while data.startswith(b"\r\n", pos):
                    out.append(b"\r\n")
                    pos += 2
                if pos >= end:
                    break
                if data[pos : pos + 1] == b"\r" and pos + 1 == end:
                    self._buffer = b"\r"
                    break
                stop = data.find(b"\r\n\r\n", max(pos, pos + self._scanned - 3))
                if stop < 0:
                    self._check_partial_head(data, pos, end)
                    self._buffer = data[pos:]
                    break
                if stop + 4 - pos > self.max_head:
                    raise Refusal(431, Reason.HTTP_BAD_REQUEST, f"request head over {self.max_head} bytes")
                self._scanned = self._lines = 0
                out.append(self._rewrite(data[pos:stop]))
                pos = stop + 4
            elif state == _CHUNK_SIZE:
                stop = data.find(b"\r\n", pos)
                if stop < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise Refusal(400, Reason.HTTP_BAD_REQUEST, "chunk size line too long")
                    if _bare_cr_or_lf(data, pos, end):
                        raise Refusal(400, Reason.HTTP_BAD_REQUEST, "malformed chunk size")
                    self._buffer = data[pos:]
                    break
                line = data[pos:stop]
                if len(line) > MAX_CHUNK_LINE:
                    raise Refusal(400, Reason.HTTP_BAD_REQUEST, "chunk size line too long")
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.match(size_text) or b"\n" in line or b"\r" in line:
                    raise Refusal(400, Reason.HTTP_BAD_REQUEST, "malformed chunk size")
                size = int(size_text, 16)
                out.append(data[pos : stop + 2])
                pos = stop + 2
                if size:
                    self._state, self._remaining = _CHUNK_DATA, size
                else:
                    self._state, self._trailer_bytes = _TRAILERS, 0
            elif state == _CHUNK_END:
                if end - pos < 2:
                    if data[pos:end] != b"\r":
                        raise Refusal(400, Reason.HTTP_BAD_REQUEST, "chunk data not followed by CRLF")
                    self._buffer = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise Refusal(400, Reason.HTTP_BAD_REQUEST, "chunk data not followed by CRLF")
                out.append(b"\r\n")
                pos += 2
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS: lines until an empty one, passed untouched
                stop = data.find(b"\r\n", pos)
                if stop < 0:
                    if self._trailer_bytes + end - pos > self.max_head:
                        raise Refusal(400, Reason.HTTP_BAD_REQUEST, "trailer section too long")
                    if _bare_cr_or_lf(data, pos, end):
                        raise Refusal(400, Reason.HTTP_BAD_REQUEST, "bare CR or LF in a trailer")
                    self._buffer = data[pos:]
                    break
                line = data[pos:stop]
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > self.max_head:
                    raise Refusal(400, Reason.HTTP_BAD_REQUEST, "trailer section too long")
                if b"\r" in line or b"\n" in line:
                    raise Refusal(400, Reason.HTTP_BAD_REQUEST, "bare CR or LF in a trailer")
                out.append(data[pos : stop + 2])
                pos = stop + 2
                if not line:
                    self._state = _HEAD

    def _check_partial_head(self, data: bytes, pos: int, end: int) -> None:
        """Refuse an incomplete head as soon as it is sure to be refused once complete.

        Checks only the bytes not checked on earlier reads (a head arriving a byte at a time
        costs linear time): a bare CR or LF, too many lines, too many bytes. A CR at the very
        end waits for the next read to show whether an LF follows.
        """
        start = pos + self._scanned
        stop = end - 1 if data[end - 1] == 0x0D else end
        crlf = data.count(b"\r\n", start, stop)
        if data.count(b"\n", start, stop) != crlf or data.count(b"\r", start, stop) != crlf:
            raise Refusal(400, Reason.HTTP_BAD_REQUEST, "bare CR or LF in the request head")
        self._scanned, self._lines = stop - pos, self._lines + crlf
        if self._lines - 1 > self.max_fields:  # the first line is the request line
            raise Refusal(431, Reason.HTTP_TOO_MANY_HEADERS, f"more than {self.max_fields} header fields")
        if end - pos > self.max_head:
            raise Refusal(431, Reason.HTTP_BAD_REQUEST, f"request head over {self.max_head} bytes")

    def _rewrite(self, head: bytes) -> bytes:
        """Parse one head (without its final CRLFCRLF), decide the body framing, return the new head."""
        lines = head.split(b"\r\n")
        request_line = lines[0]
        if b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(b"\r\n", b""):
            raise Refusal(400, Reason.HTTP_BAD_REQUEST, "bare CR or LF in the request head")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
            raise Refusal(400, Reason.HTTP_BAD_REQUEST, "malformed request line")
        method, target, version = parts
        if version not in _VERSIONS:
            raise Refusal(400, Reason.HTTP_BAD_REQUEST, "not an HTTP/1.0 or HTTP/1.1 request")
        if len(lines) - 1 > self.max_fields:
            raise Refusal(431, Reason.HTTP_TOO_MANY_HEADERS, f"more than {self.max_fields} header fields")
        strip = self.policy.strip
        headers: list[Header] = []
        kept: list[bytes] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        upgrade = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.match(name):
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "malformed header field")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "control character in a header value")
            lowered = name.lower()
            folded = lowered.replace(b"_", b"-")  # as fold_name(); faster than testing b"_" in lowered
            if folded != lowered and folded in _FRAMING:
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "a framing field name spelled with '_'")
            headers.append((name, value))
            if lowered == b"content-length":
                lengths.extend(item.strip(b" \t") for item in value.split(b","))
            elif lowered == b"transfer-encoding":
                codings.extend(item.strip(b" \t").lower() for item in value.split(b","))
            elif lowered == b"upgrade":
                upgrade = True
            elif lowered == b"connection" and b"upgrade" in (t.strip(b" \t").lower() for t in value.split(b",")):
                upgrade = True
            if folded not in strip:
                kept.append(line)
        if upgrade or method == b"CONNECT":
            raise Refusal(501, Reason.HTTP_UPGRADE_REFUSED, "protocol upgrades and CONNECT are not relayed on this route")
        if codings:
            if lengths:
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "both Transfer-Encoding and Content-Length")
            if version != b"HTTP/1.1" or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "Transfer-Encoding without chunked as the last coding")
            next_state, remaining = _CHUNK_SIZE, 0
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                raise Refusal(400, Reason.HTTP_BAD_REQUEST, "invalid or conflicting Content-Length")
            remaining = int(lengths[0])
            next_state = _LENGTH if remaining else _HEAD
        else:
            next_state, remaining = _HEAD, 0
        added = self.policy.headers_for(RequestHead(method, target, version, tuple(headers)))
        if len(headers) + len(added) > self.max_fields:
            raise Refusal(431, Reason.HTTP_TOO_MANY_HEADERS, f"more than {self.max_fields} header fields with the gateway's")
        self._state, self._remaining = next_state, remaining
        self.requests += 1
        # The gateway's fields first: a backend that drops fields past its own limit keeps them.
        return b"\r\n".join([request_line, *(name + b": " + value for name, value in added), *kept, b"\r\n"])


# ---------------------------------------------------------------------------------------------
# http-headers: XFCC and RFC 9440 Client-Cert


def identity_headers(own_id: str, caller_id: str, caller_cert: x509.Certificate) -> tuple[Header, ...]:
    """``X-Forwarded-Client-Cert`` (Envoy's keys) and RFC 9440 ``Client-Cert`` for one caller."""
    der = caller_cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    xfcc = f"By={_xfcc_value(own_id)};Hash={digest};URI={_xfcc_value(caller_id)}".encode("ascii")
    return (
        (b"X-Forwarded-Client-Cert", xfcc),
        (b"Client-Cert", b":" + base64.b64encode(der) + b":"),
    )


def _xfcc_value(value: str) -> str:
    # Envoy quotes values holding , ; = or "; a SPIFFE ID never does, but stay safe.
    if any(c in value for c in ',;="') or not value.isascii():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


@attrs.frozen
class IdentityHeaders:
    """``identity = "http-headers"``: every request gets the caller's identity, spoofs are removed."""

    headers: tuple[Header, ...]
    strip: frozenset[bytes] = IDENTITY_HEADERS

    def headers_for(self, head: RequestHead) -> Sequence[Header]:
        return self.headers
