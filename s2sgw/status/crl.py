"""Mode ``crl``: judge certificates against the CA's signed revocation lists, held in memory."""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from s2sgw import pki
from s2sgw.interfaces import IStatusChecker
from s2sgw.timeutil import utc
from s2sgw.verify.crlrules import crl_problem
from s2sgw.wire.ocsp import DEFAULT_LEEWAY, CertStatus, StatusInvalid


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
        problem = crl_problem(crl, signer)
        if problem is not None:
            raise StatusInvalid(f"CRL of {crl.issuer.rfc4514_string()}: {problem}")
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

    def close(self) -> Deferred[None]:
        """Nothing to release: the CRLs are in memory."""
        return defer.succeed(None)

    def _status(self, leaf: x509.Certificate, issuer: x509.Certificate) -> CertStatus:
        now = utc(self.clock.seconds())
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

