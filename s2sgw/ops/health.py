"""Is this gateway fit to take traffic, and what expires next?

:class:`Monitor` answers readiness (every listener bound, every identity valid, trust loaded,
the CA status server reachable when refusing without it), builds the ``/status`` summary, logs
expiry warnings ahead of time and exposes the matching Prometheus gauges, computed when scraped
from the trust store's current snapshot. Reachability is probed with a real OCSP query for the
gateway's own certificates that bypasses the status cache, so a cached answer cannot hide a CA
that went away, and probes do not count as cache lookups.

:class:`Operations` wires the monitor, the admin endpoint and systemd notification into one
MultiService for :func:`s2sgw.service.build_gateway`.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography import x509
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw import pki
from s2sgw.config import GatewayConfig
from s2sgw.interfaces import IStatusCacheStats, IStatusProbe, ITrustStore
from s2sgw.ops.health_metrics import HealthCollector
from s2sgw.timeutil import utc
from s2sgw.wire.est import fingerprint
from s2sgw.wire.ocsp import CertStatus, StatusInvalid

UTC = datetime.UTC
EXPIRY_CHECK_INTERVAL = 60.0


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"


@attrs.frozen
class Expiring:
    """Something with a lifetime the gateway depends on: a certificate or the CRL."""

    kind: str  # "certificate" | "intermediate" | "root" | "crl"
    what: str  # words for the log: "certificate of service orders"
    key: str  # stable identity for "warned already" (fingerprint or CRL number)
    not_before: datetime.datetime
    not_after: datetime.datetime

    def left(self, now: datetime.datetime) -> float:
        return (self.not_after - now).total_seconds()

    def fraction_left(self, now: datetime.datetime) -> float:
        lifetime = (self.not_after - self.not_before).total_seconds()
        return self.left(now) / lifetime if lifetime > 0 else 0.0


@attrs.frozen
class ProbeResult:
    """The last readiness probe of the CA status server."""

    at: float  # clock seconds
    reachable: bool
    error: str | None = None  # why not, in words
    invalid: bool = False  # the server answered, but the answer did not verify
    states: Mapping[str, str] = attrs.field(factory=dict)  # service -> good | revoked | unknown


@attrs.frozen
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


class _Route:  # what the monitor reads from InboundListener / OutboundConnector (for typing)
    gate: Any
    route: Any
    active: int


@attrs.define(eq=False)
class Monitor(Service):
    """Readiness, the status summary, expiry warnings and the operational metrics of one gateway.

    ``trust_store`` is a :class:`s2sgw.truststore.TrustStore`; ``routes`` maps route names to
    InboundListener / OutboundConnector objects; ``cache_stats`` are the status checker's counters
    when it keeps a cache (else None); ``prober`` asks the CA status server for readiness (the OCSP
    checker in mode ``ocsp``, else None: no probes).
    """

    trust_store: ITrustStore
    routes: Mapping[str, Any]
    cache_stats: IStatusCacheStats | None
    clock: IReactorTime
    probe_interval: float | None = 5.0  # None: no probes (nothing would read them)
    expiry_interval: float = EXPIRY_CHECK_INTERVAL
    registry: CollectorRegistry = REGISTRY  # where the gauges go while the monitor runs
    on_change: Callable[[Readiness], None] | None = None
    probe: ProbeResult | None = None
    reload_error: str | None = None  # why the latest reload failed; None after a good one
    stopping: bool = False  # the process is stopping (draining): never ready again
    # More /status fields from other parts (e.g. "revocation_feed"): name -> () -> JSON value.
    sections: dict[str, Callable[[], Any]] = attrs.field(factory=dict)
    # More fields per service (e.g. "renewal"): name -> (service name) -> JSON value or None.
    service_sections: dict[str, Callable[[str], Any]] = attrs.field(factory=dict)
    # More readiness checks from other parts: () -> reasons not to be ready, in words.
    checks: list[Callable[[], list[str]]] = attrs.field(factory=list)
    prober: IStatusProbe | None = None
    _warned: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    _probing: Deferred | None = attrs.field(default=None, init=False)
    _timers: list[LoopingCall] = attrs.field(factory=list, init=False)
    _last: Readiness | None = attrs.field(default=None, init=False)
    _collector: Any = attrs.field(default=None, init=False)
    _log = Logger()

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._collector = HealthCollector(self)
        self.registry.register(self._collector)
        self._every(self.expiry_interval, self.check_expiry)
        if self.probe_interval and self.probing_enabled:
            self._every(self.probe_interval, self.probe_status)
        self.changed()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.stopping = True
        for timer in self._timers:
            if timer.running:
                timer.stop()
        self._timers = []
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()
        return None

    def _every(self, interval: float, work: Callable[[], object]) -> None:
        timer = LoopingCall(work)
        timer.clock = self.clock
        self._timers.append(timer)
        timer.start(interval, now=True).addErrback(
            lambda failure: self._log.failure("monitor timer stopped", failure)
        )

    # -- facts -----------------------------------------------------------------------------

    def now(self) -> datetime.datetime:
        return utc(self.clock.seconds())

    @property
    def config(self) -> GatewayConfig:
        return self.trust_store.config

    @property
    def probing_enabled(self) -> bool:
        """Probes need a prober, in mode ocsp."""
        return self.config.status.mode == "ocsp" and self.prober is not None

    def expiring(self) -> list[Expiring]:
        """Everything with a lifetime in the current material: leaves, their chains, roots, the CRL."""
        material = self.trust_store.material
        items: list[Expiring] = []
        seen: set[str] = set()
        for name, service in material.services.items():
            leaf = service.leaf
            items.append(
                Expiring(
                    "certificate",
                    f"certificate of service {name} ({pki.describe(leaf)})",
                    fingerprint(leaf),
                    leaf.not_valid_before_utc,
                    leaf.not_valid_after_utc,
                )
            )
            for certificate in service.chain[1:]:
                key = fingerprint(certificate)
                if key not in seen and not _is_root(certificate, material.roots):
                    seen.add(key)
                    items.append(
                        Expiring(
                            "intermediate",
                            f"intermediate {certificate.subject.rfc4514_string()} in the chain of service {name}",
                            key,
                            certificate.not_valid_before_utc,
                            certificate.not_valid_after_utc,
                        )
                    )
        for root in material.roots:
            items.append(
                Expiring(
                    "root",
                    f"trust bundle root {root.subject.rfc4514_string()}",
                    fingerprint(root),
                    root.not_valid_before_utc,
                    root.not_valid_after_utc,
                )
            )
        crl = material.crl
        if crl is not None and crl.next_update_utc is not None:
            items.append(
                Expiring(
                    "crl",
                    f"CRL number {pki.crl_number(crl)} ({self.config.status.crl})",
                    f"crl-{pki.crl_number(crl)}-{crl.last_update_utc.isoformat()}",
                    crl.last_update_utc,
                    crl.next_update_utc,
                )
            )
        for other in material.other_crls:  # e.g. the root's CRL: stale, it refuses every peer too
            if other.next_update_utc is not None:
                issuer = other.issuer.rfc4514_string()
                items.append(
                    Expiring(
                        "crl",
                        f"CRL of {issuer} number {pki.crl_number(other)} ({self.config.status.crl})",
                        f"crl-{issuer}-{pki.crl_number(other)}-{other.last_update_utc.isoformat()}",
                        other.last_update_utc,
                        other.next_update_utc,
                    )
                )
        return items

    def readiness(self) -> Readiness:
        """Ready, or the reasons why not, in words."""
        reasons: list[str] = []
        if self.stopping:
            reasons.append("stopping: live connections are draining")
        now = self.now()
        for name, route in self.routes.items():
            gate = route.gate
            if gate.draining:
                reasons.append(f"route {name} is stopping")
            elif gate.port is None:
                reasons.append(f"route {name} is not listening")
        material = self.trust_store.material
        if not material.roots:
            reasons.append("the trust bundle holds no certificate")
        elif all(root.not_valid_after_utc < now for root in material.roots):
            reasons.append("every root in the trust bundle has expired")
        for name, service in material.services.items():
            problem = pki.validity_problem(service.leaf, now)
            if problem is not None:
                reasons.append(f"certificate of service {name} {problem}")
            for certificate in service.chain[1:]:
                if certificate.not_valid_after_utc < now:
                    reasons.append(
                        f"chain of service {name}: {certificate.subject.rfc4514_string()} expired at "
                        f"{certificate.not_valid_after_utc.isoformat()}"
                    )
        status = self.config.status
        fail_closed = status.fail == "closed"
        if status.mode == "crl" and fail_closed:
            crl = material.crl
            if crl is None:
                reasons.append("no CRL loaded (status mode crl)")
            elif crl.next_update_utc is None or crl.next_update_utc < now:
                reasons.append(f"the CRL is stale (nextUpdate {crl.next_update_utc}): peers are refused")
            for other in material.other_crls:
                if other.next_update_utc is None or other.next_update_utc < now:
                    reasons.append(
                        f"the CRL of {other.issuer.rfc4514_string()} is stale "
                        f"(nextUpdate {other.next_update_utc}): peers are refused"
                    )
        if status.mode == "ocsp" and self.probe_interval and self.probing_enabled:
            probe = self.probe
            if probe is None:
                if fail_closed:
                    reasons.append("the CA status server has not been probed yet")
            else:
                if not probe.reachable and fail_closed:
                    answered = re.search(r"answered (HTTP \d+)", probe.error or "")
                    if probe.invalid:
                        what = f"answers invalid status ({probe.error})"
                    elif answered is not None:  # it is up, but says no: not the same fix as a dead host
                        what = f"answered {answered.group(1)}"
                    else:
                        what = f"is unreachable ({probe.error})"
                    reasons.append(f"the CA status server {what}: peers are refused (fail = closed)")
                for name, state in probe.states.items():
                    if state == "revoked":
                        reasons.append(f"certificate of service {name} is revoked at the CA: peers refuse it")
                    elif state == "unknown":
                        reasons.append(f"certificate of service {name} is unknown to the CA: peers refuse it")
        for check in self.checks:
            reasons.extend(check())
        return Readiness(not reasons, tuple(reasons))

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        state = self.readiness()
        live = sum(route.active for route in self.routes.values())
        listening = sum(1 for route in self.routes.values() if route.gate.port is not None)
        head = "ready" if state.ready else "not ready: " + "; ".join(state.reasons)
        reload = f"; last reload failed: {self.reload_error}" if self.reload_error else ""
        return (
            f"{head}; {listening}/{len(self.routes)} routes listening, {live} live connections, "
            f"trust generation {self.trust_store.generation}{reload}"
        )


    # -- expiry warnings -------------------------------------------------------------------

    def check_expiry(self) -> None:
        """Warn once per item when its remaining lifetime drops below the configured fraction,
        and once more when it has expired."""
        now = self.now()
        threshold = self.config.expiry_warning
        for item in self.expiring():
            left = item.left(now)
            if left <= 0:
                stage = "expired"
            elif item.fraction_left(now) <= threshold:
                stage = "soon"
            else:
                continue
            if (item.key, stage) in self._warned:
                continue
            self._warned.add((item.key, stage))
            if stage == "expired":
                self._log.warn(
                    "{what} expired {ago} ago, at {not_after}",
                    what=item.what,
                    kind=item.kind,
                    ago=_duration(left),
                    not_after=item.not_after.isoformat(),
                )
            else:
                self._log.warn(
                    "{what} expires in {left} ({percent:.0f}% of its lifetime left), at {not_after}",
                    what=item.what,
                    kind=item.kind,
                    left=_duration(left),
                    percent=100 * item.fraction_left(now),
                    not_after=item.not_after.isoformat(),
                )
        self.changed()

    # -- status server probe ---------------------------------------------------------------

    def probe_status(self) -> Deferred[None]:
        """Ask the CA about each service's own certificate, past the cache; record the outcome."""
        prober = self.prober
        if self._probing is not None or prober is None:
            return defer.succeed(None)
        material = self.trust_store.material
        targets = [
            (name, service.leaf, service.chain[1])
            for name, service in material.services.items()
            if len(service.chain) > 1
        ]
        started = self.clock.seconds()
        d = defer.gatherResults(
            [prober.probe(leaf, issuer) for _, leaf, issuer in targets],
            consumeErrors=True,
        )
        self._probing = d

        def done(statuses: list[CertStatus]) -> None:
            states = {n: s.state for (n, _, _), s in zip(targets, statuses)}
            self._record(ProbeResult(started, True, states=states), prober.in_use())

        def failed(failure: Failure) -> None:
            error = failure.value.subFailure if isinstance(failure.value, defer.FirstError) else failure
            if error.check(defer.CancelledError):
                return
            invalid = error.check(StatusInvalid) is not None
            self._record(ProbeResult(started, False, error=error.getErrorMessage(), invalid=invalid), prober.in_use())

        d.addCallbacks(done, failed)

        def finished(result: object) -> None:
            if self._probing is d:
                self._probing = None

        d.addBoth(finished)
        return d

    def _record(self, result: ProbeResult, url: str) -> None:
        previous, self.probe = self.probe, result
        if previous is None or previous.reachable != result.reachable:
            if result.reachable:
                self._log.info("CA status server reachable at {url}", url=url)
            else:
                self._log.warn(
                    "CA status server at {url} fails readiness probes: {error}",
                    url=url,
                    error=result.error,
                )
        self.changed()

    # -- change notification ---------------------------------------------------------------

    def changed(self) -> None:
        """Tell ``on_change`` when readiness (or its reasons) changed."""
        state = self.readiness()
        if state != self._last:
            self._last = state
            if self.on_change is not None:
                self.on_change(state)


def _is_root(certificate: x509.Certificate, roots: tuple[x509.Certificate, ...]) -> bool:
    return any(certificate == root for root in roots)
