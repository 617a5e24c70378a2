"""The seams between the gateway's parts: value types, refusal reasons and interfaces.

The data path (listener, connector, relay) only talks to the trust store, the authorizer and
the status checker through these, so each can be replaced by a fake that passes the same tests.
An interface declares everything its callers use. What a part offers beyond ``check`` (a cache,
stapling, a readiness probe) is its own interface, and the wiring (:mod:`s2sgw.service`) hands
each caller the object providing it, or None: nobody probes a collaborator for a method.
"""

from __future__ import annotations

import datetime
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
    CLOSED_BEFORE_HANDSHAKE = "closed_before_handshake"  # the client left before any TLS error or verdict
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
    NO_DESCRIPTORS = "no_descriptors"  # closed at accept: the process ran out of file descriptors
    TOO_MANY_PENDING = "too_many_pending"  # inbound: max_pending connections not yet authorized
    TOO_MANY_PENDING_FROM_SOURCE = "too_many_pending_from_source"  # inbound: max_pending_per_source from one address
    BACKEND_UNREACHABLE = "backend_unreachable"
    REMOTE_UNREACHABLE = "remote_unreachable"
    REMOTE_REFUSED = "remote_refused"  # outbound: the remote gateway refused us with a TLS alert
    # closes of admitted connections
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"
    PEER_CLOSED = "peer_closed"
    BACKEND_CLOSED = "backend_closed"  # inbound: the backend ended a live connection first
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
    """Whether a peer's certificate is still good: the authorizer and the enforcer ask it."""

    def check(leaf: x509.Certificate, issuer: x509.Certificate):  # -> Deferred[CertStatus]
        """Fire with a verified CertStatus, or fail with StatusUnavailable / StatusInvalid."""

    def close():  # -> Deferred[None]
        """Release what the checker holds open (kept-alive connections to the CA); fire when done."""


class IStatusCache(Interface):
    """Answers a checker holds without asking the CA, and the revocations pushed into it.

    The enforcer re-validates live connections from it and hands it each revocation of the feed.
    """

    def lookup(leaf: x509.Certificate, issuer: x509.Certificate):  # -> CertStatus | None
        """The held, still fresh status of ``leaf``, or None; never asks the CA."""

    def revoke(serial: int, revoked_at: datetime.datetime | None = None, reason: str | None = None) -> None:
        """Answer ``revoked`` for ``serial`` from now on, without asking (a pushed revocation)."""


class IStatusCacheStats(Interface):
    """How a caching checker has answered so far: the ``/status`` document and the metrics read it."""

    hits = Attribute("int: checks answered without a query (cached answer or pushed revocation)")
    misses = Attribute("int: checks that needed an answer from the CA (joined queries included)")
    queries = Attribute("int: OCSP queries sent for checks")
    cache_entries = Attribute("int: answers held in the cache now")


class IStapleSource(Interface):
    """OCSP stapling: answers about our own certificates to staple, and staples peers send us."""

    def fetch_staple(leaf: x509.Certificate, issuer: x509.Certificate):  # -> Deferred[(bytes, CertStatus)]
        """Ask for a nonce-less answer about our own ``leaf``: fire with (raw DER, verified status)."""

    def accept_staple(leaf: x509.Certificate, issuer: x509.Certificate, der: bytes):  # -> CertStatus
        """Verify an answer a peer stapled about ``leaf`` and remember what it proves.

        Raises StatusInvalid / StatusUnavailable when it does not verify; nothing is remembered then.
        """


class IStatusProbe(Interface):
    """Readiness: is the CA status server answering? A real query past any cache."""

    def in_use() -> str:
        """The status servers asked now, in words (named in the log)."""

    def probe(leaf: x509.Certificate, issuer: x509.Certificate):  # -> Deferred[CertStatus]
        """Ask about ``leaf`` now, past the cache, with a fresh nonce; store nothing."""


class IAuthorizer(Interface):
    def authorize(route, chain: Sequence[x509.Certificate]):  # -> Deferred[Decision]
        """Decide on a peer whose chain OpenSSL verified (leaf first, then issuers to the root).

        ``route`` is an InboundRoute (identity must be on ``route.allow``) or an OutboundRoute
        (identity must be ``route.peer``); then the status check. Never fails: errors are
        refusals with a reason.
        """

    def accept_staple(route, chain: Sequence[x509.Certificate], der: bytes):  # -> CertStatus | None
        """Take an OCSP answer the remote stapled to its handshake, before ``authorize``.

        A valid one answers the status check without a query. Never raises: returns None when
        the staple is not used (invalid, or no stapling support).
        """


