"""``twistd s2sgw``: options, checked before daemonizing, and the wiring of the gateway."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from s2sgw.config import load_config
from s2sgw.errors import S2sgwError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Run the mTLS gateways of every service configured in FILE, in one reactor. "
        "SIGHUP reloads trust bundle, certificates, keys, CRL and allow-lists."
    )
    optParameters = [
        ["config", "c", None, "Gateway configuration file (TOML).", str],
        ["log-level", None, "info", "Least severe events logged: debug, info, warn, error or critical.", str],
        ["log-format", None, "text", "text (twistd's lines) or json (one JSON object per line).", str],
    ]

    def postOptions(self) -> None:
        from s2sgw.ops.logs import FORMATS, LEVELS

        if not self["config"]:
            raise usage.UsageError("--config is required")
        if self["log-level"] not in LEVELS:
            raise usage.UsageError(f"--log-level must be one of: {', '.join(LEVELS)}")
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(f"--log-format must be one of: {', '.join(FORMATS)}")
        # Load and check everything here so errors reach the terminal before twistd daemonizes.
        from s2sgw.truststore import TrustStore

        try:
            self.config = load_config(self["config"])
            self.trust_store = TrustStore.load(self.config)
        except S2sgwError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    from twisted.application.service import MultiService

    from s2sgw.ops.logs import LogSetup
    from s2sgw.service import build_gateway

    if reactor is None:
        from s2sgw.reactor import current_or_install  # ours unless --reactor chose one

        reactor = current_or_install()
    if options.config.workers > 1:
        from s2sgw.workers.parent import build_parent

        return build_parent(
            options.config, reactor, log_level=options["log-level"], log_format=options["log-format"],
            trust_store=options.trust_store,
        )
    service, _ = build_gateway(options.config, options.trust_store, reactor)
    top = MultiService()
    # First to start (the log is set up before anything binds) and last to stop.
    LogSetup(options["log-level"], options["log-format"]).setServiceParent(top)
    service.setServiceParent(top)
    return top
