"""Is a peer's certificate still good? OCSP codec, OCSP client with cache, CRL and "off" checkers.

``cryptography.x509.ocsp`` builds and parses OCSP messages but verifies nothing, so the codec
below checks what an answer must prove before we trust it: who signed it (our CA, or a responder
certificate our CA issued for OCSP signing), that the signature holds, that it answers our
question (CertID), that it is current (thisUpdate/nextUpdate) and, if it echoes a nonce, that
the nonce is ours.

Nonce policy: every query carries a fresh nonce. The CA's responder may answer from a cache of
nonce-less answers (RFC 5019 style), so an answer *without* a nonce extension is accepted and its
freshness rests on thisUpdate/nextUpdate (and, without nextUpdate, on a maximum age). An answer
*with* a nonce must carry ours.
"""

from __future__ import annotations

import collections
import datetime
import os
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from s2sgw import pki
from s2sgw.config import StatusConfig
from s2sgw.interfaces import CertStatus, IStatusChecker, StatusInvalid, StatusUnavailable

OCSP_REQUEST_TYPE = b"application/ocsp-request"
MAX_RESPONSE_BYTES = 64 * 1024
DEFAULT_LEEWAY = datetime.timedelta(seconds=60)

# Hashes we accept for signatures on answers; MD5 and SHA-1 are forgeable.
_SIGNATURE_HASHES = ("sha224", "sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512")

_UNAVAILABLE_STATUSES = {
    ocsp.OCSPResponseStatus.TRY_LATER,
    ocsp.OCSPResponseStatus.INTERNAL_ERROR,
}

# Bounded label values for metrics.
OUTCOMES = ("good", "revoked", "unknown", "unavailable", "invalid")

