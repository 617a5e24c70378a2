"""``twistd s2sgw-ca``: the CA status server's options and service wiring."""

from __future__ import annotations

import datetime
import sys
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.python import usage

from s2sgw.ca.monitoring import add_endpoints
from s2sgw.ca.responders import responders_for
from s2sgw.ca.publisher import StatusPublisher, StoreWatcher, thread_runner
from s2sgw.ca.issuing_reload import IssuingReload, issuing_stamp
from s2sgw.ca.signer_renewal import SignerRenewal
from s2sgw.ca.server import DEFAULT_MAX_BODY, DEFAULT_TIMEOUT, StatusSite, build_root


def _duration(what: str):
    def parse(text: str) -> datetime.timedelta:
        from s2sgw.durations import parse_duration

        try:
            return datetime.timedelta(seconds=parse_duration(text))
        except ValueError as error:
            raise usage.UsageError(f"{what}: {error}") from None

    return parse


def _positive(kind: type, what: str):
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"{what} must be a number, not {text!r}") from None
        if value <= 0:
            raise usage.UsageError(f"{what} must be positive, not {text!r}")
        return value

    return parse


class Options(usage.Options):
    synopsis = (
        "--dir DIR [--listen ENDPOINT] [--validity SECONDS] [--max-body BYTES] "
        "[--est ENDPOINT [--est-name NAME ...] [--est-lifetime 24h] [--est-rate-limit N]]"
    )
    longdesc = (
        "Serve OCSP answers (POST /ocsp, GET /ocsp/BASE64), the CRL (/crl), the trust bundle "
        "(/bundle.pem), health and readiness checks (/healthz, /readyz) and Prometheus metrics "
        "(/metrics) for the CA in DIR. Revocations made with "
        "`s2sgw ca revoke` show within a second, without a restart. With --est, also serve EST "
        "(RFC 7030) enrollment and renewal over HTTPS."
    )
    optParameters = [
        ["dir", "d", None, "CA directory made by `s2sgw ca init`.", str],
        ["passphrase-file", None, None, "File holding the passphrase of the CA's keys (default: "
         "$CREDENTIALS_DIRECTORY/s2sgw-ca-passphrase when that exists).", str],
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "Endpoint to listen on.", str],
        ["validity", None, 300.0, "Seconds from thisUpdate to nextUpdate of OCSP answers.",
         _positive(float, "--validity")],
        ["crl-hours", None, 24.0, "Lifetime of published CRLs, in hours (regenerated at half).",
         _positive(float, "--crl-hours")],
        ["max-body", None, DEFAULT_MAX_BODY, "Largest request body accepted, in bytes.",
         _positive(int, "--max-body")],
        ["timeout", None, DEFAULT_TIMEOUT, "Idle timeout of client connections, in seconds.",
         _positive(float, "--timeout")],
        ["poll-interval", None, 0.25, "Seconds between checks of the CA store for changes.",
         _positive(float, "--poll-interval")],
        ["ocsp-lifetime", None, "7d", "Lifetime of the delegated OCSP signers this server re-issues before "
         "they expire (30s at least).", _duration("--ocsp-lifetime")],
        ["est", None, None, "Endpoint of the EST (HTTPS) listener, e.g. tcp:8443:interface=127.0.0.1.", str],
        ["est-lifetime", None, "24h", "Lifetime of certificates issued over EST (60s, 15m, 24h, 7d).",
         _duration("--est-lifetime")],
        ["est-server-lifetime", None, "24h", "Lifetime of the EST listener's own certificate.",
         _duration("--est-server-lifetime")],
        ["est-rate-limit", None, 10, "Certificates per identity per minute over EST (0: no limit).",
         int],
    ]

    ca: Any = None

    def __init__(self) -> None:
        super().__init__()
        self["est-name"] = []

    def opt_est_name(self, name: str) -> None:
        """Name in the EST listener's certificate (repeatable; an IP address or a DNS name).
        Default: localhost and 127.0.0.1."""
        from s2sgw.ca.authority import CAError
        from s2sgw.ca.est_tls import san_for

        try:
            san_for(name)
        except CAError as error:
            raise usage.UsageError(f"--est-name: {error}") from None
        self["est-name"].append(name)

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        if self["validity"] < 10:
            raise usage.UsageError("--validity must be at least 10 seconds")
        for flag, least in (("est-lifetime", 10), ("est-server-lifetime", 2), ("ocsp-lifetime", 30)):
            if isinstance(self[flag], str):  # the default, not parsed by usage
                self[flag] = _duration(f"--{flag}")(self[flag])
            if self[flag] < datetime.timedelta(seconds=least):
                raise usage.UsageError(f"--{flag} must be at least {least} seconds")
        if self["est-rate-limit"] < 0:
            raise usage.UsageError("--est-rate-limit must be 0 (no limit) or more")
        if self["est"]:
            from twisted.internet import endpoints

            try:
                endpoints.serverFromString(None, self["est"])  # parses only; binds in makeService
            except (ValueError, KeyError, TypeError) as error:
                raise usage.UsageError(f"--est {self['est']!r} is not an endpoint: {error}") from None
        from s2sgw.ca.authority import CAError, CertificateAuthority
        from s2sgw.ca.passphrase import read_passphrase

        try:
            passphrase = read_passphrase(self["passphrase-file"])
            # Decrypting the keys is slow CPU work: done here, before the reactor runs.
            self.ca = CertificateAuthority.open(self["dir"], passphrase)
        except CAError as error:
            # One line, no usage text: this is about the directory or its keys, not the flags.
            sys.stderr.write(f"s2sgw-ca: cannot start: --dir {self['dir']} is not a usable CA directory: {error}\n")
            raise SystemExit(1) from None


def makeService(options: Options, reactor: Any = None, registry: CollectorRegistry = REGISTRY) -> IService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    ca = options.ca
    responder = responders_for(ca, datetime.timedelta(seconds=options["validity"]))
    publisher = StatusPublisher(
        ca=ca,
        responder=responder,
        clock=reactor,
        in_thread=thread_runner(reactor),
        crl_hours=options["crl-hours"],
    )
    publisher.signer_renewal = SignerRenewal(publisher, options["ocsp-lifetime"])
    publisher.issuing_reload = IssuingReload(publisher, issuing_stamp(ca.directory))
    top = MultiService()
    # The watcher puts the publisher's gauges in ``registry`` while it runs; /metrics serves it.
    StoreWatcher(publisher, reactor, poll_interval=options["poll-interval"], registry=registry).setServiceParent(top)
    root = build_root(publisher)
    add_endpoints(root, publisher, registry)  # /readyz and /metrics
    site = StatusSite(root, max_body=options["max-body"], timeout=options["timeout"], reactor=reactor)
    strports.service(options["listen"], site, reactor=reactor).setServiceParent(top)
    if options["est"]:
        from s2sgw.ca.est_tls import DEFAULT_NAMES, est_service

        est_service(
            ca,
            endpoint=options["est"],
            names=options["est-name"] or DEFAULT_NAMES,
            lifetime=options["est-lifetime"],
            server_lifetime=options["est-server-lifetime"],
            rate_limit=options["est-rate-limit"],
            max_body=options["max-body"],
            timeout=options["timeout"],
            in_thread=publisher.in_thread,
            reactor=reactor,
        ).setServiceParent(top)
    return top
