"""Each service renews its own certificate over EST before it expires; the bundle follows the CA.

A renewal runs at ``renew_at`` of the certificate's lifetime (from its issuance), jittered by
up to ±5 % of the lifetime so a fleet does not renew at once, and never after expiry. It makes a
new key in a thread, asks ``simplereenroll`` authenticated by the current certificate and key
(TLS client certificate, pinned root), checks the answer, writes key and certificate atomically
with the owner, group and mode of the files they replace, then runs the gateway's own coalesced
reload (the one SIGHUP runs) and checks that the new serial is in force. Live connections keep
the context they were made with; new ones get the new certificate: no connection fails.
A failure is retried with exponential back-off (1 s doubling to 5 min), kept short of expiry.
"""

from __future__ import annotations

import datetime
import functools
import random
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw import pki
from s2sgw.enroll.bundle import BundleRefused, merge
from s2sgw.enroll.client import (
    DEFAULT_TIMEOUT,
    REFUSED,
    ESTClient,
    ESTError,
    PinnedTLS,
    certs_pem,
    issued_chain,
    key_pem,
    key_type_of,
    make_csr,
    new_key,
)
from s2sgw.enroll.renewal_metrics import RenewalCollector
from s2sgw.enroll.schedule import (
    LAST_TENTH,
    MAX_RETRY,
    ServiceRenewal,
    renewal_time,
    retry_delay,
)
from s2sgw.errors import S2sgwError
from s2sgw.files import write_files
from s2sgw.wire import est
from s2sgw.wire.failover import Failover

UTC = datetime.UTC
BUNDLE_INTERVAL = 3600.0  # seconds between /cacerts refreshes besides those before renewals


class RenewalError(S2sgwError):
    """A renewal that cannot proceed or whose result is not in force."""


def _seconds(moment: datetime.datetime) -> float:
    return moment.timestamp()


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds, UTC).isoformat()