QUERY_SECONDS = Histogram(
    "s2sgw_status_query_seconds",
    "Duration of OCSP queries to the CA status server.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
QUERY_OUTCOMES = Counter(
    "s2sgw_status_queries",
    "OCSP queries to the CA status server, by outcome.",
    ["outcome"],
)
CACHE_LOOKUPS = Counter(
    "s2sgw_status_cache_lookups",
    "Status checks by how they were answered: hit (cache), miss (new query), coalesced "
    "(joined a query already in flight), revoked (revocation pushed to the checker).",
    ["result"],
)


# ---------------------------------------------------------------------------------------------
# codec (pure)


@attrs.frozen
class OCSPQuery:
    """One OCSP request as sent, with what its answer must match."""

    der: bytes
    serial: int
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    hash_algorithm: str  # e.g. "sha1"
    nonce: bytes | None


def new_nonce(size: int = 16) -> bytes:
    """A fresh random nonce (RFC 8954 allows 1..32 bytes; 16 is what OpenSSL sends)."""
    if not 1 <= size <= 32:
        raise ValueError("nonce size must be 1..32 bytes")
    return os.urandom(size)


def build_request(
    leaf: x509.Certificate, issuer: x509.Certificate, *, nonce: bytes | None
) -> OCSPQuery:
    """An OCSP request for ``leaf`` with a SHA-1 CertID, as RFC 5019 responders expect."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    request = builder.build()
    return OCSPQuery(
        der=request.public_bytes(serialization.Encoding.DER),
        serial=request.serial_number,
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        hash_algorithm=request.hash_algorithm.name,
        nonce=nonce,
    )


def verify_signature(
    public_key: object,
    signature: bytes,
    data: bytes,
    hash_algorithm: hashes.HashAlgorithm | None,
) -> None:
    """Check ``signature`` over ``data``: ECDSA, RSA PKCS#1 v1.5, Ed25519 or Ed448.

    Raises StatusInvalid on a bad signature, an unsupported key type or a weak hash.
    """
    try:
        if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
            return
        if hash_algorithm is None or hash_algorithm.name not in _SIGNATURE_HASHES:
            name = hash_algorithm.name if hash_algorithm is not None else "none"
            raise StatusInvalid(f"signature hash {name} is not accepted")
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
        else:
            raise StatusInvalid(f"unsupported signer key type {type(public_key).__name__}")
    except InvalidSignature:
        raise StatusInvalid("signature does not verify") from None


def _key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits: the byKey responder ID (RFC 6960 4.2.1)."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _names_signer(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == certificate.subject
    return response.responder_key_hash == _key_hash(certificate)


def _check_delegate(
    signer: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime, leeway: datetime.timedelta
) -> None:
    """A delegated responder must be issued by the CA that issued the leaf, for OCSP signing."""
    try:
        signer.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise StatusInvalid(f"responder certificate is not issued by the leaf's issuer: {e}") from None
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise StatusInvalid("responder certificate has no extendedKeyUsage") from None
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise StatusInvalid("responder certificate lacks extendedKeyUsage OCSPSigning")
    if now + leeway < signer.not_valid_before_utc or now > signer.not_valid_after_utc:
        raise StatusInvalid("responder certificate is outside its validity period")


def _find_signer(
    response: ocsp.OCSPResponse,
    issuer: x509.Certificate,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> x509.Certificate:
    if _names_signer(response, issuer):
        return issuer
    candidates = [c for c in response.certificates if _names_signer(response, c)]
    if not candidates:
        raise StatusInvalid("responder is neither the issuer nor a certificate in the answer")
    _check_delegate(candidates[0], issuer, now, leeway)
    return candidates[0]


def _reason_text(reason: x509.ReasonFlags | None) -> str | None:
    return reason.value if reason is not None else None


def verify_response(
    der: bytes,
    query: OCSPQuery,
    issuer: x509.Certificate,
    *,
    now: datetime.datetime,
    leeway: datetime.timedelta = DEFAULT_LEEWAY,
    max_age: datetime.timedelta = datetime.timedelta(minutes=5),
) -> CertStatus:
    """Parse and verify an OCSP answer to ``query``; return the certificate's status.

    ``leeway`` absorbs clock differences on thisUpdate/nextUpdate; ``max_age`` bounds the age of
    an answer without nextUpdate. Raises StatusUnavailable (tryLater, internalError) or
    StatusInvalid (anything that does not verify).
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise StatusInvalid(f"answer is not an OCSP response: {e}") from None
    status = response.response_status
    if status in _UNAVAILABLE_STATUSES:
        raise StatusUnavailable(f"responder answered {status.name}")
    if status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise StatusInvalid(f"responder answered {status.name}")

    try:
        signer = _find_signer(response, issuer, now, leeway)
        verify_signature(
            signer.public_key(),
            response.signature,
            response.tbs_response_bytes,
            response.signature_hash_algorithm,
        )
        single = _matching_single(response, query)
        this_update = single.this_update_utc
        next_update = single.next_update_utc
        if this_update > now + leeway:
            raise StatusInvalid(f"answer thisUpdate {this_update.isoformat()} is in the future")
        if next_update is not None:
            if next_update < this_update:
                raise StatusInvalid("answer nextUpdate precedes thisUpdate")
            if next_update + leeway < now:
                raise StatusInvalid(f"answer is stale: nextUpdate {next_update.isoformat()} has passed")
        elif this_update + max_age + leeway < now:
            raise StatusInvalid(f"answer without nextUpdate is older than {max_age}")
        if query.nonce is not None:
            _check_nonce(response, query.nonce)
        cert_status = single.certificate_status
        if cert_status == ocsp.OCSPCertStatus.GOOD:
            return CertStatus("good", this_update, next_update)
        if cert_status == ocsp.OCSPCertStatus.REVOKED:
            return CertStatus(
                "revoked",
                this_update,
                next_update,
                revoked_at=single.revocation_time_utc,
                revocation_reason=_reason_text(single.revocation_reason),
            )
        return CertStatus("unknown", this_update, next_update)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # cryptography raises these for malformed fields met lazily (extensions, times, keys).
        raise StatusInvalid(f"malformed OCSP response: {e}") from None


def _matching_single(response: ocsp.OCSPResponse, query: OCSPQuery) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if (
            single.serial_number == query.serial
            and single.hash_algorithm.name == query.hash_algorithm
            and single.issuer_name_hash == query.issuer_name_hash
            and single.issuer_key_hash == query.issuer_key_hash
        ):
            return single
    raise StatusInvalid(f"answer has no status for serial {query.serial:x} from this issuer")


def _check_nonce(response: ocsp.OCSPResponse, nonce: bytes) -> None:
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return  # a cached, nonce-less answer: freshness rests on the time window
    if echoed != nonce:
        raise StatusInvalid("answer nonce does not match the request")


# ---------------------------------------------------------------------------------------------
# OCSP client


class ResponseTooLarge(Exception):
    """The status server sent more than we are willing to read."""


class _LimitedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; drops the connection past that."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self._done = False
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done = True
            self._chunks.clear()
            self.transport.stopProducing()
            self.finished.errback(ResponseTooLarge(f"answer larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _cancel(self, _: Deferred) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.stopProducing()


def read_limited(response, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """The body of a treq/Agent response, failing with ResponseTooLarge past ``limit`` bytes."""
    protocol = _LimitedBody(limit)
    response.deliverBody(protocol)
    return protocol.finished


def _describe(failure: Failure) -> str:
    """One line for a transport failure; Agent wraps its causes in a list of Failures."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    return f"{failure.type.__name__}: {failure.getErrorMessage()}".rstrip(": ")


@attrs.frozen
class _Entry:
    status: CertStatus
    expires: float  # clock seconds


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _default_http(reactor):
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return HTTPClient(Agent(reactor, pool=pool)), pool


@implementer(IStatusChecker)
@attrs.define(eq=False)
class OCSPStatusChecker:
    """Asks the CA status server over HTTP, verifies, caches and coalesces.

    Good and revoked answers are cached per (issuer key hash, serial) until their nextUpdate,
    capped at ``max_cache_age`` seconds, so repeated connections of one peer cost no query.
    Concurrent checks of one certificate share one query.
    """

    url: str
    clock: IReactorTime
    http: object = None  # treq-like: .post(url, data=, headers=); default treq over an Agent
    timeout: float = 2.0
    max_cache_age: float = 300.0
    cache_size: int = 10000
    leeway: datetime.timedelta = DEFAULT_LEEWAY
    max_body: int = MAX_RESPONSE_BYTES
    nonce_source: Callable[[], bytes] = new_nonce
    hits: int = 0
    misses: int = 0
    queries: int = 0
    _cache: collections.OrderedDict = attrs.field(init=False, factory=collections.OrderedDict)
    _revoked: collections.OrderedDict = attrs.field(init=False, factory=collections.OrderedDict)
    _inflight: dict = attrs.field(init=False, factory=dict)
    _pool: object = attrs.field(init=False, default=None)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            self.http, self._pool = _default_http(self.clock)

    def close(self) -> Deferred[None]:
        """Close kept-alive connections to the status server (a service's stopService)."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    # -- IStatusChecker

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        """Fire with a verified CertStatus, or fail with StatusUnavailable / StatusInvalid."""
        serial = leaf.serial_number
        pushed = self._revoked.get(serial)
        if pushed is not None:
            CACHE_LOOKUPS.labels("revoked").inc()
            self.hits += 1
            return defer.succeed(pushed)
        key = (_key_hash(issuer), serial)
        cached = self.lookup_key(key)
        if cached is not None:
            CACHE_LOOKUPS.labels("hit").inc()
            self.hits += 1
            return defer.succeed(cached)
        self.misses += 1
        waiters = self._inflight.get(key)
        start = waiters is None
        if start:
            query = build_request(leaf, issuer, nonce=self.nonce_source())
            waiters = self._inflight[key] = []
        CACHE_LOOKUPS.labels("miss" if start else "coalesced").inc()

        def cancel(d: Deferred) -> None:
            if d in waiters:
                waiters.remove(d)

        waiter: Deferred[CertStatus] = Deferred(cancel)
        waiters.append(waiter)
        if start:
            # after appending: a query that fails synchronously settles its waiters at once
            self._query(key, query, issuer)
        return waiter

    # -- cache access and hooks for a revocation feed

    def lookup(self, leaf: x509.Certificate, issuer: x509.Certificate) -> CertStatus | None:
        """The cached, still fresh status of ``leaf``, without asking the CA."""
        pushed = self._revoked.get(leaf.serial_number)
        if pushed is not None:
            return pushed
        key = (_key_hash(issuer), leaf.serial_number)
        return self.lookup_key(key)

    def lookup_key(self, key: tuple[bytes, int]) -> CertStatus | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock.seconds():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.status

    def forget(self, serial: int) -> None:
        """Drop cached answers for ``serial`` so that the next check asks the CA again."""
        for key in [k for k in self._cache if k[1] == serial]:
            del self._cache[key]

    def revoke(
        self,
        serial: int,
        revoked_at: datetime.datetime | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer ``revoked`` for ``serial`` from now on, without asking (a pushed revocation)."""
        self.forget(serial)
        now = _utc(self.clock.seconds())
        self._revoked[serial] = CertStatus(
            "revoked", now, None, revoked_at=revoked_at or now, revocation_reason=reason
        )
        self._revoked.move_to_end(serial)
        while len(self._revoked) > self.cache_size:
            self._revoked.popitem(last=False)

    def remember(self, leaf: x509.Certificate, issuer: x509.Certificate, status: CertStatus) -> bool:
        """Cache a status proven without a query of ours (a verified staple); good/revoked only.

        It never replaces a revocation or a newer answer already cached: a revoked server may
        still hold an older "good" answer within its validity and staple it.
        """
        if status.state not in ("good", "revoked"):
            return False
        key = (_key_hash(issuer), leaf.serial_number)
        known = self.lookup_key(key)
        if known is not None and (known.state == "revoked" or known.this_update >= status.this_update):
            return False
        self._store(key, status)
        return key in self._cache

    def accept_staple(self, leaf: x509.Certificate, issuer: x509.Certificate, der: bytes) -> CertStatus:
        """Verify a stapled (nonce-less) answer about ``leaf`` and cache what it proves.

        Raises StatusInvalid / StatusUnavailable when it does not verify; nothing is cached then.
        """
        status = self._verify(der, build_request(leaf, issuer, nonce=None), issuer)
        self.remember(leaf, issuer, status)
        return status

    def fetch_staple(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[tuple[bytes, CertStatus]]:
        """Ask for a nonce-less answer about our own ``leaf``: (raw DER, verified status).

        For stapling: the DER is handed to peers as is, so it must not carry a nonce; the CA
        answers such queries from its pre-signed cache. Not cached and not counted as a peer check.
        """
        query = build_request(leaf, issuer, nonce=None)
        d = defer.maybeDeferred(
            self.http.post,
            self.url,
            data=query.der,
            headers={b"Content-Type": [OCSP_REQUEST_TYPE], b"Accept": [b"application/ocsp-response"]},
        )
        d.addCallback(self._read_body)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)
        d.addCallback(lambda body: (body, self._verify(body, query, issuer)))
        d.addErrback(self._classify)
        return d

    # -- internals

    def _query(self, key: tuple[bytes, int], query: OCSPQuery, issuer: x509.Certificate) -> None:
        started = self.clock.seconds()
        self.queries += 1
        d = defer.maybeDeferred(
            self.http.post,
            self.url,
            data=query.der,
            headers={b"Content-Type": [OCSP_REQUEST_TYPE], b"Accept": [b"application/ocsp-response"]},
        )
        d.addCallback(self._read_body)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)
        d.addCallback(self._verify, query, issuer)
        d.addErrback(self._classify)
        d.addBoth(self._settle, key, started)

    def _read_body(self, response) -> Deferred[bytes]:
        body = read_limited(response, self.max_body)
        if response.code != 200:
            code = response.code

            def refuse(_: object) -> None:
                raise StatusUnavailable(f"status server answered HTTP {code}")

            body.addBoth(refuse)
        return body

    def _verify(self, body: bytes, query: OCSPQuery, issuer: x509.Certificate) -> CertStatus:
        return verify_response(
            body,
            query,
            issuer,
            now=_utc(self.clock.seconds()),
            leeway=self.leeway,
            max_age=datetime.timedelta(seconds=self.max_cache_age),
        )

    def _timed_out(self, result: object, timeout: float) -> Failure:
        # Agent wraps the cancellation (ResponseNeverReceived), so say what happened here.
        return Failure(StatusUnavailable(f"status query timed out after {timeout}s"))

    def _classify(self, failure: Failure) -> Failure:
        """Map transport failures to StatusUnavailable; leave verification failures as they are."""
        if failure.check(StatusUnavailable, StatusInvalid):
            return failure
        if failure.check(ResponseTooLarge):
            return Failure(StatusInvalid(str(failure.value)))
        # connection refused, reset, DNS, HTTP parse errors: the CA could not be asked
        return Failure(StatusUnavailable(f"status query failed: {_describe(failure)}"))

    def _settle(self, result: CertStatus | Failure, key: tuple[bytes, int], started: float) -> None:
        QUERY_SECONDS.observe(max(0.0, self.clock.seconds() - started))
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            outcome = "unavailable" if result.check(StatusUnavailable) else "invalid"
            QUERY_OUTCOMES.labels(outcome).inc()
            self._log.info(
                "status query for serial {serial} failed: {error}",
                serial=f"{key[1]:x}",
                error=result.getErrorMessage(),
            )
        else:
            QUERY_OUTCOMES.labels(result.state).inc()
            if result.state in ("good", "revoked"):
                self._store(key, result)
            pushed = self._revoked.get(key[1])
            if pushed is not None:
                result = pushed  # revoked while we were asking
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    def _store(self, key: tuple[bytes, int], status: CertStatus) -> None:
        now = self.clock.seconds()
        expires = now + self.max_cache_age
        if status.next_update is not None:
            expires = min(expires, status.next_update.timestamp())
        else:
            expires = min(expires, status.this_update.timestamp() + self.max_cache_age)
        if expires <= now:
            return
        self._cache[key] = _Entry(status, expires)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# CRL and off


@implementer(IStatusChecker)
@attrs.define(eq=False)
class CRLStatusChecker:
    """Answers from local CRLs whose signatures and freshness are checked.

    ``crl`` is the CRL of the CA issuing the leaves; ``others`` may add one CRL per further CA,
    such as the root's. A leaf is looked up in its issuer's CRL, and the issuer (an
    intermediate) in the CRL of *its* issuer when one is held, verified against the one of
    ``authorities`` (the trust bundle's roots) that signed the intermediate: a revoked
    intermediate makes its leaves revoked.
    """

    crl: x509.CertificateRevocationList
    clock: IReactorTime
    issuer: x509.Certificate | None = None  # if given, checked at construction
    leeway: datetime.timedelta = DEFAULT_LEEWAY
    others: tuple[x509.CertificateRevocationList, ...] = ()
    authorities: tuple[x509.Certificate, ...] = ()
    _verified: set = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self.others = tuple(self.others)
        self.authorities = tuple(self.authorities)
        if self.issuer is not None:
            self._verify(self._crl_of(self.issuer.subject, "CRL is not issued by the leaf's issuer"), self.issuer)

    @classmethod
    def from_path(
        cls,
        path: Path,
        clock: IReactorTime,
        issuer: x509.Certificate | None = None,
        authorities: tuple[x509.Certificate, ...] = (),
    ) -> CRLStatusChecker:
        """Load a DER CRL or one or more PEM CRLs (at start-up: the read blocks)."""
        try:
            crls = pki.load_crls(Path(path))
        except pki.PKIError as error:
            raise StatusInvalid(str(error)) from None
        crl = pki.primary_crl(crls, authorities)
        return cls(crl, clock, issuer, others=tuple(c for c in crls if c is not crl), authorities=authorities)

    def replace(
        self,
        crl: x509.CertificateRevocationList,
        others: tuple[x509.CertificateRevocationList, ...] = (),
        authorities: tuple[x509.Certificate, ...] | None = None,
    ) -> None:
        """Swap in newer CRLs (after a reload); they are verified again on first use."""
        authorities = self.authorities if authorities is None else tuple(authorities)
        if self.issuer is not None:
            CRLStatusChecker(crl, self.clock, self.issuer, self.leeway, tuple(others), authorities)  # StatusInvalid
        self.crl, self.others, self.authorities = crl, tuple(others), authorities
        self._verified = set()

    def _crl_of(self, name: x509.Name, missing: str) -> x509.CertificateRevocationList:
        for crl in (self.crl, *self.others):
            if crl.issuer == name:
                return crl
        raise StatusInvalid(missing)

    def _verify(self, crl: x509.CertificateRevocationList, signer: x509.Certificate) -> None:
        key = (id(crl), signer.fingerprint(hashes.SHA256()))
        if key in self._verified:
            return
        if crl.issuer != signer.subject:
            raise StatusInvalid("CRL is not issued by the leaf's issuer")
        try:
            valid = crl.is_signature_valid(signer.public_key())
        except (TypeError, ValueError, UnsupportedAlgorithm):
            valid = False
        if not valid:
            raise StatusInvalid(
                f"CRL of {crl.issuer.rfc4514_string()}: signature does not verify with the issuer's key"
            )
        self._verified.add(key)

    def _signer_of(self, intermediate: x509.Certificate) -> x509.Certificate:
        """The authority whose key signed ``intermediate`` (so its CRL speaks for it)."""
        for candidate in self.authorities:
            if candidate.subject != intermediate.issuer:
                continue
            try:
                intermediate.verify_directly_issued_by(candidate)
            except (TypeError, ValueError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return candidate
        raise StatusInvalid(
            f"a CRL of {intermediate.issuer.rfc4514_string()} is held, but no trusted CA certificate "
            "of that name signed the intermediate"
        )

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        try:
            return defer.succeed(self._status(leaf, issuer))
        except StatusInvalid:
            return defer.fail()

    def _status(self, leaf: x509.Certificate, issuer: x509.Certificate) -> CertStatus:
        now = _utc(self.clock.seconds())
        # The intermediate first: if its issuer revoked it, its leaves are revoked, whether or
        # not we hold the intermediate's own CRL.
        if issuer.issuer != issuer.subject:
            above = next((c for c in (self.crl, *self.others) if c.issuer == issuer.issuer), None)
            if above is not None:
                self._verify(above, self._signer_of(issuer))
                self._fresh(above, now)
                status = self._lookup(above, issuer.serial_number)
                if status.state == "revoked":
                    return status
        crl = self._crl_of(issuer.subject, "CRL is not issued by the leaf's issuer")
        self._verify(crl, issuer)
        self._fresh(crl, now)
        return self._lookup(crl, leaf.serial_number)

    def _fresh(self, crl: x509.CertificateRevocationList, now: datetime.datetime) -> None:
        if crl.last_update_utc > now + self.leeway:
            raise StatusInvalid("CRL lastUpdate is in the future")
        if crl.next_update_utc is None or crl.next_update_utc + self.leeway < now:
            raise StatusInvalid("CRL is stale (nextUpdate passed or absent)")

    def _lookup(self, crl: x509.CertificateRevocationList, serial: int) -> CertStatus:
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        if entry is None:
            return CertStatus("good", this_update, next_update)
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = None
        return CertStatus(
            "revoked",
            this_update,
            next_update,
            revoked_at=entry.revocation_date_utc,
            revocation_reason=reason,
        )


@implementer(IStatusChecker)
@attrs.define(eq=False)
class NoStatusChecker:
    """``mode = "off"``: every certificate that chains to the trust bundle counts as good."""

    clock: IReactorTime

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        return defer.succeed(CertStatus("good", _utc(self.clock.seconds()), None))


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
        now = _utc(self.clock.seconds())
        revoked_at = now if answer == "revoked" else None
        reason = "unspecified" if answer == "revoked" else None
        return defer.succeed(CertStatus(answer, now, None, revoked_at=revoked_at, revocation_reason=reason))


def make_status_checker(
    config: StatusConfig, reactor, authorities: tuple[x509.Certificate, ...] = ()
) -> IStatusChecker:
    """The checker ``config.mode`` asks for (CRL files are read here, at start-up).

    ``authorities`` (the trust bundle's roots and our intermediates) verify a root CRL held
    beside the issuing CA's, in mode ``crl``.
    """
    if config.mode == "off":
        return NoStatusChecker(reactor)
    if config.mode == "crl":
        if config.crl is None:
            raise ValueError("status mode crl needs a crl file")
        return CRLStatusChecker.from_path(config.crl, reactor, authorities=authorities)
    if not config.url:
        raise ValueError("status mode ocsp needs a url")
    return OCSPStatusChecker(
        config.url,
        reactor,
        timeout=config.timeout,
        max_cache_age=config.max_cache_age,
        cache_size=config.cache_size,
    )
