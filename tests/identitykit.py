"""What the identity-layer tests share: names, a request rewriter harness, a listener rig over
in-memory TLS, JWT helpers."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from s2sgw.config import InboundRoute, TimeoutsConfig
from s2sgw.identity.http_headers import (
    IDENTITY_HEADERS,
    IdentityHeaders,
    Refusal,
    RequestRewriter,
)
from s2sgw.identity.jwt_bearer import (
    ReplayCache,
    TokenVerifier,
)
from s2sgw.interfaces import Decision, Reason
from s2sgw.ops.audit import AUDIT_NAMESPACE, AuditLog
from s2sgw.ops.metrics import RouteMetrics
from s2sgw.routes.inbound import InboundListener
from s2sgw.tlstransport import TLSFactory
from tests.tlshelpers import (
    PKI,
    FakeAuthorizer,
    FakeTrustStore,
    HalfCloseCollector,
    Wire,
    WireEndpoint,
    pump_all,
)

CALLER = "spiffe://example.test/users"



US = "spiffe://example.test/orders"



OURS = ((b"X-Forwarded-Client-Cert", b"By=us;Hash=00;URI=caller"), (b"Client-Cert", b":AAAA:"))



def rewrite(data: bytes, cuts: list[int] | None = None, policy: Any = None) -> tuple[RequestRewriter, Run]:
    run = Run()

    def forward(chunk: bytes) -> None:
        run.out.extend(chunk)
        run.writes += 1

    rewriter = RequestRewriter(policy or IdentityHeaders(OURS), forward, run.refusals.append)
    points = sorted(set(c for c in (cuts or []) if 0 < c < len(data)))
    for start, end in zip([0, *points], [*points, len(data)]):
        rewriter.feed(data[start:end])
    return rewriter, run



@attrs.define
class CertForKey:
    """Just enough of a certificate for the verifier: the public key."""

    key: Any

    def public_key(self) -> Any:
        return self.key.public_key()



def _verify(token: str, clock: Clock, key: Any, cache: ReplayCache | None = None, caller: str = CALLER) -> str:
    verifier = TokenVerifier(US, clock, cache if cache is not None else ReplayCache(clock))
    try:
        verifier.verify(token, caller, CertForKey(key))  # type: ignore[arg-type]
    except Refusal as refusal:
        return refusal.reason
    return Reason.OK



@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("ca") / "ca")



@attrs.define(eq=False)
class Rig:
    pki: PKI
    identity: str
    backend: WireEndpoint = attrs.Factory(WireEndpoint)
    clock: MemoryReactorClock = attrs.Factory(MemoryReactorClock)
    wires: list[Wire] = attrs.Factory(list)
    audits: list[dict] = attrs.Factory(list)
    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    listener: InboundListener = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        route = InboundRoute("orders-in", "orders", "tcp:0", "tcp:127.0.0.1:8080", ("users",), identity=self.identity)
        serial = x509.load_pem_x509_certificate(self.pki.identity("users").record.pem).serial_number
        self.listener = InboundListener(
            route,
            FakeTrustStore(servers={"orders": self.pki.options("orders")}),
            FakeAuthorizer(Decision(True, Reason.OK, CALLER, serial)),
            self.clock,
            TimeoutsConfig(),
            metrics=self._registered(RouteMetrics()),
            audit=AuditLog(),
            backend=self.backend,
        )

    def _registered(self, metrics: RouteMetrics) -> RouteMetrics:
        self.registry.register(metrics)
        return metrics

    def connect(self) -> HalfCloseCollector:
        caller = HalfCloseCollector()
        server = self.listener.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        client = TLSFactory(self.pki.options("users"), True, Factory.forProtocol(lambda: caller)).buildProtocol(None)
        self.wires.append(Wire(client, server))
        return caller

    def pump(self) -> None:
        while True:
            count = len(self.backend.wires)
            pump_all(*self.wires, *self.backend.wires)
            if len(self.backend.wires) == count:
                return



@pytest.fixture
def audits() -> Any:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == AUDIT_NAMESPACE:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def spellings(name: bytes) -> list[bytes]:
    """Every ``-``/``_`` choice of ``name``, each in lower, upper and title case."""
    parts = name.split(b"-")
    found = set()
    for separators in itertools.product((b"-", b"_"), repeat=len(parts) - 1):
        for case in (bytes.lower, bytes.upper, bytes.capitalize):
            cased = [case(part) for part in parts]
            found.add(cased[0] + b"".join(sep + part for sep, part in zip(separators, cased[1:])))
    return sorted(found)


FORGED = [spelling for name in sorted(IDENTITY_HEADERS) for spelling in spellings(name)]


@attrs.define
class Run:
    out: bytearray = attrs.Factory(bytearray)
    refusals: list[Refusal] = attrs.Factory(list)
    writes: int = 0
