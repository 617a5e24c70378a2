"""Who may have which certificate over EST, decided by the CA alone.

The CSR proves possession of a key and nothing else: a certificate's names come from the
enrollment token (first enrollment) or from the certificate being renewed (re-enrollment),
never from the request. A CSR may be silent about names or repeat exactly what the CA would
issue; anything else is refused, so a client learns at once that it asked for something it
will not get. The rule:

* subject: empty, or a single commonName equal to the service NAME;
* extensions: none, or only subjectAltName listing exactly the names the CA will put in the
  certificate (any order);
* the signature verifies, and the key passes :func:`s2sgw.wire.est.key_policy_problem`.

Everything here is blocking (SQLite, signing) and runs in a thread; it returns results or raises
:class:`Refusal`, and the HTTP layer logs and answers on the reactor.
"""

from __future__ import annotations

import collections
import datetime
import sqlite3
import threading
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from s2sgw.ca.authority import CertificateAuthority, CertRecord
from s2sgw.ca.store import Row
from s2sgw.ca.tokens import TokenBook, TokenRefused
from s2sgw.serials import serial_text
from s2sgw.wire import est as wire

# HTTP statuses of refusals (docs/enrollment.rst).
BAD_REQUEST, UNAUTHORIZED, FORBIDDEN, TOO_MANY = 400, 401, 403, 429

DEFAULT_LIFETIME = datetime.timedelta(hours=24)
DEFAULT_RATE_LIMIT = 10  # issuances per identity per window
RATE_WINDOW = 60.0


