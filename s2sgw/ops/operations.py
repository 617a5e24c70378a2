"""The operations side of one gateway process: readiness monitor, admin endpoint and systemd
notification, wired into one MultiService that starts last and stops first."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.config import GatewayConfig
from s2sgw.interfaces import IStatusCacheStats, IStatusProbe, ITrustStore
from s2sgw.ops.admin import AdminService
from s2sgw.ops.health import Monitor
from s2sgw.ops.notify import Notifier, NotifyService


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
        trust_store: ITrustStore,
        routes: Mapping[str, Any],
        reactor: Any,
        environ: Mapping[str, str] | None = None,
        registry: CollectorRegistry = REGISTRY,
        *,
        cache_stats: IStatusCacheStats | None = None,
        prober: IStatusProbe | None = None,
    ) -> Operations:
        """The monitor's gauges go to ``registry``, which the admin endpoint serves; ``cache_stats``
        and ``prober``: see :class:`Monitor` (the status checker, when it provides them)."""
        environ = os.environ if environ is None else environ
        notifier = Notifier.from_environ(environ)
        watched = config.admin is not None or notifier is not None
        interval = config.admin.probe_interval if config.admin is not None else 5.0
        monitor = Monitor(
            trust_store, routes, cache_stats, reactor, probe_interval=interval if watched else None,
            prober=prober, registry=registry,
        )
        admin = None
        if config.admin is not None:
            admin = AdminService(config.admin.listen, monitor, reactor, registry)
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

