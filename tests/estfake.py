"""A fake EST server (RFC 7030) for the gateway's enrollment tests, shaped like the CA's contract.

It answers ``/cacerts``, ``/simpleenroll`` (HTTP Basic ``NAME:TOKEN``, one use per token) and
``/simplereenroll`` (the client certificate names the identity), records every request, and can
be told to fail. It runs behind ``treq.testing.StubTreq`` (the client certificate then comes from
the TLS policy the client used) or as a real HTTPS site on loopback (:func:`serve_tls`).
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from s2sgw import pki, tls
from s2sgw.wire import est
from tests.pkifactory import TestCA

UTC = datetime.UTC


@attrs.define
class Seen:
    """One request as the server saw it."""

    method: str
    operation: str
    authorization: str | None
    client: str | None  # identity of the TLS client certificate, if any
    policy: str | None = None  # StubTreq only: the TLS policy class the client used


@attrs.frozen
class _PublicOnly:
    """TestCA.issue wants a key; only its public half is used."""

    key: Any

    def public_key(self) -> Any:
        return self.key


class FakeEST(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        ca: TestCA,
        clock: Callable[[], float],
        tokens: dict[str, str] | None = None,
        lifetime: float = 60.0,
        extra_roots: tuple[x509.Certificate, ...] = (),
    ) -> None:
        super().__init__()
        self.ca = ca
        self.clock = clock
        self.tokens = dict(tokens or {})
        self.lifetime = lifetime
        self.roots: list[x509.Certificate] = [ca.root, *extra_roots]
        self.seen: list[Seen] = []
        self.issued: list[x509.Certificate] = []
        self.fail_with: list[int] = []  # statuses to answer the next enrollment requests with
        self.stub_client: tuple[x509.Certificate, ...] = ()  # StubTreq: the policy's certificate
        self.stub_policy: str | None = None

    def render(self, request: server.Request) -> bytes:
        operation = request.path.decode().rsplit("/", 1)[-1]
        authorization = request.getHeader(b"authorization")
        client = self._client_certificate(request)
        self.seen.append(
            Seen(request.method.decode(), operation, authorization, client and pki.identity(client), self.stub_policy)
        )
        if not request.path.decode().startswith(est.WELL_KNOWN + "/"):
            return self._error(request, 404, b"not found")
        if self.fail_with and request.method == b"POST":
            code = self.fail_with.pop(0)
            if code == 429:
                request.setHeader(b"retry-after", b"7")
            return self._error(request, code, b"told to fail")
        if operation == est.CACERTS and request.method == b"GET":
            return self._certs(request, [*self.roots, self.ca.intermediate])
        if request.method != b"POST":
            return self._error(request, 405, b"method not allowed")
        try:
            csr = est.decode_csr(request.content.read())
        except est.WireFormatError:
            return self._error(request, 400, b"bad CSR")
        if not csr.is_signature_valid:
            return self._error(request, 400, b"bad CSR signature")
        if operation == est.SIMPLEENROLL:
            name = self._token_name(authorization)
            if name is None:
                return self._error(request, 401, b"bad or used token")
        elif operation == est.SIMPLEREENROLL:
            if client is None or client.not_valid_after_utc < self._now():
                return self._error(request, 403, b"no current client certificate")
            name = (pki.spiffe_id(client) or "").rsplit("/", 1)[-1]
        else:
            return self._error(request, 404, b"not found")
        return self._certs(request, [self.issue(name, csr.public_key()), self.ca.intermediate])

    def issue(self, name: str, public_key: Any) -> x509.Certificate:
        start = self._now() - datetime.timedelta(seconds=min(300.0, self.lifetime / 10))
        leaf = self.ca.issue(
            name,
            key=_PublicOnly(public_key),  # type: ignore[arg-type]
            not_before=start,
            not_after=self._now() + datetime.timedelta(seconds=self.lifetime),
        ).leaf
        self.issued.append(leaf)
        return leaf

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock(), UTC)

    def _token_name(self, authorization: bytes | None) -> str | None:
        if authorization is None or not authorization.startswith(b"Basic "):
            return None
        try:
            name, token = base64.b64decode(authorization[6:]).decode().split(":", 1)
        except (ValueError, UnicodeDecodeError):
            return None
        if self.tokens.get(name) != token:
            return None
        del self.tokens[name]
        return name

    def _client_certificate(self, request: server.Request) -> x509.Certificate | None:
        if self.stub_client:
            return self.stub_client[0]
        getter = getattr(request.transport, "getPeerCertificate", None)
        peer = getter() if getter is not None else None
        return peer.to_cryptography() if peer is not None else None

    @staticmethod
    def _certs(request: server.Request, certificates: list[x509.Certificate]) -> bytes:
        request.setHeader(b"content-type", est.CERTS_ONLY_CONTENT_TYPE.encode())
        request.setHeader(b"content-transfer-encoding", b"base64")
        return est.encode_certs_only(certificates)

    @staticmethod
    def _error(request: server.Request, code: int, words: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return words + b"\n"


@attrs.define(eq=False)
class RecordingHTTP:
    """``http(policy)`` for :class:`s2sgw.enroll.client.ESTClient` over StubTreq: tells the fake
    which policy (and client certificate) each request was made under."""

    fake: FakeEST
    stub: Any

    def __call__(self, policy: Any) -> Any:
        fake, stub = self.fake, self.stub

        class _Bound:
            def request(self, method: str, url: str, **kwargs: Any) -> Any:
                fake.stub_policy = type(policy).__name__
                fake.stub_client = tuple(getattr(policy, "chain", ()))
                return stub.request(method, url, **kwargs)

        return _Bound()


def server_identity(ca: TestCA, names: list[x509.GeneralName]) -> tuple[list[x509.Certificate], Any]:
    """A serverAuth certificate (chain) and key for the fake's HTTPS listener."""
    identity = ca.issue("est", sans=names, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    return identity.chain, identity.key


def serve_tls(reactor: Any, fake: FakeEST, chain: list[x509.Certificate], key: Any) -> Any:
    """Listen on 127.0.0.1 (any port) with TLS; a client certificate is asked for, not required.
    Fires with the listening port."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(chain[0])
    for certificate in chain[1:]:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(key)
    store = context.get_cert_store()
    for root in fake.roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    context.set_verify(SSL.VERIFY_PEER, lambda connection, certificate, errno, depth, ok: bool(ok))
    creator = tls.ServerConnectionCreator(lambda: context)
    factory = TLSMemoryBIOFactory(creator, False, server.Site(fake))
    return endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


def loopback_names() -> list[x509.GeneralName]:
    import ipaddress

    return [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]