class Refusal(Exception):
    """A request that gets no certificate: the HTTP status and the reason for the log."""

    def __init__(self, status: int, reason: str, *, identity: str = "-", retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.identity = identity
        self.retry_after = retry_after


@attrs.frozen
class PeerCertificate:
    """The certificate a TLS client presented, and whether OpenSSL chained it to our roots."""

    certificate: x509.Certificate
    chain_ok: bool
    chain_error: str = ""


@attrs.frozen
class Issued:
    """A certificate issued over EST: what to answer and what to log."""

    record: CertRecord
    chain: tuple[x509.Certificate, ...]  # the leaf and the issuing intermediate
    identity: str  # the SPIFFE ID
    via: str  # "token" or "renewal"


@attrs.define(eq=False)
class RateLimiter:
    """At most ``limit`` issuances per identity in any ``window`` seconds (0 means no limit).

    Called from request threads, hence the lock. A slot is taken before signing and given back
    if the issuance fails, so concurrent requests cannot overshoot the limit together.
    """

    limit: int = DEFAULT_RATE_LIMIT
    window: float = RATE_WINDOW
    _slots: dict[str, collections.deque[float]] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def take(self, identity: str, now: float) -> float | None:
        """Take a slot at ``now``; None when taken, else the seconds until one frees up."""
        if self.limit <= 0:
            return None
        with self._lock:
            slots = self._slots.setdefault(identity, collections.deque())
            while slots and slots[0] <= now - self.window:
                slots.popleft()
            if len(slots) >= self.limit:
                return max(1.0, slots[0] + self.window - now)
            slots.append(now)
            self._prune(now)
            return None

    def give_back(self, identity: str, now: float) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            slots = self._slots.get(identity)
            if slots and now in slots:
                slots.remove(now)
            if not slots:
                self._slots.pop(identity, None)

    def _prune(self, now: float) -> None:
        """Forget identities with no slot in the window, so memory follows issuances, not names."""
        if len(self._slots) < 1024:
            return
        for identity in [i for i, s in self._slots.items() if not s or s[-1] <= now - self.window]:
            del self._slots[identity]


def check_csr(body: bytes, name: str, sans: Sequence[x509.GeneralName]) -> x509.CertificateSigningRequest:
    """The request in ``body`` if it may be certified as ``name`` with ``sans``; else ``Refusal`` (400)."""
    try:
        csr = wire.decode_csr(body)
    except wire.WireFormatError as error:
        raise Refusal(BAD_REQUEST, str(error), identity=name) from None
    try:
        signed = csr.is_signature_valid
        public_key = csr.public_key()
    except Exception as error:  # unsupported algorithms raise instead of answering False
        raise Refusal(BAD_REQUEST, f"CSR cannot be checked: {error}", identity=name) from None
    if not signed:
        raise Refusal(BAD_REQUEST, "CSR signature does not verify", identity=name)
    problem = wire.key_policy_problem(public_key)
    if problem is not None:
        raise Refusal(BAD_REQUEST, f"weak key: {problem}", identity=name)
    subject = list(csr.subject)
    if subject and not (
        len(subject) == 1 and subject[0].oid == NameOID.COMMON_NAME and subject[0].value == name
    ):
        raise Refusal(BAD_REQUEST, f"CSR subject must be empty or CN={name}", identity=name)
    try:
        extensions = list(csr.extensions)
    except Exception as error:
        raise Refusal(BAD_REQUEST, f"CSR extensions cannot be read: {error}", identity=name) from None
    for extension in extensions:
        if not isinstance(extension.value, x509.SubjectAlternativeName):
            raise Refusal(
                BAD_REQUEST, f"CSR asks for extension {extension.oid.dotted_string}; only subjectAltName", identity=name
            )
        if set(extension.value) != set(sans) or len(list(extension.value)) != len(set(extension.value)):
            asked = ", ".join(sorted(_san_text(san) for san in extension.value))
            raise Refusal(BAD_REQUEST, f"CSR asks for names this CA does not issue to {name}: {asked}", identity=name)
    return csr


def _san_text(san: x509.GeneralName) -> str:
    return f"{type(san).__name__}:{san.value}"[:200]


@attrs.define(eq=False)
class Enroller:
    """Authorizes and issues EST requests for one CA."""

    ca: CertificateAuthority
    tokens: TokenBook
    lifetime: datetime.timedelta = DEFAULT_LIFETIME
    limiter: RateLimiter = attrs.field(factory=RateLimiter)

    def enroll(self, name: str, token: str, body: bytes, now: datetime.datetime) -> Issued:
        """simpleenroll: a one-time token for ``name`` buys one certificate for the CSR's key."""
        try:
            found = self.tokens.check(token, name, now)
        except TokenRefused as refused:
            raise Refusal(FORBIDDEN if refused.other_name else UNAUTHORIZED, refused.reason, identity=name) from None
        sans = self.ca.planned_sans(name, dns=found.dns)
        csr = check_csr(body, name, sans)
        return self._issue(name, csr, sans, now, "token", TokenBook.claim(found, now))

    def reenroll(self, peer: PeerCertificate | None, body: bytes, now: datetime.datetime) -> Issued:
        """simplereenroll: a current certificate of ours buys its successor, with the same names."""
        if peer is None:
            raise Refusal(FORBIDDEN, "no client certificate")
        presented = peer.certificate
        serial = serial_text(presented.serial_number)
        # Only the exact certificate this CA recorded counts (never a look-alike with our serial);
        # that, with the key proven in the handshake, is the authorization. OpenSSL's chain check
        # must agree as well (it fails once the issuing CA expires or leaves the bundle).
        record = self.ca.lookup(presented.serial_number)
        if record is None or record.certificate() != presented:
            if not peer.chain_ok:
                raise Refusal(FORBIDDEN, f"client certificate {serial} does not chain to this CA: {peer.chain_error}")
            raise Refusal(FORBIDDEN, f"client certificate {serial} was not issued by this CA")
        identity = record.name
        if record.revoked_at is not None:
            raise Refusal(FORBIDDEN, f"client certificate {serial} is revoked ({record.reason})", identity=identity)
        if now >= record.not_after:
            raise Refusal(
                FORBIDDEN, f"client certificate {serial} expired: enroll again with a new token", identity=identity
            )
        if now < record.not_before:
            raise Refusal(FORBIDDEN, f"client certificate {serial} is not valid yet", identity=identity)
        if not peer.chain_ok:
            raise Refusal(
                FORBIDDEN, f"client certificate {serial} does not chain to this CA: {peer.chain_error}", identity=identity
            )
        try:
            sans = list(presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            raise Refusal(FORBIDDEN, f"client certificate {serial} names no identity", identity=identity) from None
        csr = check_csr(body, identity, sans)
        return self._issue(identity, csr, sans, now, "renewal", None)

    def _issue(
        self,
        name: str,
        csr: x509.CertificateSigningRequest,
        sans: Sequence[x509.GeneralName],
        now: datetime.datetime,
        via: str,
        claim: Callable[[sqlite3.Connection, Row], None] | None,
    ) -> Issued:
        seconds = now.timestamp()
        wait = self.limiter.take(name, seconds)
        if wait is not None:
            raise Refusal(
                TOO_MANY,
                f"rate limit of {self.limiter.limit} certificates per {self.limiter.window:g}s reached",
                identity=name,
                retry_after=int(wait + 0.999),
            )
        try:
            record = self.ca.certify(
                name, csr.public_key(), sans, lifetime=self.lifetime, now=now, issued_via=via, claim=claim
            )
        except TokenRefused as refused:
            self.limiter.give_back(name, seconds)
            raise Refusal(UNAUTHORIZED, refused.reason, identity=name) from None
        except BaseException:
            self.limiter.give_back(name, seconds)
            raise
        return Issued(
            record=record,
            chain=(record.certificate(), self.ca.issuer_of(record.certificate())),
            identity=self.ca.spiffe_id(name),
            via=via,
        )

    def cacerts(self) -> list[x509.Certificate]:
        """Every trust anchor of the bundle, then the issuing intermediate: what /cacerts holds."""
        bundle = x509.load_pem_x509_certificates((self.ca.directory / "bundle.pem").read_bytes())
        found: list[x509.Certificate] = []
        for certificate in [*bundle, self.ca.intermediate_cert]:
            if certificate not in found:
                found.append(certificate)
        return found
