"""Test doubles shared by the test modules: each stands in for one seam of the gateway."""

from __future__ import annotations

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from s2sgw.interfaces import IStatusChecker
from s2sgw.wire.ocsp import CertStatus
from s2sgw.timeutil import utc


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

    def close(self) -> Deferred[None]:
        return defer.succeed(None)

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
        now = utc(self.clock.seconds())
        revoked_at = now if answer == "revoked" else None
        reason = "unspecified" if answer == "revoked" else None
        return defer.succeed(CertStatus(answer, now, None, revoked_at=revoked_at, revocation_reason=reason))

