"""``[status]`` on reload: every setting is applied to the running parts, or refused by name.

:func:`merge_status` decides, on the reload's thread, what of a new ``[status]`` goes in force:
the settings that need a restart keep their running value and produce a note naming the key
(logged by the trust store). :class:`StatusSettings` then hands the merged settings to the parts
that use them, on the reactor, once the reload has swapped the material: so ``/status``, which
reads the configuration in force, never shows a value the parts do not use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from s2sgw.config import StatusConfig

# Settings a running gateway cannot change: which checker runs, whether it staples, the CRL timer.
NEEDS_RESTART = ("mode", "staple", "crl_refresh")


def merge_status(running: StatusConfig, new: StatusConfig) -> tuple[StatusConfig, list[str]]:
    """``new`` with the settings of :data:`NEEDS_RESTART` kept as running, and a note for each."""
    notes = []
    kept = {}
    for name in NEEDS_RESTART:
        old_value, new_value = getattr(running, name), getattr(new, name)
        if old_value != new_value:
            kept[name] = old_value
            notes.append(f"status.{name} changed to {new_value!r}: needs a restart; keeping {old_value!r}")
    if kept and "mode" in kept and running.mode != new.mode:
        # The responders of another mode may not fit this one (CRL URLs, feeds): keep them all.
        kept["responders"] = running.responders
        kept["crl"] = running.crl
        notes.append("status.url, status.feed, status.crl_url, status.crl and [[status.responder]] kept with status.mode")
    return attrs.evolve(new, **kept), notes


@attrs.define(eq=False)
class StatusSettings:
    """Hands the ``[status]`` in force to the parts that read it, after each reload.

    ``parts`` are callables taking the new :class:`StatusConfig`; ``current()`` returns the
    configuration in force (the trust store's). Nothing is done when it did not change.
    """

    current: Callable[[], StatusConfig]
    parts: list[Callable[[StatusConfig], Any]] = attrs.field(factory=list)
    applied: StatusConfig | None = None

    def __attrs_post_init__(self) -> None:
        self.applied = self.current()

    def reloaded(self, generation: int) -> None:
        config = self.current()
        if config == self.applied:
            return
        self.applied = config
        for part in self.parts:
            part(config)
