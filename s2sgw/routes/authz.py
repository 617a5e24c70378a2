"""Who is this peer, may it use this route, and is its certificate still good?

OpenSSL has verified the chain against the trust bundle by the time we are asked; what is left is
ours: the peer's identity (its SPIFFE ID, else its DNS names), the route's allow-list or expected
peer, and the certificate's status at the CA.

Identity rules (see docs' security model):

- A ``spiffe://`` allow entry matches the leaf's SPIFFE ID exactly (no normalisation: a port,
  another trust domain, a trailing slash or other case never match).
- A bare name ``NAME`` means ``spiffe://{trust_domain}/NAME``. Only a leaf that carries no SPIFFE
  ID at all falls back to DNS SANs, matched with ``service_identity``; a leaf whose SPIFFE ID is
  wrong is not rescued by a DNS SAN.
- A leaf with more than one SPIFFE ID is refused (an X.509-SVID has exactly one URI SAN).

Status rules: good admits; revoked and unknown refuse. When the CA cannot be asked
(StatusUnavailable) ``fail = "closed"`` refuses with ``ca_unreachable`` and ``fail = "open"``
admits with a warning. An answer that fails verification (StatusInvalid) refuses with
``status_invalid`` under ``fail = "closed"``; under ``fail = "open"`` it is treated like an
unreachable CA (a forged or broken answer is no worse than no answer) and admits with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import service_identity
from cryptography import x509
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw.config import FailMode, InboundRoute, OutboundRoute
from s2sgw.interfaces import (
    Decision,
    IAuthorizer,
    IStapleSource,
    IStatusChecker,
    Reason,
)
from s2sgw.serials import serial_text
from s2sgw.status.stapling import StapleMetrics
from s2sgw.wire.ocsp import CertStatus, StatusInvalid, StatusUnavailable

Route = InboundRoute | OutboundRoute


class NoIdentity(ValueError):
    """The leaf carries no identity we can use."""


@attrs.frozen
class PeerIdentity:
    """The names a leaf certificate proves: its SPIFFE ID (if any) and its DNS SANs."""

    spiffe_id: str | None
    dns_names: tuple[str, ...]

    @property
    def name(self) -> str:
        """What the audit log calls the peer: the SPIFFE ID, else the first DNS name."""
        return self.spiffe_id or self.dns_names[0]


def peer_identity(leaf: x509.Certificate) -> PeerIdentity:
    """Read the leaf's SANs; raise NoIdentity if none is usable."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NoIdentity("certificate has no subjectAltName") from None
    except ValueError as e:  # malformed extension DER
        raise NoIdentity(f"certificate subjectAltName is malformed: {e}") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u[:7].lower() == "spiffe:"]
    if len(spiffe) > 1:
        raise NoIdentity(f"certificate has {len(spiffe)} SPIFFE IDs; exactly one is allowed")
    dns = tuple(sans.get_values_for_type(x509.DNSName))
    if not spiffe and not dns:
        raise NoIdentity("certificate has no SPIFFE ID and no DNS name")
    return PeerIdentity(spiffe[0] if spiffe else None, dns)


def identity_matches(
    leaf: x509.Certificate, identity: PeerIdentity, entry: str, trust_domain: str
) -> bool:
    """Does the peer prove ``entry`` (a spiffe:// ID or a bare service name)?"""
    if entry.startswith("spiffe://"):
        return identity.spiffe_id == entry
    if identity.spiffe_id is not None:
        return identity.spiffe_id == f"spiffe://{trust_domain}/{entry}"
    try:
        verify_certificate_hostname(leaf, entry)
    except (service_identity.VerificationError, service_identity.CertificateError, ValueError):
        return False
    return True


def _refuse(reason: str, detail: str, identity: str | None = None, serial: int | None = None) -> Decision:
    return Decision(False, reason, identity=identity, serial=serial, detail=detail)


