"""OCSP stapling between gateways: our own fresh answer, kept ready for the handshake.

OpenSSL asks for a staple inside the handshake, synchronously, so the server's callback only
reads a :class:`StapleCache`. A :class:`StapleService` fills it: one nonce-less OCSP query per
service with an inbound route, verified like any answer, refreshed at half its validity, again
after every trust reload (a rotated certificate needs its own answer) and with back-off after a
failure. An answer past its nextUpdate is never served: no fresh answer means no staple, and the
peer asks the CA itself, as it would without stapling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.config import GatewayConfig
from s2sgw.interfaces import IStapleSource, ITrustStore
from s2sgw.ops.metrics import MetricSet
from s2sgw.serials import serial_text
from s2sgw.timeutil import utc
from s2sgw.wire.ocsp import CertStatus, StatusInvalid, StatusUnavailable


class StapleMetrics(MetricSet):
    """Staples fetched for our certificates (StapleService) and received from remotes
    (Authorizer.accept_staple); registered by the gateway's MetricsService."""

    def __init__(self) -> None:
        self.fetches = Counter(
            "s2sgw_staple_fetches",
            "OCSP queries for our own certificates' staples, by outcome.",
            ["outcome"],
            registry=None,
        )
        self.received = Counter(
            "s2sgw_staples_received",
            "OCSP staples received on outbound handshakes, by result: valid (no query needed) or invalid "
            "(ignored; the remote was checked as usual).",
            ["result"],
            registry=None,
        )
        self.members = (self.fetches, self.received)


_SHA256 = hashes.SHA256()


def fingerprint(leaf: x509.Certificate) -> bytes:
    """The cache key of a leaf: its SHA-256 fingerprint (a rotated certificate gets a new one)."""
    return leaf.fingerprint(_SHA256)


@attrs.frozen
class Staple:
    """A verified OCSP answer about one of our certificates, as the CA sent it."""

    der: bytes = attrs.field(repr=False)
    status: CertStatus
    expires: float  # clock seconds: nextUpdate (or thisUpdate + max age without one)


