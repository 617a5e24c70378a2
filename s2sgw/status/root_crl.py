"""The root's CRL, so that a revoked issuing CA makes its leaves refused in every status mode.

The root is offline and cannot sign OCSP answers for its intermediates, so the CA server
publishes the root's CRL (signed at a ceremony, ``s2sgw ca crl --root``) at ``/root.crl`` of the
same origin as its OCSP responder and its CRL. The gateway fetches it from there (derived from
``status.url`` or ``status.crl_url``, like the feed; no key of its own), verifies it against a
root of the trust bundle, and :class:`IntermediateCheck` refuses a peer whose intermediate is on
it before its leaf's own status is asked.

What counts when (docs/ca.rst, "A revoked issuing CA"):

- the CA publishes none (404, an older CA): no issuing CA is taken as revoked;
- one is held and fresh: an intermediate on it is ``revoked`` for every leaf under it;
- one is held but past its nextUpdate: ``StatusUnavailable``, so ``status.fail`` decides
  (``closed``, the default: refused);
- the fetch fails or answers 404 after one was held: the held one stays.
"""

from __future__ import annotations

import datetime
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw import pki
from s2sgw.interfaces import IStatusChecker
from s2sgw.serials import serial_text
from s2sgw.timeutil import utc
from s2sgw.verify.crlrules import crl_problem
from s2sgw.wire.failover import Failover, another_server_might_answer
from s2sgw.wire.http import HTTPStatusError, http_client, read_limited
from s2sgw.wire.ocsp import DEFAULT_LEEWAY, CertStatus, StatusUnavailable

ROOT_CRL_PATH = "/root.crl"
MAX_ROOT_CRL_BYTES = 1024 * 1024


def root_crl_urls(status: Any) -> list[tuple[str, ...]]:
    """``/root.crl`` on the origin of each of a responder's OCSP URLs (mode ocsp) or CRL URLs (mode
    crl), in their order: the replicas of one CA, tried in turn like its status URLs. One list per
    CA (responders that share their first origin share it): every root a gateway trusts may have
    revoked an issuing CA."""
    if status.mode not in ("ocsp", "crl"):
        return []
    found: list[tuple[str, ...]] = []
    for responder in status.responders:
        bases = responder.urls if status.mode == "ocsp" else responder.crl_urls
        urls: list[str] = []
        for base in bases:
            parts = urllib.parse.urlsplit(base)
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, ROOT_CRL_PATH, "", ""))
            if url not in urls:
                urls.append(url)
        if urls and all(urls[0] != known[0] for known in found):
            found.append(tuple(urls))
    return found


class RootCRLRefused(Exception):
    """A fetched root CRL failed verification; the held one stays."""


class _RootCRLHTTPStatus(HTTPStatusError, RootCRLRefused):
    """The CA answered ``/root.crl`` with an HTTP error code other than 404."""


def _another_replica_might_answer(failure: Failure) -> bool:
    """A root CRL that does not verify is the CA's word: every replica publishes the same one."""
    return another_server_might_answer(failure, RootCRLRefused)


def verify_root_crl(
    crl: x509.CertificateRevocationList,
    roots: Any,
    now: datetime.datetime,
    held: x509.CertificateRevocationList | None,
) -> x509.Certificate:
    """The root of ``roots`` that signed ``crl``; RootCRLRefused when none did, it is not current,
    breaks the CRL rules, or goes back behind ``held``."""
    signer = None
    for root in roots:
        if root.subject != crl.issuer or root.issuer != root.subject:
            continue
        try:
            if crl.is_signature_valid(root.public_key()):
                signer = root
                break
        except (TypeError, ValueError, UnsupportedAlgorithm):
            continue
    if signer is None:
        raise RootCRLRefused("not signed by a root of the trust bundle")
    if crl.last_update_utc > now + DEFAULT_LEEWAY:
        raise RootCRLRefused("issued in the future")
    if crl.next_update_utc is None or crl.next_update_utc < now:
        raise RootCRLRefused("stale (nextUpdate passed or absent)")
    problem = crl_problem(crl, signer)
    if problem is not None:
        raise RootCRLRefused(problem)
    if held is not None and held.issuer == crl.issuer:
        old, new = pki.crl_number(held), pki.crl_number(crl)
        if old is not None and (new is None or new < old):
            raise RootCRLRefused(f"CRL number {new} is lower than the held {old} (replayed?)")
    return signer


