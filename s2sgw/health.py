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
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw import pki
from s2sgw.config import GatewayConfig
from s2sgw.interfaces import CertStatus, StatusInvalid, StatusUnavailable

UTC = datetime.UTC
EXPIRY_CHECK_INTERVAL = 60.0


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, UTC)


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex; the first 16 digits name a root in metric labels."""
    return certificate.fingerprint(hashes.SHA256()).hex()


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
    InboundListener / OutboundConnector objects; ``checker`` is the authorizer's status checker.
    """

    trust_store: Any
    routes: Mapping[str, Any]
    checker: Any
    clock: IReactorTime
    probe_interval: float | None = 5.0  # None: no probes (nothing would read them)
    expiry_interval: float = EXPIRY_CHECK_INTERVAL
    registry: CollectorRegistry | None = None  # where the gauges go; None: prometheus' default
    on_change: Callable[[Readiness], None] | None = None
    probe: ProbeResult | None = None
    reload_error: str | None = None  # why the latest reload failed; None after a good one
    # More /status fields from other parts (e.g. "revocation_feed"): name -> () -> JSON value.
    sections: dict[str, Callable[[], Any]] = attrs.field(factory=dict)
    # More fields per service (e.g. "renewal"): name -> (service name) -> JSON value or None.
    service_sections: dict[str, Callable[[str], Any]] = attrs.field(factory=dict)
    # More readiness checks from other parts: () -> reasons not to be ready, in words.
    checks: list[Callable[[], list[str]]] = attrs.field(factory=list)
    _warned: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    _probing: Deferred | None = attrs.field(default=None, init=False)
    _timers: list[LoopingCall] = attrs.field(factory=list, init=False)
    _last: Readiness | None = attrs.field(default=None, init=False)
    _collector: Any = attrs.field(default=None, init=False)
    _log = Logger()

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._collector = _Collector(self)
        (REGISTRY if self.registry is None else self.registry).register(self._collector)
        self._every(self.expiry_interval, self.check_expiry)
        if self.probe_interval and self.probing_enabled:
            self._every(self.probe_interval, self.probe_status)
        self.changed()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for timer in self._timers:
            if timer.running:
                timer.stop()
        self._timers = []
        if self._collector is not None:
            (REGISTRY if self.registry is None else self.registry).unregister(self._collector)
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
        return _utc(self.clock.seconds())

    @property
    def config(self) -> GatewayConfig:
        return self.trust_store.config

    @property
    def probing_enabled(self) -> bool:
        """Probes need an OCSP checker with an HTTP client (the real one)."""
        return self.config.status.mode == "ocsp" and hasattr(self.checker, "http") and hasattr(self.checker, "url")

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
                    what = "answers invalid status" if probe.invalid else "is unreachable"
                    reasons.append(f"the CA status server {what} ({probe.error}): peers are refused (fail = closed)")
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

    def status(self) -> dict[str, Any]:
        """The ``/status`` document: plain JSON types, no secrets."""
        now = self.now()
        material = self.trust_store.material
        document = dict(self.trust_store.status())
        state = self.readiness()
        document["ready"] = state.ready
        document["reasons"] = list(state.reasons)
        document["now"] = now.isoformat()
        document["last_reload"] = _iso(getattr(self.trust_store, "last_reload", None))
        document["last_reload_failed"] = self.reload_error
        for name, entry in document.get("services", {}).items():
            leaf = material.services[name].leaf
            entry = dict(entry)
            entry["not_before"] = leaf.not_valid_before_utc.isoformat()
            entry["seconds_left"] = round((leaf.not_valid_after_utc - now).total_seconds(), 3)
            entry["chain"] = [
                {"subject": c.subject.rfc4514_string(), "not_after": c.not_valid_after_utc.isoformat()}
                for c in material.services[name].chain[1:]
            ]
            if self.probe is not None:
                entry["ca_status"] = self.probe.states.get(name)
            for field, section in self.service_sections.items():
                value = section(name)
                if value is not None:
                    entry[field] = value
            document["services"][name] = entry
        document["trust"] = [
            {
                "subject": root.subject.rfc4514_string(),
                "fingerprint_sha256": fingerprint(root),
                "not_after": root.not_valid_after_utc.isoformat(),
                "seconds_left": round((root.not_valid_after_utc - now).total_seconds(), 3),
            }
            for root in material.roots
        ]
        crl = material.crl
        document["crl"] = (
            None
            if crl is None
            else {
                "number": pki.crl_number(crl),
                "this_update": crl.last_update_utc.isoformat(),
                "next_update": _iso(crl.next_update_utc),
                "revoked": len(crl),
            }
        )
        document["status_checks"] = self._checker_status()
        document["routes"] = {
            name: {
                "direction": route.gate.direction,
                "service": route.route.service,
                "listen": route.route.listen,
                "listening": route.gate.port is not None,
                "address": _address(route.gate.port),
                "live_connections": route.active,
                "max_connections": route.route.max_connections,
                "draining": route.gate.draining,
            }
            for name, route in self.routes.items()
        }
        for name, section in self.sections.items():
            document[name] = section()
        return document

    def _checker_status(self) -> dict[str, Any]:
        status = self.config.status
        hits, misses = getattr(self.checker, "hits", None), getattr(self.checker, "misses", None)
        lookups = (hits or 0) + (misses or 0)
        probe = self.probe
        return {
            "mode": status.mode,
            "url": status.url,
            "fail": status.fail,
            "cache_entries": cache_entries(self.checker),
            "hits": hits,
            "misses": misses,
            "queries": getattr(self.checker, "queries", None),
            "hit_ratio": round(hits / lookups, 4) if hits is not None and lookups else None,
            "probe": None
            if probe is None
            else {
                "reachable": probe.reachable,
                "error": probe.error,
                "age_seconds": round(self.clock.seconds() - probe.at, 3),
                "own_status": dict(probe.states),
            },
        }

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
        if self._probing is not None:
            return defer.succeed(None)
        material = self.trust_store.material
        targets = [
            (name, service.leaf, service.chain[1])
            for name, service in material.services.items()
            if len(service.chain) > 1
        ]
        started = self.clock.seconds()
        d = defer.gatherResults(
            [_query_status(self.checker, self.clock, leaf, issuer) for _, leaf, issuer in targets],
            consumeErrors=True,
        )
        self._probing = d

        def done(statuses: list[CertStatus]) -> None:
            self._record(ProbeResult(started, True, states={n: s.state for (n, _, _), s in zip(targets, statuses)}))

        def failed(failure: Failure) -> None:
            error = failure.value.subFailure if isinstance(failure.value, defer.FirstError) else failure
            if error.check(defer.CancelledError):
                return
            invalid = error.check(StatusInvalid) is not None
            self._record(ProbeResult(started, False, error=error.getErrorMessage(), invalid=invalid))

        d.addCallbacks(done, failed)

        def finished(result: object) -> None:
            if self._probing is d:
                self._probing = None

        d.addBoth(finished)
        return d

    def _record(self, result: ProbeResult) -> None:
        previous, self.probe = self.probe, result
        if previous is None or previous.reachable != result.reachable:
            if result.reachable:
                self._log.info("CA status server reachable at {url}", url=self.checker.url)
            else:
                self._log.warn(
                    "CA status server at {url} fails readiness probes: {error}",
                    url=self.checker.url,
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


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _address(port: Any) -> str | None:
    if port is None:
        return None
    address = port.getHost()
    host, number = getattr(address, "host", None), getattr(address, "port", None)
    if number is not None:
        return f"[{host}]:{number}" if ":" in str(host) else f"{host}:{number}"
    name = getattr(address, "name", None)
    return name.decode() if isinstance(name, bytes) else (None if name is None else str(name))


def cache_entries(checker: Any) -> int | None:
    """How many answers the status checker holds (the OCSP checker's cache), if it has one."""
    cache = getattr(checker, "_cache", None)
    return None if cache is None else len(cache)


def _query_status(checker: Any, clock: IReactorTime, leaf: x509.Certificate, issuer: x509.Certificate) -> Deferred[CertStatus]:
    """One OCSP query with the checker's HTTP client, timeout and verification, without its cache."""
    from s2sgw import status as ocsp_status

    query = ocsp_status.build_request(leaf, issuer, nonce=ocsp_status.new_nonce())
    d = defer.maybeDeferred(
        checker.http.post,
        checker.url,
        data=query.der,
        headers={
            b"Content-Type": [ocsp_status.OCSP_REQUEST_TYPE],
            b"Accept": [b"application/ocsp-response"],
        },
    )

    def body(response: Any) -> Deferred[bytes]:
        read = ocsp_status.read_limited(response, getattr(checker, "max_body", ocsp_status.MAX_RESPONSE_BYTES))
        if response.code != 200:
            code = response.code

            def refuse(_: object) -> None:
                raise StatusUnavailable(f"HTTP {code}")

            read.addBoth(refuse)
        return read

    def verify(der: bytes) -> CertStatus:
        return ocsp_status.verify_response(
            der,
            query,
            issuer,
            now=_utc(clock.seconds()),
            leeway=getattr(checker, "leeway", ocsp_status.DEFAULT_LEEWAY),
            max_age=datetime.timedelta(seconds=getattr(checker, "max_cache_age", 300.0)),
        )

    def classify(failure: Failure) -> Failure:
        if failure.check(StatusUnavailable, StatusInvalid, defer.CancelledError):
            return failure
        return Failure(StatusUnavailable(ocsp_status._describe(failure)))

    def timed_out(result: object, timeout: float) -> Failure:
        return Failure(StatusUnavailable(f"no answer within {timeout:g}s"))

    d.addCallback(body)
    d.addTimeout(getattr(checker, "timeout", 2.0), clock, onTimeoutCancel=timed_out)
    d.addCallback(verify)
    d.addErrback(classify)
    return d


class _Collector:
    """Gauges computed at scrape time from the monitor's current snapshot (label sets are bounded:
    service names, root fingerprints and fixed words)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # computed on collect; no duplicate checks against fixed names needed

    def collect(self) -> Iterator[Metric]:
        monitor = self.monitor
        store = monitor.trust_store
        material = store.material
        now = monitor.now()
        certificates = GaugeMetricFamily(
            "s2sgw_certificate_expiry_seconds",
            "Seconds until each service's own certificate expires (negative: expired).",
            labels=["service"],
        )
        for name, service in material.services.items():
            certificates.add_metric([name], (service.leaf.not_valid_after_utc - now).total_seconds())
        yield certificates
        roots = GaugeMetricFamily(
            "s2sgw_trust_bundle_expiry_seconds",
            "Seconds until each root certificate of the trust bundle expires.",
            labels=["root", "fingerprint"],
        )
        for root in material.roots:
            roots.add_metric(
                [root.subject.rfc4514_string(), fingerprint(root)[:16]],
                (root.not_valid_after_utc - now).total_seconds(),
            )
        yield roots
        crl = material.crl
        if crl is not None:
            if crl.next_update_utc is not None:
                yield GaugeMetricFamily(
                    "s2sgw_crl_expiry_seconds",
                    "Seconds until the loaded CRL's nextUpdate (negative: stale).",
                    value=(crl.next_update_utc - now).total_seconds(),
                )
            number = pki.crl_number(crl)
            if number is not None:
                yield GaugeMetricFamily("s2sgw_crl_number", "CRL number of the loaded CRL.", value=number)
        reloads = CounterMetricFamily(
            "s2sgw_reloads", "Trust reloads by result (ok | failed).", labels=["result"]
        )
        reloads.add_metric(["ok"], max(0, store.generation - 1))
        reloads.add_metric(["failed"], getattr(store, "reload_failures", 0))
        yield reloads
        yield GaugeMetricFamily(
            "s2sgw_trust_generation", "Generation of the trust material in use (1 at start).", value=store.generation
        )
        yield GaugeMetricFamily(
            "s2sgw_ready", "1 when /readyz would answer 200, else 0.", value=1 if monitor.readiness().ready else 0
        )
        entries = cache_entries(monitor.checker)
        if entries is not None:
            yield GaugeMetricFamily("s2sgw_status_cache_entries", "Status answers held in the cache.", value=entries)
        probe = monitor.probe
        if probe is not None:
            yield GaugeMetricFamily(
                "s2sgw_status_server_up",
                "1 when the last readiness probe got a verified answer from the CA status server.",
                value=1 if probe.reachable else 0,
            )


@attrs.define(eq=False)
class Operations(MultiService):
    """Monitor, admin endpoint and systemd notification of one gateway process.

    Add it to the gateway's MultiService after the routes: it starts last (READY=1 once
    everything is bound) and stops first (STOPPING=1 before draining).
    """

    monitor: Monitor
    notify: Any = None  # NotifyService | None
    admin: Any = None  # AdminService | None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.monitor.setServiceParent(self)
        if self.admin is not None:
            self.admin.setServiceParent(self)
        if self.notify is not None:
            self.notify.setServiceParent(self)
            self.monitor.on_change = lambda state: self.notify.status(self.monitor.summary())

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        trust_store: Any,
        checker: Any,
        routes: Mapping[str, Any],
        reactor: Any,
        environ: Mapping[str, str] | None = None,
    ) -> Operations:
        from s2sgw.notify import Notifier, NotifyService

        environ = os.environ if environ is None else environ
        notifier = Notifier.from_environ(environ)
        watched = config.admin is not None or notifier is not None
        interval = config.admin.probe_interval if config.admin is not None else 5.0
        monitor = Monitor(trust_store, routes, checker, reactor, probe_interval=interval if watched else None)
        admin = None
        if config.admin is not None:
            from s2sgw.admin import AdminService

            admin = AdminService(config.admin.listen, monitor, reactor)
        notify = None
        if notifier is not None:
            notify = NotifyService(notifier, monitor.summary)
        return cls(monitor, notify, admin)

    def reloading(self, reload: Callable[[], Deferred[Any]]) -> Callable[[], Deferred[Any]]:
        """Remember each reload's outcome for the summary, and frame it for systemd (when notifying)."""
        monitor = self.monitor

        def tracked() -> Deferred[Any]:
            def outcome(result: object) -> object:
                monitor.reload_error = result.getErrorMessage() if isinstance(result, Failure) else None
                return result

            return reload().addBoth(outcome)

        return tracked if self.notify is None else self.notify.reloading(tracked)

    def reloaded(self, generation: int) -> None:
        """After a successful reload: check the new material's lifetimes and readiness now."""
        self.monitor.check_expiry()