@attrs.define(eq=False)
class StapleCache:
    """Leaf fingerprint -> current staple; read by the TLS server callback, written by the service.

    ``clock`` is set by whoever fills the cache; an entry at or past ``expires`` is not served.
    """

    clock: IReactorTime | None = None
    served: int = 0
    missing: int = 0
    _entries: dict[bytes, Staple] = attrs.field(factory=dict, init=False)

    def put(self, key: bytes, staple: Staple) -> None:
        self._entries[key] = staple

    def get(self, key: bytes) -> Staple | None:
        """The staple for ``key`` if it is still fresh."""
        staple = self._entries.get(key)
        if staple is None:
            return None
        if self.clock is not None and staple.expires <= self.clock.seconds():
            return None
        return staple

    def drop(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def retain(self, keys: Iterable[bytes]) -> None:
        """Forget staples of certificates no longer in use (after a rotation)."""
        keep = set(keys)
        for key in [k for k in self._entries if k not in keep]:
            del self._entries[key]

    def current(self, key: bytes) -> bytes:
        """The DER to staple for ``key``, or b"" (staple nothing). Runs inside handshakes."""
        staple = self.get(key)
        if staple is None:
            self.missing += 1
            return b""
        self.served += 1
        return staple.der

    def callback_for(self, leaf: x509.Certificate) -> Callable[[], bytes]:
        """What a server context calls for ``leaf``'s staple."""
        key = fingerprint(leaf)
        return lambda: self.current(key)


@attrs.define(eq=False)
class _Target:
    """One certificate we staple for, and the state of its refreshes."""

    service: str
    leaf: x509.Certificate
    issuer: x509.Certificate
    timer: IDelayedCall | None = None
    fetching: Deferred | None = None
    failures: int = 0
    refreshes: int = 0
    last_error: str | None = None



@attrs.define(eq=False)
class StapleService(Service):
    """Keeps ``cache`` holding a fresh OCSP answer for each served certificate.

    ``targets`` returns (service name, leaf, issuer) for every certificate a server context may
    present (the trust store's services with inbound routes); ``source`` fetches the answers
    (:class:`s2sgw.status.ocsp.OCSPStatusChecker`).
    """

    targets: Callable[[], Iterable[tuple[str, x509.Certificate, x509.Certificate]]]
    source: IStapleSource
    clock: IReactorTime
    cache: StapleCache
    retry_min: float = 1.0
    retry_max: float = 60.0
    min_refresh: float = 1.0
    max_age: float = 300.0  # lifetime of an answer without nextUpdate
    metrics: StapleMetrics = attrs.field(factory=StapleMetrics)  # handed over by build_gateway
    _targets: dict[bytes, _Target] = attrs.field(factory=dict, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self.cache.clock = self.clock

    # -- service

    def startService(self) -> None:
        super().startService()
        self.sync()

    def stopService(self) -> None:
        super().stopService()
        for target in self._targets.values():
            self._cancel(target)

    def trust_reloaded(self, generation: int | None = None) -> Deferred[None]:
        """After a reload: follow rotated certificates and ask again for every one."""
        return self.sync(refresh=True)

    # -- refreshing

    def sync(self, *, refresh: bool = False) -> Deferred[None]:
        """Match the targets to the current certificates; fetch for new ones (all, with
        ``refresh``). Fires when the fetches started here are done (they never fail)."""
        wanted: dict[bytes, _Target] = {}
        for service, leaf, issuer in self.targets():
            wanted[fingerprint(leaf)] = _Target(service, leaf, issuer)
        for key in [k for k in self._targets if k not in wanted]:
            self._cancel(self._targets.pop(key))
        self.cache.retain(wanted)
        started = []
        for key, fresh in wanted.items():
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = fresh
            elif not refresh:
                continue
            elif target.service != fresh.service or target.issuer != fresh.issuer:
                target.service, target.issuer = fresh.service, fresh.issuer
            started.append(self.refresh(key))
        return defer.DeferredList(started).addCallback(lambda _: None)

    def refresh(self, key: bytes) -> Deferred[None]:
        """Fetch a new staple for ``key`` now (joins a fetch already running)."""
        target = self._targets.get(key)
        if target is None or not self.running:
            return defer.succeed(None)
        if target.fetching is not None:
            done: Deferred[None] = Deferred()
            target.fetching.addBoth(lambda result: (done.callback(None), result)[1])
            return done
        if target.timer is not None and target.timer.active():
            target.timer.cancel()
        target.timer = None
        d = defer.maybeDeferred(self.source.fetch_staple, target.leaf, target.issuer)
        target.fetching = d
        d.addCallbacks(self._fetched, self._failed, callbackArgs=(key, target), errbackArgs=(key, target))
        d.addErrback(self._bug, target)
        return d

    def _fetched(self, answer: tuple[bytes, CertStatus], key: bytes, target: _Target) -> None:
        target.fetching = None
        der, status = answer
        self.metrics.fetches.labels(status.state).inc()
        if status.state not in ("good", "revoked"):
            self._failed(Failure(StatusInvalid(f"the CA answered {status.state}")), key, target, counted=True)
            return
        now = self.clock.seconds()
        this_update = status.this_update.timestamp()
        if status.next_update is not None:
            expires = status.next_update.timestamp()
        else:
            expires = this_update + self.max_age
        if expires <= now:
            self._failed(Failure(StatusInvalid("the answer is already past its nextUpdate")), key, target, counted=True)
            return
        if self._targets.get(key) is not target:
            return  # rotated away while we were asking
        self.cache.put(key, Staple(der, status, expires))
        if target.failures:
            self._log.info(
                "OCSP staple for service {service} (serial {serial}) fetched again after {failures} failures",
                service=target.service,
                serial=serial_text(target.leaf.serial_number),
                failures=target.failures,
            )
        target.failures = 0
        target.last_error = None
        target.refreshes += 1
        # Ask again at half the validity; an answer whose midpoint has passed, at half what is left.
        at = this_update + (expires - this_update) / 2
        if at <= now + self.min_refresh:
            at = now + (expires - now) / 2
        self._schedule(key, target, max(self.min_refresh, at - now))

    def _failed(self, failure: Failure, key: bytes, target: _Target, counted: bool = False) -> None:
        target.fetching = None
        failure.trap(StatusUnavailable, StatusInvalid, defer.CancelledError)
        if failure.check(defer.CancelledError):
            return
        if not counted:
            self.metrics.fetches.labels("unavailable" if failure.check(StatusUnavailable) else "invalid").inc()
        target.failures += 1
        target.last_error = failure.getErrorMessage()
        if target.failures == 1:
            self._log.warn(
                "OCSP staple for service {service} (serial {serial}) not fetched: {error}; peers ask the CA themselves",
                service=target.service,
                serial=serial_text(target.leaf.serial_number),
                error=target.last_error,
            )
        if self._targets.get(key) is target:
            delay = min(self.retry_max, self.retry_min * 2 ** (target.failures - 1))
            self._schedule(key, target, delay)

    def _bug(self, failure: Failure, target: _Target) -> None:
        target.fetching = None
        self._log.failure("OCSP staple refresh for service {service}", failure, service=target.service)

    def _schedule(self, key: bytes, target: _Target, delay: float) -> None:
        if not self.running:
            return
        if target.timer is not None and target.timer.active():
            target.timer.cancel()
        target.timer = self.clock.callLater(delay, self._due, key)

    def _due(self, key: bytes) -> None:
        target = self._targets.get(key)
        if target is not None:
            target.timer = None
            self.refresh(key)

    def _cancel(self, target: _Target) -> None:
        if target.timer is not None and target.timer.active():
            target.timer.cancel()
        target.timer = None
        fetching, target.fetching = target.fetching, None
        if fetching is not None:
            fetching.cancel()

    # -- reporting

    def status(self) -> dict[str, Any]:
        """The ``stapling`` field of the gateway's status: plain JSON types."""
        services = {}
        for key, target in self._targets.items():
            staple = self.cache.get(key)
            services[target.service] = {
                "serial": serial_text(target.leaf.serial_number),
                "stapling": staple is not None,
                "state": staple.status.state if staple else None,
                "this_update": staple.status.this_update.isoformat() if staple else None,
                "next_update": utc(staple.expires).isoformat() if staple else None,
                "refreshes": target.refreshes,
                "failures": target.failures,
                "last_error": target.last_error,
            }
        return {"services": services, "served": self.cache.served, "missing": self.cache.missing}


def inbound_targets(trust_store: ITrustStore) -> Callable[[], list[tuple[str, x509.Certificate, x509.Certificate]]]:
    """The certificates ``trust_store``'s server contexts present: services with inbound routes."""

    def targets() -> list[tuple[str, x509.Certificate, x509.Certificate]]:
        material = trust_store.material
        serving = {service.name for service in material.config.services if service.inbound}
        return [
            (name, service.chain[0], service.chain[1])
            for name, service in material.services.items()
            if name in serving and len(service.chain) > 1
        ]

    return targets


def stapling_enabled(config: GatewayConfig) -> bool:
    """Whether ``config`` staples: status mode ocsp with ``status.staple``."""
    return config.status.mode == "ocsp" and config.status.staple
