"""``twistd s2sgw``: the gateway plugin's options and service wiring."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run the mTLS gateways of every service configured in FILE, in one reactor."
    optParameters = [
        ["config", "c", None, "Gateway configuration file (TOML).", str],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")


def makeService(options: Options, reactor=None) -> IService:
    return MultiService()
