"""The gateway's current TLS material, reloaded all-or-nothing.

A :class:`TrustMaterial` is one consistent snapshot: the trust bundle, each service's chain,
key and freshly built contexts, and the CRL in mode ``crl``. It is built and checked off the
reactor; only a complete, checked snapshot replaces the current one, in one assignment on the
reactor thread. The connection creators handed out read the snapshot that is current when a
handshake starts, so new connections use new material and live ones are untouched.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw import pki, tls
from s2sgw.config import (
    ConfigError,
    GatewayConfig,
    InboundRoute,
    OutboundRoute,
    ServiceConfig,
    load_config,
)
from s2sgw.interfaces import ITrustStore
from s2sgw.material import (
    ServiceMaterial,
    TrustMaterial,
    _check_crl,
    identity_warnings,
    load_material,
)
from s2sgw.reload import Coalesced
from s2sgw.status.settings import merge_status
from s2sgw.status.stapling import StapleCache, stapling_enabled

UTC = datetime.UTC


@implementer(ITrustStore)
@attrs.define(eq=False)
class TrustStore:
    """The current :class:`TrustMaterial`, connection creators that follow it, and reloads.

    ``reactor`` provides time (``seconds``) and, unless ``threadpool`` is given, the thread pool
    that reloads read files in. With ``reread_config`` a reload also re-reads the configuration
    file, so changed paths and allow-lists apply; changed listeners need a restart.
    """

    _reactor: Any
    _material: TrustMaterial
    threadpool: Any = None
    reread_config: bool = True
    reload_failures: int = 0
    last_error: str | None = None
    last_reload: datetime.datetime | None = None
    staples: StapleCache = attrs.field(factory=StapleCache)  # our own OCSP answers, for stapling
    _reloads: Coalesced = attrs.field(init=False)
    _log = Logger()

    @classmethod
    def load(
        cls,
        config: GatewayConfig,
        reactor: Any = None,
        *,
        threadpool: Any = None,
        reread_config: bool = True,
    ) -> TrustStore:
        """Load synchronously: for start-up, before the reactor runs. Raises ConfigError.

        Without a ``reactor`` the global one is looked up only when first needed, so calling
        this from ``twistd``'s option parsing does not install a reactor early.
        """
        # Before any reactor exists the wall clock is the only clock there is.
        now = _now(reactor) if reactor is not None else datetime.datetime.now(UTC)
        staples = StapleCache()
        material = load_material(config, now, 1, staples=staples)
        store = cls(reactor, material, threadpool=threadpool, reread_config=reread_config, staples=staples)
        store._log.info(
            "trust material loaded: generation {generation}, {services}",
            generation=material.generation,
            services=_describe_services(material),
        )
        for warning in identity_warnings(material):
            store._log.warn("{warning}", warning=warning)
        return store

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # -- what is current -----------------------------------------------------------------------

    @property
    def material(self) -> TrustMaterial:
        return self._material

    @property
    def generation(self) -> int:
        return self._material.generation

    @property
    def config(self) -> GatewayConfig:
        return self._material.config

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._material.roots

    @property
    def trust_domain(self) -> str | None:
        return self._material.trust_domain

    @property
    def crl(self) -> x509.CertificateRevocationList | None:
        return self._material.crl

    def service(self, name: str) -> ServiceMaterial:
        try:
            return self._material.services[name]
        except KeyError:
            raise KeyError(f"no service named {name!r} in the trust store") from None

    def leaf(self, service: str) -> x509.Certificate:
        return self.service(service).leaf

    def chain(self, service: str) -> tuple[x509.Certificate, ...]:
        return self.service(service).chain

    def route(self, name: str) -> InboundRoute | OutboundRoute | None:
        """The current configuration of route ``name`` (allow-lists change on reload)."""
        for service in self._material.config.services:
            for route in (*service.inbound, *service.outbound):
                if route.name == name:
                    return route
        return None

    def verify_chain(self, chain: Sequence[x509.Certificate]) -> bool:
        """Whether ``chain`` (leaf first) still verifies against the current roots, now."""
        if not chain:
            return False
        try:
            pki.verify_chain(chain, self._material.roots, _now(self.reactor))
        except Exception:
            return False
        return True

    def crl_revoked(self, leaf: x509.Certificate) -> bool | None:
        """Mode ``crl``: whether the current CRL lists ``leaf``; None without a CRL."""
        crl = self._material.crl
        return None if crl is None else pki.is_revoked(crl, leaf)

    def check_crl_bytes(self, data: bytes, source: str = "fetched CRL") -> x509.CertificateRevocationList:
        """Check a CRL (e.g. fetched from the CA) before it is written: signature, freshness and
        a CRL number not below the current one. Raises ConfigError."""
        try:
            crl = pki.parse_crl(data, source)
            _check_crl(crl, self._material, _now(self.reactor), source, self._material)
        except pki.PKIError as error:
            raise ConfigError(str(error)) from None
        return crl

    def status(self) -> dict[str, Any]:
        """A plain summary for the admin/status endpoint (no secrets)."""
        material = self._material
        return {
            "generation": material.generation,
            "loaded_at": material.loaded_at.isoformat(),
            "trust_domain": material.trust_domain,
            "roots": [root.subject.rfc4514_string() for root in material.roots],
            "crl_number": material.crl_number,
            "reload_failures": self.reload_failures,
            "last_error": self.last_error,
            "services": {
                name: {
                    "identity": pki.identity(service.leaf),
                    "serial": pki.serial_hex(service.leaf),
                    "not_after": service.leaf.not_valid_after_utc.isoformat(),
                }
                for name, service in material.services.items()
            },
        }

    # -- ITrustStore ---------------------------------------------------------------------------

    def server_context(self, service: str) -> SSL.Context:
        return self.service(service).server_context

    def client_context(self, service: str) -> SSL.Context:
        return self.service(service).client_context

    def server_creator(self, service: str) -> tls.ServerConnectionCreator:
        self.service(service)  # fail now, not at the first handshake
        return tls.ServerConnectionCreator(partial(self.server_context, service))

    def client_creator(self, service: str, hostname: str) -> tls.ClientConnectionCreator:
        self.service(service)
        return tls.ClientConnectionCreator(
            partial(self.client_context, service), hostname, request_staple=stapling_enabled(self._material.config)
        )

    def __attrs_post_init__(self) -> None:
        self._reloads = Coalesced(self._reload_once)

    def reload(self) -> Deferred[int]:
        """Load and check everything in a thread, then swap; fire the new generation.

        A reload requested while one runs waits for it and then runs once more (every such
        request shares that one run), so a file changed during a reload is never missed.
        """
        return self._reloads()

    def _reload_once(self) -> Deferred[int]:
        work = partial(self._build, self._material, _now(self.reactor))
        threadpool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        try:
            running = deferToThreadPool(self.reactor, threadpool, work)
        except Exception:  # a stopped pool: report it like any failed reload
            running = fail()
        return running.addCallbacks(self._swap, self._failed)

    def _build(self, current: TrustMaterial, now: datetime.datetime) -> tuple[TrustMaterial, list[str]]:
        """Runs in a thread: nothing here touches the store's state."""
        notes: list[str] = []
        config = current.config
        if self.reread_config:
            config = load_config(config.path)
            config, notes = _apply_config(current.config, config)
        material = load_material(
            config, now, current.generation + 1, services=list(current.services), previous=current, staples=self.staples
        )
        return material, notes

    def _swap(self, built: tuple[TrustMaterial, list[str]]) -> int:
        material, notes = built
        if material.generation != self._material.generation + 1:  # pragma: no cover - defensive
            raise ConfigError("trust material changed during the reload; try again")
        for note in notes:
            self._log.warn("reload: {note}", note=note)
        self._material = material
        self.last_reload = material.loaded_at
        self._log.info(
            "trust material reloaded: generation {generation}, {services}",
            generation=material.generation,
            services=_describe_services(material),
        )
        for warning in identity_warnings(material):
            self._log.warn("{warning}", warning=warning)
        return material.generation

    def _failed(self, failure: Failure) -> Failure:
        error = failure.value
        message = str(error) if isinstance(error, (ConfigError, pki.PKIError)) else repr(error)
        self.reload_failures += 1
        self.last_error = message
        self._log.warn(
            "trust reload failed, keeping generation {generation}: {error}",
            generation=self._material.generation,
            error=message,
        )
        if isinstance(error, ConfigError):
            return failure
        return Failure(ConfigError(message))