class IConnectionCreators(Interface):
    """TLS for a route's connections: creators presenting a service's current certificate."""

    def server_creator(service: str):
        """IOpenSSLServerConnectionCreator for ``service``'s inbound listeners (client cert required)."""

    def client_creator(service: str, hostname: str):
        """IOpenSSLClientConnectionCreator presenting ``service``'s certificate."""


class ITrustStore(IConnectionCreators):
    """The gateway's trust material: the current snapshot, reloads, and what the parts read from it.

    Routes take connection creators; the monitor, the ``/status`` document, the authorizer's
    current routes, the enforcer's chain checks, stapling and the CRL refresh read the rest.
    """

    generation = Attribute("int: bumped by every successful reload")
    material = Attribute("TrustMaterial: the current snapshot (services, roots, CRLs, config)")
    config = Attribute("GatewayConfig: the configuration in use")
    trust_domain = Attribute("str | None: the SPIFFE trust domain of the bundle")
    crl = Attribute("x509.CertificateRevocationList | None: the CRL in use (mode crl)")
    staples = Attribute("StapleCache: our own OCSP answers, read by the server contexts")
    last_reload = Attribute("datetime.datetime | None: when a reload last swapped in new material")
    reload_failures = Attribute("int: reloads that failed and kept the material in use")

    def reload():  # -> Deferred[int]
        """Load and check all material off the reactor, swap atomically, fire the new generation.

        On any failure the old material stays and the Deferred fails with ConfigError.
        """

    def status():  # -> dict[str, Any]
        """The trust store's part of the ``/status`` document: plain JSON types, no secrets."""

    def route(name: str):  # -> InboundRoute | OutboundRoute | None
        """The current configuration of route ``name`` (allow-lists change on reload), or None."""

    def service(name: str):  # -> ServiceMaterial
        """The current material of service ``name`` (certificate chain and key); KeyError if none."""

    def verify_chain(chain: Sequence[x509.Certificate]) -> bool:
        """Whether ``chain`` (leaf first) still verifies against the current roots, now."""

    def check_crl_bytes(data: bytes, source: str = "fetched CRL"):  # -> x509.CertificateRevocationList
        """Check a CRL before it is written, as a reload would; raise ConfigError if it fails."""


class ICAStore(Interface):
    """The CA's durable state: the SQLite file of one directory, or a PostgreSQL database that
    several status servers share. Blocking: call from threads, never on a reactor."""

    def meta():  # -> dict[str, object]
        """Schema version, trust domain, key type, URL and the counters; StoreError if not ours."""

    def migrate() -> None:
        """Bring a store made by an earlier version up to this schema (no-op when current)."""

    def keep_open() -> None:
        """Get ready for a long-running server (open what a server keeps open; fail early)."""

    def insert(row, *, claim=None) -> None:
        """Record a signed certificate; SerialInUse if the serial was taken. ``claim(connection, row)``
        runs first in the same transaction (a token spent); if it raises, nothing is recorded."""

    def get(serial: int, kind: str = "leaf"):  # -> Row | None
        """One certificate by serial."""

    def rows(kind: str = "leaf"):  # -> list[Row]
        """Every certificate of a kind, oldest first."""

    def revoked_since(seq: int):  # -> list[Row]
        """Revocations with a sequence number above ``seq``, in order (contiguous from 1)."""

    def revoke(*, name, serial, reason: str, revoked_at: datetime.datetime):  # -> list[Row]
        """Revoke the matching unrevoked leaves in one transaction; NotRevocable if none."""

    def revoke_intermediate(serial: int, *, reason: str, revoked_at: datetime.datetime):  # -> Row
        """Mark an issuing CA revoked (for the root's CRL); NotRevocable if unknown or revoked."""

    def next_crl_number():  # -> tuple[int, list[Row]]
        """A CRL number greater than every one taken before, with every revoked leaf."""

    def crl_number() -> int:
        """The last CRL number taken (0 before the first)."""

    def publish_crl(number: int, der: bytes) -> None:
        """Offer a signed CRL to the other status servers on this store (kept if the highest)."""

    def published_crl(above: int):  # -> tuple[int, bytes] | None
        """The highest CRL a status server published, if numbered above ``above``."""

    def change_marker() -> int:
        """A counter bumped by every issue, revoke and CRL number taken."""

    def transaction():  # -> context manager of a connection taking "?" placeholders
        """A write transaction for tables beside the certificates (enrollment tokens)."""

    def connection():  # -> context manager of a connection taking "?" placeholders
        """A connection for reads outside a transaction."""

    def watch(on_change, on_error):  # -> Callable[[], None] | None
        """Call ``on_change`` from a thread after each committed change, if the store can push;
        returns a stop function, or None when the server must poll."""
