"""The seams between the gateway's parts: value types, refusal reasons and interfaces.

The data path (listener, connector, relay) only talks to the trust store, the authorizer and
the status checker through these, so each can be replaced by a fake that passes the same tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from cryptography import x509
from zope.interface import Attribute, Interface


class Reason:
    """Stable reason codes for refusals and closes: audit log, metrics labels, docs."""

    OK = "ok"
    # TLS handshake / chain (decided by OpenSSL with our verify callback)
    NO_CLIENT_CERT = "no_client_cert"
    UNTRUSTED_CHAIN = "untrusted_chain"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_CERTIFICATE = "bad_certificate"  # wrong EKU, CA:TRUE leaf, weak key or signature
    TLS_ERROR = "tls_error"  # protocol version, ciphers, garbage bytes
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # identity and authorization
    NO_IDENTITY = "no_identity"  # no usable SAN
    IDENTITY_NOT_ALLOWED = "identity_not_allowed"  # inbound: not on the allow-list
    IDENTITY_MISMATCH = "identity_mismatch"  # outbound: remote is not the expected peer
    # status
    REVOKED = "revoked"
    STATUS_UNKNOWN = "status_unknown"
    STATUS_INVALID = "status_invalid"  # bad signature, wrong CertID, stale, wrong nonce
    CA_UNREACHABLE = "ca_unreachable"
    # resources and dialing
    TOO_MANY_CONNECTIONS = "too_many_connections"
    BACKEND_UNREACHABLE = "backend_unreachable"
    REMOTE_UNREACHABLE = "remote_unreachable"
    # closes of admitted connections
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"
    PEER_CLOSED = "peer_closed"
    # identity layer of a route (identity = "http-headers" | "jwt"; see s2sgw/identity/)
    HTTP_BAD_REQUEST = "http_bad_request"  # malformed or oversized request head, bad framing
    HTTP_UPGRADE_REFUSED = "http_upgrade_refused"  # Upgrade / CONNECT: cannot be rewritten
    HTTP_TOO_MANY_HEADERS = "http_too_many_headers"  # more header fields than a head may carry (431)
    JWT_MISSING = "jwt_missing"  # no Authorization: Bearer token
    JWT_INVALID = "jwt_invalid"  # malformed, wrong algorithm or signature, wrong iss/sub, non-numeric time
    JWT_EXPIRED = "jwt_expired"  # exp passed, iat or nbf in the future, or lifetime too long
    JWT_REPLAYED = "jwt_replayed"  # jti seen before (or expiring before ids a full cache forgot)
    JWT_AUDIENCE = "jwt_audience"  # aud is not this service


@attrs.frozen
class Decision:
    """The authorizer's verdict on one peer for one route."""

    allowed: bool
    reason: str  # Reason.OK when allowed (also under fail-open), else a Reason code
    identity: str | None = None  # the peer's SPIFFE ID, else its first DNS SAN
    serial: int | None = None
    detail: str = ""  # plain words for the log (never secrets)










class IStatusChecker(Interface):
    def check(leaf: x509.Certificate, issuer: x509.Certificate):  # -> Deferred[CertStatus]
        """Fire with a verified CertStatus, or fail with StatusUnavailable / StatusInvalid."""


class IAuthorizer(Interface):
    def authorize(route, chain: Sequence[x509.Certificate]):  # -> Deferred[Decision]
        """Decide on a peer whose chain OpenSSL verified (leaf first, then issuers to the root).

        ``route`` is an InboundRoute (identity must be on ``route.allow``) or an OutboundRoute
        (identity must be ``route.peer``); then the status check. Never fails: errors are
        refusals with a reason.
        """


class ITrustStore(Interface):
    generation = Attribute("int: bumped by every successful reload")

    def server_creator(service: str):
        """IOpenSSLServerConnectionCreator for ``service``'s inbound listeners (client cert required)."""

    def client_creator(service: str, hostname: str):
        """IOpenSSLClientConnectionCreator presenting ``service``'s certificate."""

    def reload():  # -> Deferred[int]
        """Load and check all material off the reactor, swap atomically, fire the new generation.

        On any failure the old material stays and the Deferred fails with ConfigError.
        """
