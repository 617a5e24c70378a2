"""The status checker a gateway runs, chosen by ``status.mode``, and the one that answers "good" when checks are off."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from s2sgw.config import StatusConfig
from s2sgw.interfaces import IStatusChecker
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.status.ocsp import OCSPStatusChecker, StatusMetrics
from s2sgw.status.responders import Responders
from s2sgw.timeutil import utc
from s2sgw.wire.ocsp import CertStatus


@implementer(IStatusChecker)
@attrs.define(eq=False)
class NoStatusChecker:
    """``mode = "off"``: every certificate that chains to the trust bundle counts as good."""

    clock: IReactorTime

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        return defer.succeed(CertStatus("good", utc(self.clock.seconds()), None))

    def close(self) -> Deferred[None]:
        return defer.succeed(None)


def make_status_checker(
    config: StatusConfig,
    reactor,
    authorities: tuple[x509.Certificate, ...] = (),
    metrics: StatusMetrics | None = None,
    roots: Callable[[], Sequence[x509.Certificate]] | None = None,
) -> IStatusChecker:
    """The checker ``config.mode`` asks for (CRL files are read here, at start-up).

    ``authorities`` (the trust bundle's roots and our intermediates) verify a root CRL held
    beside the issuing CA's, in mode ``crl``. ``metrics`` counts the OCSP checker's queries
    (the gateway's; a set of its own when None). ``roots()`` (the trust bundle's roots now)
    matches peers to ``[[status.responder]]`` by the root they chain to; by default the roots
    among ``authorities``.
    """
    if config.mode == "off":
        return NoStatusChecker(reactor)
    if config.mode == "crl":
        if config.crl is None:
            raise ValueError("status mode crl needs a crl file")
        return CRLStatusChecker.from_path(config.crl, reactor, authorities=authorities)
    if not config.url:
        raise ValueError("status mode ocsp needs a url")
    if roots is None:
        fixed = tuple(a for a in authorities if a.issuer == a.subject)
        roots = lambda: fixed  # noqa: E731
    return OCSPStatusChecker(
        None,
        reactor,
        responders=Responders(config, reactor, roots),
        timeout=config.timeout,
        max_cache_age=config.max_cache_age,
        cache_size=config.cache_size,
        metrics=StatusMetrics() if metrics is None else metrics,
    )

