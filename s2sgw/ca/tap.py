"""``twistd s2sgw-ca``: the CA status server's options and service wiring."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage


class Options(usage.Options):
    synopsis = "--dir DIR [--listen ENDPOINT]"
    longdesc = "Serve OCSP answers, the CRL and the trust bundle of the CA in DIR."
    optParameters = [
        ["dir", "d", None, "CA directory made by `s2sgw ca init`.", str],
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "Endpoint to listen on.", str],
    ]

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")


def makeService(options: Options, reactor=None) -> IService:
    return MultiService()