@implementer(IAuthorizer)
@attrs.define(eq=False)
class Authorizer:
    """Identity, allow-list and certificate status -> a Decision (never an error).

    ``current_route`` (e.g. the trust store's ``route``) maps a route name to its current
    configuration, so allow-lists and expected peers changed by a reload apply to the next
    connection; without it, or for a name it does not know, the route passed in is judged.
    ``staples`` verifies and remembers OCSP answers remotes staple (the OCSP checker, whose
    cache then answers ``authorize``); without it stapled answers are not used.
    """

    status_checker: IStatusChecker
    trust_domain: str
    fail: FailMode = "closed"
    current_route: Callable[[str], Route | None] | None = None
    staples: IStapleSource | None = None
    metrics: StapleMetrics = attrs.field(factory=StapleMetrics)  # counts staples; handed over by build_gateway

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.fail not in ("closed", "open"):
            raise ValueError(f"fail must be 'closed' or 'open', not {self.fail!r}")

    def authorize(self, route: Route, chain: Sequence[x509.Certificate]) -> Deferred[Decision]:
        """Fire with a Decision for the peer presenting ``chain`` (leaf first) on ``route``."""
        try:
            route = self._current(route)
            decision = self._identify(route, chain)
        except Exception:
            failure = Failure()
            self._unexpected(route, None, None, failure, "identity check")
            return defer.succeed(
                _refuse(Reason.NO_IDENTITY, f"identity check failed: {failure.getErrorMessage()}")
            )
        if isinstance(decision, Decision):
            return defer.succeed(decision)
        leaf, issuer, identity = decision
        serial = leaf.serial_number
        d = defer.maybeDeferred(self.status_checker.check, leaf, issuer)
        d.addCallback(self._judge_status, route, identity, serial)
        d.addErrback(self._status_failed, route, identity, serial)
        d.addErrback(self._status_bug, route, identity, serial)
        return d

    def accept_staple(self, route: Route, chain: Sequence[x509.Certificate], der: bytes) -> CertStatus | None:
        """Verify an OCSP answer the remote stapled and, if it holds, let the checker remember it,
        so that ``authorize`` needs no query. Never raises: a bad staple is logged and ignored."""
        if self.staples is None or len(chain) < 2:
            return None
        leaf, issuer = chain[0], chain[1]
        try:
            status = self.staples.accept_staple(leaf, issuer, der)
        except (StatusInvalid, StatusUnavailable) as error:
            self.metrics.received.labels("invalid").inc()
            self._log.warn(
                "route {route}: ignoring the OCSP staple of serial {serial}: {error}",
                route=route.name,
                serial=serial_text(leaf.serial_number),
                error=str(error),
            )
            return None
        except Exception:
            failure = Failure()
            self.metrics.received.labels("invalid").inc()
            self._unexpected(route, None, leaf.serial_number, failure, "staple check")
            return None
        self.metrics.received.labels("valid").inc()
        return status

    def _current(self, route: Route) -> Route:
        if self.current_route is None:
            return route
        current = self.current_route(route.name)
        return route if current is None else current

    def _identify(
        self, route: Route, chain: Sequence[x509.Certificate]
    ) -> Decision | tuple[x509.Certificate, x509.Certificate, str]:
        if not chain:
            return _refuse(Reason.NO_CLIENT_CERT, "no certificate presented")
        leaf = chain[0]
        serial = leaf.serial_number
        if len(chain) < 2:
            return _refuse(Reason.UNTRUSTED_CHAIN, "chain has no issuer certificate", serial=serial)
        try:
            identity = peer_identity(leaf)
        except NoIdentity as e:
            return _refuse(Reason.NO_IDENTITY, str(e), serial=serial)
        name = identity.name
        if isinstance(route, OutboundRoute):
            peer = route.peer
            if not identity_matches(leaf, identity, peer, self.trust_domain):
                return _refuse(Reason.IDENTITY_MISMATCH, f"expected {peer}", name, serial)
        else:
            allow = tuple(route.allow)
            if not any(identity_matches(leaf, identity, entry, self.trust_domain) for entry in allow):
                detail = "route allows nobody" if not allow else "not on the allow-list"
                return _refuse(Reason.IDENTITY_NOT_ALLOWED, detail, name, serial)
        return leaf, chain[1], name

    def _judge_status(self, status: CertStatus, route: Route, identity: str, serial: int) -> Decision:
        if status.state == "good":
            return Decision(True, Reason.OK, identity=identity, serial=serial)
        if status.state == "revoked":
            when = status.revoked_at.isoformat() if status.revoked_at else "unknown time"
            reason = status.revocation_reason or "unspecified"
            return _refuse(Reason.REVOKED, f"revoked at {when} ({reason})", identity, serial)
        return _refuse(Reason.STATUS_UNKNOWN, "the CA does not know this certificate", identity, serial)

    def _status_failed(self, failure: Failure, route: Route, identity: str, serial: int) -> Decision:
        failure.trap(StatusUnavailable, StatusInvalid)
        unavailable = failure.check(StatusUnavailable) is not None
        reason = Reason.CA_UNREACHABLE if unavailable else Reason.STATUS_INVALID
        error = failure.getErrorMessage()
        if self.fail == "open":
            self._log.warn(
                "route {route} admits {identity} (serial {serial}) without a valid status "
                "answer ({reason}: {error}) because fail = open",
                route=route.name,
                identity=identity,
                serial=serial_text(serial),
                reason=reason,
                error=error,
            )
            return Decision(
                True, Reason.OK, identity=identity, serial=serial, detail=f"fail open: {reason}: {error}"
            )
        return _refuse(reason, error, identity, serial)

    def _status_bug(self, failure: Failure, route: Route, identity: str, serial: int) -> Decision:
        self._unexpected(route, identity, serial, failure, "status check")
        return _refuse(
            Reason.STATUS_INVALID, f"status check failed: {failure.getErrorMessage()}", identity, serial
        )

    def _unexpected(self, route: Route, identity: str | None, serial: int | None, failure: Failure, what: str) -> None:
        self._log.warn(
            "route {route}: {what} of {identity} failed unexpectedly, refusing: {error}",
            route=route.name,
            what=what,
            identity=identity or "?",
            serial=serial_text(serial) if serial is not None else None,
            error=f"{failure.type.__name__}: {failure.getErrorMessage()}",
            traceback=failure.getTraceback(),
        )
