"""File descriptors: raise the soft limit at start, and say so when it cannot fit the routes.

Every relayed connection holds two descriptors (the peer and the backend or remote), every
connection not yet authorized one. systemd's default soft limit is 1,024: a gateway with
``max_connections = 1024`` would run out first, and connections, allowed ones too, would be
closed at accept. So at start the soft limit is raised to the hard limit (the units set
``LimitNOFILE``), and a warning names the shortfall when even that is too low.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

from s2sgw.config import GatewayConfig

MARGIN = 64  # listeners, logs, the admin endpoint, status queries, reloads
CEILING = 1 << 20  # when the hard limit is unlimited


def descriptors_needed(config: GatewayConfig) -> int:
    """Descriptors the configured routes may hold at once, plus :data:`MARGIN`."""
    needed = MARGIN
    for service in config.services:
        for inbound in service.inbound:
            needed += 2 * inbound.max_connections + inbound.max_pending
        for outbound in service.outbound:
            needed += 2 * outbound.max_connections
    return needed


@attrs.frozen
class DescriptorLimit:
    before: int  # the soft limit found
    soft: int  # the soft limit now
    hard: int
    needed: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed


def raise_soft_limit(
    needed: int,
    get: Callable[[int], tuple[int, int]] = resource.getrlimit,
    set_: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> DescriptorLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (never lower it)."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(needed, CEILING)
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            set_(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError):
            now = soft
    return DescriptorLimit(soft, now, hard, needed)


@attrs.define(eq=False)
class DescriptorLimitService(Service):
    """Raises the descriptor limit before the listeners bind, and logs the outcome."""

    config: GatewayConfig
    get: Callable[[int], tuple[int, int]] = resource.getrlimit
    set_: Callable[[int, tuple[int, int]], None] = resource.setrlimit
    limit: DescriptorLimit | None = None
    _log = Logger()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        limit = self.limit = raise_soft_limit(descriptors_needed(self.config), self.get, self.set_)
        if limit.soft != limit.before:
            self._log.info(
                "descriptor limit raised from {before} to {soft}", before=limit.before, soft=limit.soft
            )
        if not limit.enough:
            self._log.warn(
                "descriptor limit {soft} (hard {hard}) cannot fit the configured connections: {needed} "
                "needed (2 per connection, 1 per pending one, plus {margin}); raise LimitNOFILE, or "
                "connections will be refused at accept (no_descriptors)",
                soft=limit.soft,
                hard=limit.hard,
                needed=limit.needed,
                margin=MARGIN,
            )

    def status(self) -> dict[str, int | bool]:
        """For ``/status``."""
        limit = self.limit
        if limit is None:
            return {}
        return {"soft": limit.soft, "hard": limit.hard, "needed": limit.needed, "enough": limit.enough}
