"""``twistd s2sgw`` with ``workers = N`` (N > 1): the parent's services, wired."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService

from s2sgw.config import GatewayConfig
from s2sgw.ops.logs import LogSetup
from s2sgw.ops.metrics import MetricsService
from s2sgw.workers.admin import ParentAdminService
from s2sgw.workers.renewal import ParentReport, attach_parent_renewal
from s2sgw.workers.supervisor import Supervisor, WorkerMetrics


def build_parent(
    config: GatewayConfig,
    reactor: Any,
    registry: CollectorRegistry | None = None,
    log_level: str = "info",
    log_format: str = "text",
    trust_store: Any = None,
) -> MultiService:
    """The supervisor of ``config.workers`` workers and, if configured, the admin endpoint over them.

    The workers log at ``log_level`` in ``log_format`` as a single process would; the parent's
    own log (:class:`LogSetup`, first to start) takes their lines as they are. With
    ``[enrollment]`` the parent renews the certificates with ``trust_store``, its own copy of
    the trust material (:mod:`s2sgw.workers.renewal`).

    The parent's own metrics go to a registry of their own (the workers' arrive merged beside
    them on ``/metrics``), so the parent's process metrics do not mix with the workers'.
    """
    registry = CollectorRegistry() if registry is None else registry
    top = MultiService()
    LogSetup(log_level, log_format).setServiceParent(top)
    metrics = WorkerMetrics()
    MetricsService((metrics,), registry).setServiceParent(top)
    supervisor = Supervisor(config, reactor, metrics, log_level=log_level, log_format=log_format)
    supervisor.setServiceParent(top)
    report = ParentReport()
    if config.enrollment is not None:
        if trust_store is None:
            raise ValueError("renewing certificates with workers needs the parent's trust store")
        attach_parent_renewal(supervisor, trust_store, reactor, registry, report).setServiceParent(top)
    if config.admin is not None:
        ParentAdminService(config.admin.listen, supervisor, reactor, registry, report).setServiceParent(top)
    return top
