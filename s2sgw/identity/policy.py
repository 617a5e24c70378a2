"""Tell the backend who called: the identity layer a route adds to its relay.

Routes with ``identity = "none"`` (the default) never reach this module: the listener and the
connector build an identity object only for routes that configure one, so the plain relay path
does no extra work per read. For the others, :meth:`InboundIdentity.attach` runs once per
admitted connection, after the authorizer said yes and the backend is connected:

- ``proxy-v2`` writes a PROXY v2 header to the backend before any byte of the caller;
- ``http-headers`` and ``jwt`` return a sink for the caller's bytes that rewrites each HTTP/1.x
  request head (:mod:`s2sgw.identity.http_headers`, :mod:`s2sgw.identity.jwt_bearer`).

A request the layer refuses gets a small HTTP error answer, and the connection closes with the
refusal's reason code in the audit event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from s2sgw import pki
from s2sgw.config import InboundRoute, OutboundRoute
from s2sgw.identity.http_headers import HeadPolicy, IdentityHeaders, Refusal, RequestRewriter, error_response, identity_headers
from s2sgw.identity.jwt_bearer import AddBearer, ReplayCache, TokenSigner, TokenVerifier, VerifyBearer
from s2sgw.identity.proxy_v2 import CallerInfo, encode_v2
from s2sgw.interfaces import ITrustStore

Sink = Callable[[bytes], None]


def _host_port(address: Any) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return None


def local_certificate(tls: Any) -> x509.Certificate | None:
    """The certificate we presented on an established TLS connection."""
    return tls.getHandle().get_certificate(as_cryptography=True)


def own_spiffe_id(tls: Any) -> str:
    cert = local_certificate(tls)
    identity = pki.spiffe_id(cert) if cert is not None else None
    if not identity:
        raise ValueError("our own certificate carries no SPIFFE ID")
    return identity


def caller_info(tls: Any, leaf: x509.Certificate | None, caller_id: str, tls_version: str, cipher: str) -> CallerInfo:
    """The PROXY v2 facts of one admitted inbound connection."""
    common_name = ""
    if leaf is not None:
        names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if names:
            common_name = str(names[0].value)
    return CallerInfo(
        source=_host_port(tls.getPeer()),
        destination=_host_port(tls.getHost()),
        tls_version=tls_version if tls_version != "-" else "",
        cipher=cipher if cipher != "-" else "",
        spiffe_id=caller_id if caller_id != "-" else "",
        serial=leaf.serial_number if leaf is not None else None,
        common_name=common_name,
    )


def _refuser(client: Any, session: Any) -> Callable[[Refusal], None]:
    """Answer ``client`` with an HTTP error and close its relay with the refusal's reason."""

    def refuse(refusal: Refusal) -> None:
        session.detail = refusal.detail
        if not client.lost and client.transport is not None:
            client.transport.write(error_response(refusal.status, refusal.reason))
        if client.relay is not None:
            client.relay.close(refusal.reason)

    return refuse


@attrs.define(eq=False)
class InboundIdentity:
    """The identity layer of one inbound route; owns the route's JWT replay cache."""

    _log = Logger()

    route: InboundRoute
    clock: IReactorTime
    replay: ReplayCache = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.replay is None:
            self.replay = ReplayCache(self.clock)

    def attach(self, peer: Any, backend: Any) -> Sink | None:
        """Called once per connection before the splice; the sink for the caller's bytes, if any.

        ``peer`` is the caller's :class:`~s2sgw.routes.inbound.InboundSide` (TLS transport, session
        with the decision), ``backend`` the connected backend side.
        """
        session = peer.session
        leaf = session.chain[0] if session.chain else None
        mode = self.route.identity
        if mode == "proxy-v2":
            info = caller_info(peer.transport, leaf, session.peer, session.tls_version, session.cipher)
            backend.transport.write(encode_v2(info))
            return None
        if leaf is None:
            raise ValueError("no caller certificate for the identity layer")
        policy: HeadPolicy
        if mode == "http-headers":
            policy = IdentityHeaders(identity_headers(own_spiffe_id(peer.transport), session.peer, leaf))
        elif mode == "jwt":
            verifier = TokenVerifier(own_spiffe_id(peer.transport), self.clock, self.replay)
            policy = VerifyBearer(verifier, session.peer, leaf, forward=self.route.jwt_forward)
        else:
            raise ValueError(f"unknown identity mode {mode!r}")
        return RequestRewriter(policy, backend.transport.write, _refuser(peer, session)).feed


def _same_key(key: Any, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


@attrs.define(eq=False)
class OutboundIdentity:
    """The identity layer of one outbound route (``identity = "jwt"``): sign every request.

    ``keys(service)`` gives the service's current private key; by default the trust store's
    (which reloads it with the certificate). The key must match the certificate presented on
    the connection, so a reload between handshake and splice refuses that one connection.
    """

    route: OutboundRoute
    clock: IReactorTime
    keys: Callable[[str], Any]

    @classmethod
    def from_trust_store(cls, route: OutboundRoute, clock: IReactorTime, trust_store: ITrustStore) -> OutboundIdentity:
        return cls(route, clock, lambda service: trust_store.service(service).key)

    def attach(self, local: Any, remote: Any, audience: str) -> Sink:
        """The sink for the local client's bytes on a connection to ``audience`` (the peer's ID)."""
        cert = local_certificate(remote.transport)
        key = self.keys(self.route.service)
        if cert is None or not _same_key(key, cert):
            raise ValueError("the service key does not match the certificate presented")
        signer = TokenSigner(key, own_spiffe_id(remote.transport), self.clock)
        return RequestRewriter(AddBearer(signer, audience), remote.transport.write, _refuser(local, local.session)).feed