@attrs.define(eq=False)
class RenewalService(Service):
    """Renew the certificates of ``services`` and keep the trust bundle in step with the CA.

    ``trust_store`` is the gateway's :class:`~s2sgw.truststore.TrustStore` (current material and
    configuration); ``reload`` is the gateway's coalesced reload that fires once files written
    before the call are in force (``ReloadService.reload_now``). ``in_thread(f, *args)`` runs
    blocking work (key generation, file writes); ``http`` is handed to :class:`ESTClient`.
    """

    trust_store: Any
    reload: Callable[[], Deferred[int]]
    reactor: Any
    services: tuple[str, ...]
    http: Callable[[Any], Any] | None = None
    in_thread: Callable[..., Deferred[Any]] | None = None
    random: Callable[[], float] = random.random
    registry: CollectorRegistry = REGISTRY  # the renewal gauges, while the service runs
    timeout: float = DEFAULT_TIMEOUT
    bundle_interval: float = BUNDLE_INTERVAL
    on_change: Callable[[], None] | None = None  # readiness may have changed
    bundle_status: dict[str, Any] = attrs.field(factory=dict)
    _log = Logger()

    _states: dict[str, ServiceRenewal] = attrs.field(factory=dict, init=False)
    _published: set[str] = attrs.field(factory=set, init=False)  # root fingerprints the CA published
    _refreshing: Deferred | None = attrs.field(default=None, init=False)
    _bundle_timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _collector: Any = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _servers: Failover | None = attrs.field(default=None, init=False)  # the EST servers, kept across renewals

    def __attrs_post_init__(self) -> None:
        self._states = {name: ServiceRenewal(name) for name in self.services}

    # -- service -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._collector = RenewalCollector(self._states)
        self.registry.register(self._collector)
        for name in self.services:
            self.schedule(name)
        self.refresh_bundle()

    def stopService(self) -> None:
        self._stopping = True
        super().stopService()
        for state in self._states.values():
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = None
            if state.running is not None:
                state.running.cancel()
        if self._bundle_timer is not None and self._bundle_timer.active():
            self._bundle_timer.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        if self._servers is not None:
            self._servers.stop()

    def state(self, name: str) -> ServiceRenewal:
        return self._states[name]

    # -- scheduling ----------------------------------------------------------------------------

    def schedule(self, name: str, delay: float | None = None) -> float:
        """Arm the next renewal of ``name``: at its renewal time, or in ``delay`` seconds."""
        state = self._states[name]
        now = self.reactor.seconds()
        leaf = self.trust_store.leaf(name)
        state.serial = leaf.serial_number
        if delay is None:
            at = renewal_time(
                _seconds(leaf.not_valid_before_utc),
                _seconds(leaf.not_valid_after_utc),
                self._enrollment().renew_at,
                2 * self.random() - 1,
                state.issued_at,
            )
            delay = max(0.0, at - now)
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.next_at = now + delay
        state.timer = self.reactor.callLater(delay, self.renew, name)
        return state.next_at

    def trust_reloaded(self, generation: int) -> None:
        """After any reload: a certificate replaced from outside (``s2sgw enroll`` and SIGHUP, say,
        after an outage) gets a fresh schedule and a clean failure count."""
        for name, state in self._states.items():
            if self._stopping or state.running is not None:
                continue  # a renewal of ours is putting its own certificate in force
            leaf = self.trust_store.leaf(name)
            if state.serial is not None and leaf.serial_number != state.serial:
                self._log.info(
                    "certificate of service {service} replaced by a reload (serial {serial}); renewal rescheduled",
                    service=name,
                    serial=pki.serial_hex(leaf),
                )
                state.failures, state.warned, state.issued_at = 0, False, None
                self.schedule(name)
                self._changed()

    def _enrollment(self) -> Any:
        enrollment = self.trust_store.config.enrollment
        if enrollment is None:
            raise RenewalError("the configuration no longer has an [enrollment] table")
        return enrollment

    def _run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.in_thread is not None:
            return self.in_thread(f, *args)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _pinned_client(self, chain: tuple[x509.Certificate, ...] = (), key: Any = None) -> ESTClient:
        enrollment = self._enrollment()
        pinned = [root for root in self.trust_store.roots if est.fingerprint(root) == enrollment.fingerprint]
        if not pinned:
            raise RenewalError(f"the trust bundle holds no root with the pinned fingerprint {enrollment.fingerprint}")
        if self._servers is None or self._servers.urls != enrollment.urls:
            if self._servers is not None:
                self._servers.stop()
            self._servers = Failover(enrollment.urls, self.reactor, label="EST server")
        tls = PinnedTLS((pinned[0],), chain, key)
        return ESTClient(enrollment.urls, self.reactor, tls, self.timeout, self.http, servers=self._servers)

    # -- renewal -------------------------------------------------------------------------------

    def renew(self, name: str) -> Deferred[None]:
        """Renew ``name`` now (unless a renewal of it runs); fires once the outcome is recorded."""
        state = self._states[name]
        if state.running is not None or self._stopping:
            return defer.succeed(None)
        state.timer = None
        d = state.running = defer.ensureDeferred(self._renew(name))
        d.addCallbacks(self._renewed, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        d.addErrback(lambda failure: self._log.failure("renewal of service {service} broke", failure, service=name))

        def finished(result: object) -> None:
            state.running = None

        d.addBoth(finished)
        return d

    async def _renew(self, name: str) -> tuple[x509.Certificate, x509.Certificate]:
        material = self.trust_store.service(name)
        old = material.leaf
        client = self._pinned_client(material.chain, material.key)
        # A new root reaches the bundle before a certificate chaining to it is installed.
        await self.refresh_bundle()
        key = await self._run(new_key, key_type_of(material.key))
        names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        csr = await self._run(make_csr, key, str(names[0].value) if names else None)
        issued = await client.simplereenroll(csr)
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), UTC)
        chain = issued_chain(issued, key, self.trust_store.roots, now)
        new = chain[0]
        if pki.identity(new) != pki.identity(old):
            raise RenewalError(f"the CA answered with a certificate for {pki.identity(new)}, not {pki.identity(old)}")
        config = next(s for s in self.trust_store.config.services if s.name == name)
        files = [(config.key, key_pem(key), 0o600), (config.cert, certs_pem(chain), 0o644)]
        await self._run(functools.partial(write_files, files, keep_owner=True))
        generation = await self.reload()
        in_force = self.trust_store.leaf(name)
        if in_force.serial_number != new.serial_number:
            raise RenewalError(
                f"serial {pki.serial_hex(new)} was written, but trust generation {generation} "
                f"holds serial {pki.serial_hex(in_force)}"
            )
        return old, new

    def _renewed(self, result: tuple[x509.Certificate, x509.Certificate], name: str) -> None:
        old, new = result
        state = self._states[name]
        now = self.reactor.seconds()
        state.issued_at, state.last_at, state.last_result = now, now, "ok"
        state.failures, state.last_error, state.warned = 0, None, False
        state.counts["ok"] += 1
        at = self.schedule(name)
        self._log.info(
            "certificate of service {service} renewed: serial {old_serial} -> {new_serial}, "
            "valid until {not_after}; next renewal at {next_renewal}",
            service=name,
            old_serial=pki.serial_hex(old),
            new_serial=pki.serial_hex(new),
            not_after=new.not_valid_after_utc.isoformat(),
            next_renewal=_iso(at),
        )
        self._changed()

    def _failed(self, failure: Failure, name: str) -> None:
        if self._stopping and failure.check(defer.CancelledError):
            return
        failure.trap(Exception)
        state = self._states[name]
        now = self.reactor.seconds()
        result = "refused" if failure.check(ESTError) and failure.value.kind == REFUSED else "failed"
        reason = _reason(failure)
        state.failures += 1
        state.last_at, state.last_result, state.last_error = now, result, reason
        state.counts[result] += 1
        leaf = self.trust_store.leaf(name)
        remaining = _seconds(leaf.not_valid_after_utc) - now
        delay = retry_delay(state.failures, remaining)
        retry_after = getattr(failure.value, "retry_after", None)
        if retry_after is not None:
            delay = min(max(delay, retry_after), MAX_RETRY)
        self.schedule(name, delay)
        self._log.warn(
            "renewal of service {service} failed ({failures} in a row), retrying in {delay:.0f} s: {reason}",
            service=name,
            failures=state.failures,
            delay=delay,
            reason=reason,
        )
        if remaining <= 0:
            self._log.warn(
                "certificate of service {service} has expired; the CA renews only valid certificates: "
                "enroll again with a new token (s2sgw ca token, s2sgw enroll)",
                service=name,
            )
        self._changed()

    def _changed(self) -> None:
        self.readiness_problems(warn=True)  # logs the warning when a service enters that state
        if self.on_change is not None:
            self.on_change()

    # -- readiness and status ------------------------------------------------------------------

    def readiness_problems(self, warn: bool = False) -> list[str]:
        """Why the gateway is not ready: a certificate in its last tenth and renewal failing."""
        problems = []
        now = self.reactor.seconds()
        for name, state in self._states.items():
            leaf = self.trust_store.leaf(name)
            start, end = _seconds(leaf.not_valid_before_utc), _seconds(leaf.not_valid_after_utc)
            left = (end - now) / (end - start) if end > start else 0.0
            if state.failures and left <= LAST_TENTH:
                problem = (
                    f"certificate of service {name} is in the last tenth of its lifetime and renewal "
                    f"keeps failing ({state.failures} in a row: {state.last_error})"
                )
                problems.append(problem)
                if warn and not state.warned:
                    state.warned = True
                    self._log.warn("{problem}", problem=problem, service=name)
        return problems

    def service_status(self, name: str) -> dict[str, Any] | None:
        """The ``renewal`` field of a service in ``/status`` (None for services that do not renew)."""
        state = self._states.get(name)
        if state is None:
            return None
        return {
            "next_renewal": _iso(state.next_at),
            "last_renewal": _iso(state.last_at),
            "last_result": state.last_result,
            "last_error": state.last_error,
            "failures_in_row": state.failures,
            "renewals": state.counts["ok"],
            "running": state.running is not None,
        }

    def status(self) -> dict[str, Any]:
        """The ``enrollment`` section of ``/status``: where renewal goes and the bundle's last refresh."""
        enrollment = self.trust_store.config.enrollment
        return {
            "urls": list(enrollment.urls) if enrollment is not None else [],
            "in_use": self._servers.current if self._servers is not None else None,
            "fingerprint": enrollment.fingerprint if enrollment is not None else None,
            "renew_at": enrollment.renew_at if enrollment is not None else None,
            "trust_bundle": dict(self.bundle_status),
        }

    # -- trust bundle --------------------------------------------------------------------------

    def refresh_bundle(self) -> Deferred[str]:
        """Fetch ``/cacerts`` and merge it into the trust bundle; fire with the outcome."""
        if self._refreshing is not None or self._stopping:
            return defer.succeed("busy")
        if self._bundle_timer is not None and self._bundle_timer.active():
            self._bundle_timer.cancel()
        d = self._refreshing = defer.ensureDeferred(self._refresh_bundle())
        d.addErrback(self._bundle_failed)

        def finished(outcome: str) -> str:
            self._refreshing = None
            self.bundle_status.update(last_result=outcome, last_at=_iso(self.reactor.seconds()))
            if not self._stopping:
                self._bundle_timer = self.reactor.callLater(self.bundle_interval, self.refresh_bundle)
            return outcome

        d.addCallback(finished)
        return d

    async def _refresh_bundle(self) -> str:
        client = self._pinned_client()
        answer = await client.cacerts()
        material = self.trust_store.material
        chains = [service.chain for service in material.services.values()]
        update = merge(material.roots, answer, self._enrollment().fingerprint, self._published, chains)
        self._published |= update.published
        self.bundle_status["last_error"] = None
        if not update.changed:
            return "unchanged"
        path = self.trust_store.config.trust
        await self._run(functools.partial(write_files, [(path, certs_pem(update.roots), 0o644)], keep_owner=True))
        generation = await self.reload()
        self._log.info(
            "trust bundle {path} follows the CA: added {added}, dropped {dropped} (trust generation {generation})",
            path=str(path),
            added=[root.subject.rfc4514_string() for root in update.added] or "none",
            dropped=[root.subject.rfc4514_string() for root in update.dropped] or "none",
            generation=generation,
        )
        return "updated"

    def _bundle_failed(self, failure: Failure) -> str:
        if self._stopping and failure.check(defer.CancelledError):
            return "stopped"
        failure.trap(Exception)
        reason = _reason(failure)
        self.bundle_status["last_error"] = reason
        if failure.check(BundleRefused):
            self._log.warn("CA certificates refused: {reason}", reason=reason)
            return "refused"
        self._log.warn("trust bundle refresh failed, keeping the bundle: {reason}", reason=reason)
        return "failed"


def _reason(failure: Failure) -> str:
    if failure.check(S2sgwError):
        return str(failure.value)
    if failure.check(OSError):
        return f"cannot write {failure.value.filename}: {failure.value.strerror}"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def attach_renewal(
    config: Any,
    trust_store: Any,
    reload: Callable[[], Deferred[int]],
    monitor: Any,
    reactor: Any,
    registry: CollectorRegistry = REGISTRY,
) -> RenewalService:
    """The gateway's renewal service for ``config`` (with ``[enrollment]``), reported by ``monitor``:
    readiness, a ``renewal`` field per service and an ``enrollment`` section in ``/status``."""
    service = RenewalService(
        trust_store,
        reload,
        reactor,
        tuple(s.name for s in config.services if s.renew),
        registry=registry,
        on_change=monitor.changed,
    )
    monitor.checks.append(service.readiness_problems)
    monitor.service_sections["renewal"] = service.service_status
    monitor.sections["enrollment"] = service.status
    return service