@attrs.define(eq=False)
class RootCRLFollower(Service):
    """Fetches the root CRL every ``interval`` seconds from the first of ``urls`` that answers
    (:class:`Failover`) and holds the last one that verified."""

    urls: tuple[str, ...]
    reactor: Any
    roots: Any  # () -> the trust store's CA certificates, read at each fetch
    interval: float = 300.0
    timeout: float = 10.0
    http: Any = None
    crl: x509.CertificateRevocationList | None = None
    published: bool | None = None  # None: not asked yet; False: the CA publishes none (404)
    last_error: str | None = None
    on_change: list[Callable[[], object]] = attrs.Factory(list)  # called when a newer root CRL is taken
    _timer: LoopingCall | None = None
    _running: Deferred | None = None
    _servers: Failover = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            self.http, _ = http_client(self.reactor, persistent=False)
        self._servers = Failover(self.urls, self.reactor, label="root CRL server")

    @property
    def url(self) -> str:
        """The replica in use."""
        return self._servers.current

    def startService(self) -> None:
        super().startService()
        self._timer = LoopingCall(self.refresh)
        self._timer.clock = self.reactor
        self._timer.start(self.interval, now=True)

    def stopService(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        if self._running is not None:
            self._running.cancel()
        self._servers.stop()
        super().stopService()

    def refresh(self) -> Deferred[None]:
        if self._running is not None:
            return defer.succeed(None)
        def fetch(url: str) -> Deferred[bytes | None]:
            fetched = defer.maybeDeferred(self.http.get, url)
            fetched.addCallback(self._read)
            return fetched.addTimeout(self.timeout, self.reactor)

        d = self._running = self._servers.request(fetch, _another_replica_might_answer)
        d.addCallback(self._take)
        d.addErrback(self._failed)
        d.addBoth(self._done)
        return d

    def _read(self, response: Any) -> Deferred[bytes | None]:
        code = response.code
        body = read_limited(response, MAX_ROOT_CRL_BYTES)
        if code == 404:
            return body.addCallback(lambda _: None)
        if code != 200:

            def refuse(_: object) -> None:
                raise _RootCRLHTTPStatus(code)

            return body.addBoth(refuse)
        return body

    def _take(self, data: bytes | None) -> None:
        if data is None:
            if self.published is not False:
                self._log.info("{url}: the CA publishes no root CRL", url=self.url)
            self.published = False
            return
        try:
            crl = pki.parse_crl(data, self.url)
        except pki.PKIError as error:
            raise RootCRLRefused(str(error)) from None
        verify_root_crl(crl, self.roots(), utc(self.reactor.seconds()), self.crl)
        changed = self.crl is None or pki.crl_number(crl) != pki.crl_number(self.crl)
        self.crl, self.published, self.last_error = crl, True, None
        if changed:
            self._log.info(
                "root CRL {number} from {url} in use: {count} revoked issuing CAs",
                number=pki.crl_number(crl), url=self.url, count=len(crl),
            )
            for listener in self.on_change:
                listener()

    def _failed(self, failure: Failure) -> None:
        failure.trap(Exception)
        self.last_error = failure.getErrorMessage() or failure.type.__name__
        self._log.warn("root CRL from {url} not taken, keeping what is held: {error}", url=self.url, error=self.last_error)

    def _done(self, result: object) -> None:
        self._running = None

    def status(self) -> dict[str, Any]:
        crl = self.crl
        return {
            "url": self.url,
            "urls": list(self.urls),
            "published": self.published,
            "crl_number": None if crl is None else pki.crl_number(crl),
            "next_update": None if crl is None or crl.next_update_utc is None else crl.next_update_utc.isoformat(),
            "revoked_intermediates": None if crl is None else len(crl),
            "last_error": self.last_error,
        }


@attrs.define(eq=False)
class RootCRLFollowers(MultiService):
    """A :class:`RootCRLFollower` per CA of the ``[status]`` in force; :meth:`configure` adds and
    stops them when a reload changes the responders. A follower whose replicas change keeps the
    root CRL it holds (a revocation is not forgotten because a URL was added)."""

    reactor: Any
    roots: Any  # () -> the trust store's CA certificates
    interval: float
    timeout: float
    on_change: list[Callable[[], object]] = attrs.Factory(list)  # a newer root CRL was taken
    active: list[RootCRLFollower] = attrs.Factory(list)  # in the order of the responders; read by IntermediateCheck

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)

    def configure(self, status: Any) -> None:
        wanted = root_crl_urls(status)
        kept = {follower.urls: follower for follower in self.active}
        followers = []
        for urls in wanted:
            follower = kept.pop(urls, None)
            if follower is None:
                follower = RootCRLFollower(urls, self.reactor, self.roots, interval=self.interval, timeout=self.timeout)
                follower.on_change.append(self._changed)
                held = next((old for old in kept.values() if set(old.urls) & set(urls)), None)
                if held is not None:
                    follower.crl, follower.published = held.crl, held.published
                follower.setServiceParent(self)
            followers.append(follower)
        for follower in kept.values():
            follower.disownServiceParent()
        self.active[:] = followers

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def status(self) -> list[dict[str, Any]]:
        return [follower.status() for follower in self.active]


