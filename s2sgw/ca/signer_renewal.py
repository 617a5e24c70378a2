"""A short-lived delegated OCSP signer, re-issued by the status server before it expires.

The signer carries ``id-pkix-ocsp-nocheck``: nobody can ask whether it was revoked, so its short
life is what limits a leaked key (RFC 6960 4.2.2.2.1). The server makes a new one from each
issuing CA it holds once a third of the configured lifetime is left (or at once when the one on
disk lives longer than the configured lifetime), writes it beside its issuing CA (the key
encrypted when the CA's are), records it, and signs answers and feed documents with it from
then on. Gateways verify the signer each answer carries against the issuer, so they take the
new one without a restart.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.ca.building import cert_pem
from s2sgw.ca.cafiles import PREVIOUS, IssuingCA, write_ca_files
from s2sgw.ca.ceremony import OCSP_CERT, OCSP_KEY, make_ocsp_signer
from s2sgw.ca.records import row_for
from s2sgw.ca.store import OCSP_SIGNER, serial_hex
from s2sgw.serials import serial_text

DEFAULT_LIFETIME = datetime.timedelta(days=7)
MIN_LIFETIME = datetime.timedelta(seconds=30)


def renewal_due(cert: x509.Certificate, now: datetime.datetime, lifetime: datetime.timedelta) -> bool:
    """A third of ``lifetime`` left, or more life left than the policy allows."""
    left = cert.not_valid_after_utc - now
    return left < lifetime / 3 or left > lifetime + datetime.timedelta(minutes=10)


def renew_signer(ca: Any, issuing: IssuingCA, now: datetime.datetime, lifetime: datetime.timedelta) -> IssuingCA:
    """Thread side: make, record and write a new signer for ``issuing``; return it with it."""
    key, cert = make_ocsp_signer(ca.trust_domain, issuing.cert, issuing.key, ca.key_type, now, lifetime)
    ca.store.insert(row_for(cert, OCSP_SIGNER, "ocsp-signer", ()))
    current = issuing.cert.serial_number == ca.intermediate_cert.serial_number
    directory = ca.directory if current else ca.directory / PREVIOUS / serial_hex(issuing.cert.serial_number)
    write_ca_files([(directory / OCSP_KEY, ca.key_bytes(key), 0o600), (directory / OCSP_CERT, cert_pem(cert), 0o644)])
    return attrs.evolve(issuing, ocsp_cert=cert, ocsp_key=key)


@attrs.define(eq=False)
class SignerRenewal:
    """Checked on every refresh of the publisher; renews one signer at a time, in a thread."""

    publisher: Any  # StatusPublisher
    lifetime: datetime.timedelta = DEFAULT_LIFETIME
    renewals: int = 0
    _busy: bool = False
    _failing: bool = False
    _log = Logger()

    def check(self) -> defer.Deferred[None] | None:
        if self._busy:
            return None
        ca, now = self.publisher.ca, self.publisher.now()
        for index, issuing in enumerate(ca.issuers):
            if renewal_due(issuing.ocsp_cert, now, self.lifetime):
                self._busy = True
                d = self.publisher.in_thread(renew_signer, ca, issuing, now, self.lifetime)
                d.addCallbacks(self._renewed, self._failed, callbackArgs=(index,))
                d.addBoth(self._done)
                return d
        return None

    def _renewed(self, renewed: IssuingCA, index: int) -> None:
        ca, publisher = self.publisher.ca, self.publisher
        serial = renewed.cert.serial_number
        # The issuing CAs may have changed meanwhile (IssuingReload): find this one again.
        index = next((i for i, m in enumerate(publisher.responder.members) if m.issuer.serial_number == serial), -1)
        if index < 0:
            return  # retired meanwhile: its new signer is on disk and in the store, unused
        if serial == ca.intermediate_cert.serial_number:
            ca.ocsp_cert, ca.ocsp_key = renewed.ocsp_cert, renewed.ocsp_key
            if publisher.feed is not None:
                publisher.feed.replace_signer(renewed.ocsp_cert, renewed.ocsp_key)
        else:
            ca.previous = tuple(renewed if p.cert.serial_number == serial else p for p in ca.previous)
        dropped = publisher.responder.replace_signer(index, renewed.ocsp_cert, renewed.ocsp_key)
        self.renewals += 1
        self._failing = False
        self._log.info(
            "OCSP signer of {issuer} renewed: serial {serial}, valid until {until}; {dropped} cached answers dropped",
            issuer=renewed.cert.subject.rfc4514_string(),
            serial=serial_text(renewed.ocsp_cert.serial_number),
            until=renewed.ocsp_cert.not_valid_after_utc.isoformat(),
            dropped=dropped,
        )

    def _failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._log.failure("renewing the OCSP signer failed; the current one is used while it lasts", failure)

    def _done(self, result: object) -> None:
        self._busy = False
