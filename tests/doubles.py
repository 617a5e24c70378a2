"""Test doubles shared by the test modules: each stands in for one seam of the gateway."""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from treq.testing import StubTreq
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.responders import responders_for
from s2sgw.ca.publisher import StatusPublisher, StoreWatcher
from s2sgw.ca.server import build_root
from s2sgw.interfaces import IStatusChecker
from s2sgw.timeutil import utc
from s2sgw.wire.ocsp import CertStatus


@implementer(IStatusChecker)
@attrs.define(eq=False)
class FakeStatusChecker:
    """A status checker answering from a table, for tests of the parts that use one.

    ``set(serial, "revoked")`` or ``set(serial, StatusUnavailable("down"))``; serials not in the
    table get ``default``. ``hold = True`` keeps answers pending until ``release()``.
    """

    clock: IReactorTime
    default: str | Exception = "good"
    hold: bool = False
    calls: list = attrs.field(factory=list)  # (serial, issuer subject) per check
    _table: dict = attrs.field(init=False, factory=dict)
    _pending: list = attrs.field(init=False, factory=list)

    def set(self, serial: int, answer: str | CertStatus | Exception) -> None:
        self._table[serial] = answer

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        self.calls.append((leaf.serial_number, issuer.subject))
        if self.hold:
            d: Deferred[CertStatus] = Deferred()
            self._pending.append((d, leaf.serial_number))
            return d
        return self._answer(leaf.serial_number)

    def close(self) -> Deferred[None]:
        return defer.succeed(None)

    def release(self) -> None:
        pending, self._pending = self._pending, []
        for d, serial in pending:
            self._answer(serial).chainDeferred(d)

    def _answer(self, serial: int) -> Deferred[CertStatus]:
        answer = self._table.get(serial, self.default)
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        if isinstance(answer, CertStatus):
            return defer.succeed(answer)
        now = utc(self.clock.seconds())
        revoked_at = now if answer == "revoked" else None
        reason = "unspecified" if answer == "revoked" else None
        return defer.succeed(CertStatus(answer, now, None, revoked_at=revoked_at, revocation_reason=reason))


class InlineThreads:
    """Reactor methods for code that hands work to threads: here the work runs at once."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> InlineThreads:
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor(InlineThreads, Clock):
    """A Clock at the wall time whose "threads" run at once: what the store and the refresher need."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(time.time())


def decode_proxy_v2(data: bytes) -> Decoded:
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a", "no v2 signature"
    version_command, family, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    assert version_command >> 4 == 2
    body = data[16 : 16 + length]
    assert len(body) == length
    source = destination = None
    if family == 0x11:
        source = (str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big"))
        destination = (str(ipaddress.IPv4Address(body[4:8])), int.from_bytes(body[10:12], "big"))
        rest = body[12:]
    elif family == 0x21:
        source = (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big"))
        destination = (str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big"))
        rest = body[36:]
    else:
        rest = body
    return Decoded(version_command & 0xF, family, source, destination, decode_tlvs(rest), 16 + length)


@attrs.define
class Inline:
    """Runs store work at once, recording what ran (the real server uses a thread)."""

    calls: list[str] = attrs.field(factory=list)
    fail: Callable[[str], bool] = lambda name: False

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        name = getattr(f, "__name__", repr(f))
        self.calls.append(name)
        if self.fail(name):
            return defer.fail(RuntimeError(f"store broken during {name}"))
        return defer.maybeDeferred(f, *args)


def make_harness(
    ca: CertificateAuthority, inline: Inline | None = None, registry: CollectorRegistry | None = None, **kwargs: Any
) -> Harness:
    """A started watcher; the publisher's gauges go to ``registry`` (one of the harness' own when None)."""
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
    inline = inline or Inline()
    responder = responders_for(ca, datetime.timedelta(seconds=300))
    publisher = StatusPublisher(ca=ca, responder=responder, clock=clock, in_thread=inline, **kwargs)
    watcher = StoreWatcher(publisher, clock, registry=CollectorRegistry() if registry is None else registry)
    watcher.startService()
    return Harness(ca, clock, inline, publisher, watcher, StubTreq(build_root(publisher)))


@attrs.frozen
class Decoded:
    command: int
    family: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: dict[int, bytes]
    consumed: int


def decode_tlvs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while data:
        kind, length = data[0], int.from_bytes(data[1:3], "big")
        value = data[3 : 3 + length]
        assert len(value) == length, "truncated TLV"
        found[kind] = value
        data = data[3 + length :]
    return found


@attrs.define
class Harness:
    ca: CertificateAuthority
    clock: task.Clock
    inline: Inline
    publisher: StatusPublisher
    watcher: StoreWatcher
    stub: StubTreq

    def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        d = self.stub.request(method, BASE + path, **kwargs)
        self.stub.flush()
        response = result_of(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response, result_of(body)

    def post(self, body: bytes) -> tuple[Any, ocsp.OCSPResponse]:
        response, der = self.fetch(
            "POST", "/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}
        )
        return response, ocsp.load_der_ocsp_response(der)

    def request(self, cert: x509.Certificate, nonce: bytes | None = None) -> bytes:
        return ocsp_request(cert, self.ca.intermediate_cert, nonce)


BASE = "http://ca.test"


def result_of(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


class FakeReactor(Clock):
    """Time plus callFromThread: what deferToThreadPool needs from a reactor."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(time.time())

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


@attrs.define
class FakeThreadPool:
    """Queues work; the test decides when the "thread" runs it."""

    jobs: list[tuple[Callable[..., Any], Callable[..., Any]]] = attrs.field(factory=list)

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        self.jobs.append((on_result, lambda: f(*args, **kwargs)))

    def run(self) -> None:
        """Run every queued job (and any queued while running)."""
        while self.jobs:
            on_result, work = self.jobs.pop(0)
            try:
                result = work()
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