def _apply_config(running: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """What of ``new`` a running process can apply, and notes about what needs a restart.

    Paths, allow-lists, peers and status settings apply (but those of
    :data:`s2sgw.status.settings.NEEDS_RESTART`); the set of services and of listening endpoints
    is the running one.
    """
    notes: list[str] = []
    running_names = [s.name for s in running.services]
    new_by_name = {s.name: s for s in new.services}
    added = sorted(set(new_by_name) - set(running_names))
    removed = sorted(set(running_names) - set(new_by_name))
    if added:
        notes.append(f"services added ({', '.join(added)}) need a restart")
    if removed:
        notes.append(f"services removed ({', '.join(removed)}) keep running with their old settings until a restart")
    services = []
    for old in running.services:
        fresh = new_by_name.get(old.name, old)
        if _listeners(fresh) != _listeners(old):
            notes.append(f"listener changes of service {old.name} need a restart")
        services.append(
            attrs.evolve(
                fresh,
                inbound=_merge_routes(old.inbound, fresh.inbound),
                outbound=_merge_routes(old.outbound, fresh.outbound),
            )
        )
    if (new.admin, new.timeouts) != (running.admin, running.timeouts):
        notes.append("admin and timeout changes need a restart")
    status, status_notes = merge_status(running.status, new.status)
    notes.extend(status_notes)
    config = attrs.evolve(
        new, services=tuple(services), admin=running.admin, timeouts=running.timeouts, status=status
    )
    return config, notes


def _listeners(service: ServiceConfig) -> list[tuple[str, str]]:
    return [(r.name, r.listen) for r in service.inbound] + [(r.name, r.listen) for r in service.outbound]


def _merge_routes(old: tuple[Any, ...], new: tuple[Any, ...]) -> tuple[Any, ...]:
    """Keep the running routes; take each one's new settings where a route of that name remains."""
    by_name = {route.name: route for route in new}
    return tuple(
        attrs.evolve(by_name[route.name], listen=route.listen) if route.name in by_name else route
        for route in old
    )


def _describe_services(material: TrustMaterial) -> str:
    return "; ".join(f"{name}: {pki.describe(s.leaf)}" for name, s in material.services.items())


def _now(reactor: Any) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(reactor.seconds(), UTC)

