"""Certificate renewal with ``workers = N``: the parent renews, every worker takes the result.

Why in the parent: each worker renewing on its own would ask the CA N times and write the same
files N times over each other. The parent holds its own copy of the trust material (loaded
with the options, as a single process does), runs the same
:class:`~s2sgw.enroll.renewal.RenewalService`, writes the new key and certificate, reloads its
copy, and passes the reload to every worker; the renewal counts as in force once every worker
has reloaded (:meth:`Supervisor.reload`). Workers run without ``[enrollment]``.

Its state shows where the parent answers for the whole: the ``enrollment`` section and each
service's ``renewal`` field of ``/status``, and ``/readyz`` (a certificate in its last tenth
whose renewal keeps failing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred

from s2sgw.enroll.renewal import RenewalService, attach_renewal
from s2sgw.workers.supervisor import Supervisor

RELOAD_WAIT = 60.0  # seconds for every worker to put renewed files in force before it counts as failed


@attrs.define(eq=False)
class ParentReport:
    """What the parent's own parts add to its ``/status`` and ``/readyz`` (the fields a
    gateway's :class:`~s2sgw.ops.health.Monitor` offers its parts)."""

    sections: dict[str, Callable[[], Any]] = attrs.Factory(dict)
    service_sections: dict[str, Callable[[str], Any]] = attrs.Factory(dict)
    checks: list[Callable[[], list[str]]] = attrs.Factory(list)

    def changed(self) -> None:
        """Readiness is asked for on each ``/readyz``: nothing to push."""

    def problems(self) -> list[str]:
        return [problem for check in self.checks for problem in check()]

    def status(self, services: list[str]) -> dict[str, Any]:
        document: dict[str, Any] = {name: section() for name, section in self.sections.items()}
        if self.service_sections:
            document["services"] = {
                service: {field: section(service) for field, section in self.service_sections.items()}
                for service in services
            }
        return document


def reload_everywhere(supervisor: Supervisor, trust_store: Any, reactor: Any) -> Deferred[int]:
    """The parent's copy, then every worker: fires with the parent's trust generation once all
    have reloaded, or fails after :data:`RELOAD_WAIT` (the renewal is then retried)."""
    d = supervisor.reload()
    d.addTimeout(RELOAD_WAIT, reactor)
    return d.addCallback(lambda _: trust_store.generation)


def attach_parent_renewal(
    supervisor: Supervisor, trust_store: Any, reactor: Any, registry: CollectorRegistry, report: ParentReport
) -> RenewalService:
    """The renewal service of the parent: its reload is the parent's and every worker's."""
    reload = functools.partial(reload_everywhere, supervisor, trust_store, reactor)
    renewal = attach_renewal(supervisor.config, trust_store, reload, report, reactor, registry)
    supervisor.trust_store = trust_store
    supervisor.on_trust_reloaded = renewal.trust_reloaded
    return renewal
