"""The status server takes in a new issuing CA (``s2sgw ca intermediate``) without a restart.

Once a second it looks at ``intermediate.pem`` and ``previous/``; when either changed it opens
the directory again in a thread (decrypting the keys there) and swaps the issuing CAs of the
running :class:`~s2sgw.ca.authority.CertificateAuthority` in place, so the EST enroller, the
OCSP responders and the revocation feed all use the new one from then on. A directory caught
halfway through a change does not open (a key that does not match its certificate): the next
look tries again.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.ca.cafiles import PREVIOUS
from s2sgw.ca.ceremony import INTERMEDIATE_CERT
from s2sgw.ca.responders import responders_for
from s2sgw.serials import serial_text

Stamp = tuple[object, ...]


def issuing_stamp(directory: Any) -> Stamp:
    """What changes when the issuing CAs of ``directory`` change (blocking: a stat and a listing)."""
    try:
        info = os.stat(directory / INTERMEDIATE_CERT)
        current: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
    except FileNotFoundError:
        current = None
    try:
        kept = tuple(sorted(os.listdir(directory / PREVIOUS)))
    except FileNotFoundError:
        kept = ()
    return current, kept


def _reopen(ca: Any, seen: Stamp) -> tuple[Stamp, Any] | None:
    """Thread side: None when nothing changed, else the new stamp and the directory opened again."""
    stamp = issuing_stamp(ca.directory)
    if stamp == seen:
        return None
    return stamp, type(ca).open(ca.directory, ca.passphrase)


@attrs.define(eq=False)
class IssuingReload:
    publisher: Any  # StatusPublisher
    stamp: Stamp
    reloads: int = 0
    _busy: bool = False
    _failing: bool = False
    _log = Logger()

    def check(self) -> defer.Deferred[None] | None:
        if self._busy:
            return None
        self._busy = True
        d = self.publisher.in_thread(_reopen, self.publisher.ca, self.stamp)
        d.addCallbacks(self._opened, self._failed)
        d.addBoth(self._done)
        return d

    def _opened(self, result: tuple[Stamp, Any] | None) -> None:
        if result is None:
            return
        stamp, fresh = result
        ca, publisher = self.publisher.ca, self.publisher
        # The key first, then the certificate: see CertificateAuthority.signing_pair.
        ca.intermediate_key = fresh.intermediate_key
        ca.intermediate_cert = fresh.intermediate_cert
        ca.ocsp_cert, ca.ocsp_key, ca.previous = fresh.ocsp_cert, fresh.ocsp_key, fresh.previous
        publisher.responder = responders_for(ca, publisher.responder.validity)
        if publisher.feed is not None:
            publisher.feed.replace_issuer(ca.intermediate_cert, ca.ocsp_cert, ca.ocsp_key)
        self.stamp = stamp
        self.reloads += 1
        self._failing = False
        self._log.info(
            "issuing CA {serial} ({subject}) in use; answering also for {previous}",
            serial=serial_text(ca.intermediate_cert.serial_number),
            subject=ca.intermediate_cert.subject.rfc4514_string(),
            previous=[serial_text(p.cert.serial_number) for p in ca.previous] or "no other",
        )
        publisher.regenerate_crl()

    def _failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._log.warn(
                "the issuing CAs changed but do not open yet ({error}); still using the current ones",
                error=failure.getErrorMessage(),
            )

    def _done(self, result: object) -> None:
        self._busy = False