@implementer(IStatusChecker)
@attrs.define(eq=False)
class IntermediateCheck:
    """Asks the root CRL about the peer's intermediate, then ``inner`` about its leaf."""

    inner: Any  # IStatusChecker
    followers: Sequence[RootCRLFollower]  # read at each check: RootCRLFollowers.active follows reloads
    clock: Any
    _log = Logger()

    def check(self, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
        try:
            revoked = self.issuer_status(issuer)
        except StatusUnavailable:
            return defer.fail()
        if revoked is not None:
            return defer.succeed(revoked)
        return self.inner.check(leaf, issuer)

    def close(self) -> Deferred[None]:
        return self.inner.close()

    def issuer_status(self, issuer: x509.Certificate) -> CertStatus | None:
        """``revoked`` when a held root CRL lists ``issuer``, else None; StatusUnavailable when the
        root CRL that would speak for it is stale."""
        if issuer.issuer == issuer.subject:
            return None
        follower = next((f for f in self.followers if f.crl is not None and f.crl.issuer == issuer.issuer), None)
        if follower is None:
            return None
        crl = follower.crl
        assert crl is not None
        now = utc(self.clock.seconds())
        if crl.next_update_utc is None or crl.next_update_utc + DEFAULT_LEEWAY < now:
            raise StatusUnavailable("the root CRL held is stale; cannot tell whether the issuing CA is revoked")
        root = next((r for r in follower.roots() if r.subject == crl.issuer), None)
        try:
            if root is None:
                return None
            issuer.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return None  # another root of that name: this CRL does not speak for it
        entry = crl.get_revoked_certificate_by_serial_number(issuer.serial_number)
        if entry is None:
            return None
        self._log.warn(
            "issuing CA {subject} serial {serial} is revoked by the root CRL: its leaves are refused",
            subject=issuer.subject.rfc4514_string(), serial=serial_text(issuer.serial_number),
        )
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = None
        return CertStatus(
            "revoked", crl.last_update_utc, crl.next_update_utc,
            revoked_at=entry.revocation_date_utc, revocation_reason=reason,
        )
