"""Gateway configuration: a TOML file loaded into frozen attrs classes.

The classes below are the contract the rest of the gateway reads. ``load_config`` (file ->
``GatewayConfig``) raises :class:`ConfigError` naming the file, the key and what is wrong, so a
typo is reported on the terminal by ``twistd`` before it daemonizes, not at the first connection.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from s2sgw.errors import S2sgwError
from s2sgw.names import service_name_problem

StatusMode = Literal["ocsp", "crl", "off"]
FailMode = Literal["closed", "open"]
IdentityMode = Literal["none", "proxy-v2", "http-headers", "jwt"]
OutboundIdentityMode = Literal["none", "jwt"]


DEFAULT_RENEW_AT = 2 / 3  # renew certificates after two thirds of their lifetime, like step-ca


class ConfigError(S2sgwError):
    """A configuration file is unreadable or invalid; the message names file and key."""


@attrs.frozen
class ResponderConfig:
    """Where the status of the certificates that chain to one trust root is asked.

    Every URL tuple lists servers in order of preference (:class:`s2sgw.wire.failover.Failover`).
    """

    fingerprint: bytes | None = None  # SHA-256 of the root (DER); None: every root not listed elsewhere
    urls: tuple[str, ...] = ()  # OCSP responders, e.g. http://127.0.0.1:8080/ocsp
    # Revocation feed: True = the CA's /revocations at the origin of each of ``urls`` (mode "ocsp"),
    # False = off, or the feed's URLs.
    feed: bool | tuple[str, ...] = True
    crl_urls: tuple[str, ...] = ()  # mode "crl": fetch this root's issuing CA's CRL here (GET)


@attrs.frozen
class StatusConfig:
    """How a gateway asks whether a peer's certificate is still good."""

    mode: StatusMode = "ocsp"
    fail: FailMode = "closed"  # when the CA cannot be asked
    crl: Path | None = None  # local CRL file for mode = "crl"
    timeout: float = 2.0  # seconds for one status query to one server
    max_cache_age: float = 300.0  # cap on how long a good answer is trusted, even if nextUpdate is later
    cache_size: int = 10000
    crl_refresh: float = 300.0  # seconds between CRL fetches when a crl_url is set
    # OCSP stapling on gateway-to-gateway connections (mode "ocsp"): inbound listeners staple their
    # own fresh OCSP answer; outbound connections ask for one and, if it verifies, skip their query.
    staple: bool = True
    # The default responder (from the top-level url/feed/crl_url) first, then each [[status.responder]].
    responders: tuple[ResponderConfig, ...] = (ResponderConfig(),)

    @property
    def default(self) -> ResponderConfig:
        """The responder for every root that no ``[[status.responder]]`` names."""
        return self.responders[0]

    @property
    def url(self) -> str | None:
        """The default responder's preferred OCSP URL (None without one)."""
        return self.default.urls[0] if self.default.urls else None


@attrs.frozen
class TimeoutsConfig:
    """Seconds; the same for every route in the process."""

    handshake: float = 5.0  # TCP accept -> TLS handshake and authorization done
    connect: float = 5.0  # dialing a backend or a remote gateway
    idle: float = 300.0  # no byte either way
    drain: float = 10.0  # graceful stop: how long live connections may finish


@attrs.frozen
class InboundRoute:
    """Peers -> mTLS -> this service's backend."""

    name: str
    service: str  # the owning [[service]] name
    listen: str  # server endpoint string
    backend: str  # client endpoint string
    allow: tuple[str, ...] = ()  # service names or spiffe:// IDs; empty refuses all
    max_connections: int = 1024  # authorized (relayed) connections
    identity: IdentityMode = "none"  # what the backend learns about the caller (s2sgw/identity/policy.py)
    jwt_forward: bool = False  # identity = "jwt": pass the verified token on instead of removing it
    # Connections accepted but not yet through TLS and authorization, counted apart from the
    # authorized ones: in total, and from one source address.
    max_pending: int = 1024
    max_pending_per_source: int = 256


@attrs.frozen
class OutboundRoute:
    """This service -> mTLS -> a peer's gateway."""

    name: str
    service: str
    listen: str  # plaintext server endpoint, normally on loopback
    remote: str  # client endpoint string of the peer's inbound listener
    peer: str  # the identity the remote must prove: a service name or a spiffe:// ID
    max_connections: int = 1024
    identity: OutboundIdentityMode = "none"  # "jwt": sign each HTTP request for the peer
    allow_remote: bool = False  # explicitly allow a non-loopback listen address


@attrs.frozen
class ServiceConfig:
    name: str
    cert: Path  # leaf first, then the chain
    key: Path
    inbound: tuple[InboundRoute, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()
    renew: bool = False  # renew cert + key over EST ([enrollment]); default on when it is set


@attrs.frozen
class EnrollmentConfig:
    """Where the gateway renews its certificates (EST, RFC 7030) and the root it pins there."""

    urls: tuple[str, ...]  # https:// EST servers, tried in order on connection errors and timeouts
    fingerprint: str  # SHA-256 of the pinned root, lower-case hex (s2sgw.wire.est.normalize_fingerprint)
    renew_at: float = DEFAULT_RENEW_AT  # fraction of the lifetime after which a certificate is renewed


@attrs.frozen
class AdminConfig:
    """The admin HTTP endpoint (/healthz, /readyz, /status, /metrics); off unless configured."""

    listen: str  # loopback TCP or unix: unless allow_remote
    allow_remote: bool = False  # explicitly allow a non-loopback listen address
    probe_interval: float = 5.0  # seconds between readiness probes of the CA status server


@attrs.frozen
class GatewayConfig:
    path: Path
    trust: Path  # the only roots trusted
    services: tuple[ServiceConfig, ...]
    status: StatusConfig = StatusConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    reload_interval: float | None = None
    admin: AdminConfig | None = None
    expiry_warning: float = 0.2  # warn when this fraction of a certificate's lifetime is left
    enrollment: EnrollmentConfig | None = None
    workers: int = 1  # processes accepting on the same listening sockets (s2sgw.workers); "auto" = CPUs


# --------------------------------------------------------------------------------------------
# Loading

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SPIFFE = re.compile(r"^spiffe://[a-z0-9.-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")

_T = TypeVar("_T")


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway configuration file.

    Pure and synchronous: reads the TOML file, checks every key, resolves relative paths against
    the file's directory and checks that the certificate, key and trust files exist. Raises
    :class:`ConfigError` whose message reads ``FILE: KEY: what is wrong``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path.absolute()}: invalid TOML: {error}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> GatewayConfig:
    """Validate already-parsed TOML ``data`` as if it had been read from ``path``."""
    return _Parser(path.absolute()).gateway(data)


@attrs.define(eq=False)
class _Parser:
    """One pass over the TOML tree; every error carries the dotted key it is about."""

    path: Path
    _listens: list[tuple[str, tuple[Any, ...], str]] = attrs.field(factory=list)

    @property
    def base(self) -> Path:
        return self.path.parent

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    # -- generic checks ---------------------------------------------------------------------

    def table(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        return value

    def required(self, table: dict[str, Any], name: str, key: str, check: Callable[[Any, str], _T]) -> _T:
        where = f"{key}.{name}" if key else name
        if name not in table:
            raise self.fail(where, "missing required key")
        return check(table[name], where)

    def optional(
        self, table: dict[str, Any], name: str, key: str, check: Callable[[Any, str], _T], default: _T
    ) -> _T:
        if name not in table:
            return default
        return check(table[name], f"{key}.{name}" if key else name)

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, "expected a string")
        if not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def name(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if not _NAME.match(value):
            raise self.fail(key, "expected a name of letters, digits, '.', '_' or '-'")
        return value

    def service_name(self, value: Any, key: str) -> str:
        """The rule ``s2sgw ca issue`` applies: the name becomes a DNS label and a SPIFFE path."""
        value = self.string(value, key)
        problem = service_name_problem(value)
        if problem is not None:
            raise self.fail(key, f"invalid service name {value!r}: {problem}")
        return value

    def seconds(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "expected a number of seconds")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(key, "must be a positive number of seconds")
        return float(value)

    def count(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "expected an integer")
        if value < 1:
            raise self.fail(key, "must be at least 1")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "expected a number between 0 and 1")
        if not 0 < value < 1:
            raise self.fail(key, "must be between 0 and 1 (a fraction of the lifetime)")
        return float(value)

    def choice(self, options: tuple[str, ...]) -> Callable[[Any, str], str]:
        def check(value: Any, key: str) -> str:
            if value not in options:
                raise self.fail(key, f"expected one of {', '.join(repr(o) for o in options)}")
            return value

        return check

    def existing_file(self, value: Any, key: str) -> Path:
        path = self.file(value, key)
        if not path.is_file():
            raise self.fail(key, f"no such file: {path}")
        return path

    def file(self, value: Any, key: str) -> Path:
        return self.base / Path(self.string(value, key)).expanduser()

    def peer_name(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if value.startswith("spiffe://"):
            if not _SPIFFE.match(value):
                raise self.fail(key, f"malformed SPIFFE ID {value!r} (expected spiffe://DOMAIN/PATH)")
        elif not _NAME.match(value):
            raise self.fail(key, f"expected a service name or a spiffe:// ID, got {value!r}")
        return value

    def allow_list(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "expected a list of strings")
        return tuple(self.peer_name(item, f"{key}[{i}]") for i, item in enumerate(value))

    def url(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise self.fail(key, f"expected an http:// or https:// URL, got {value!r}")
        return value

    def url_list(self, value: Any, key: str) -> tuple[str, ...]:
        """One URL or a non-empty list of them (servers tried in order), as a tuple."""
        if isinstance(value, str):
            return (self.url(value, key),)
        if not isinstance(value, list):
            raise self.fail(key, "expected a URL or a list of URLs")
        if not value:
            raise self.fail(key, "must list at least one URL")
        return tuple(self.url(item, f"{key}[{i}]") for i, item in enumerate(value))

    def feed(self, value: Any, key: str) -> bool | tuple[str, ...]:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, list)):
            return self.url_list(value, key)
        raise self.fail(key, "expected true, false, an http:// URL or a list of URLs")

    def tables(self, value: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            header = re.sub(r"\[\d+\]", "", key)
            if isinstance(value, dict):
                raise self.fail(
                    key, f"written as a single table [{header}]; write [[{header}]] (one per entry, double brackets)"
                )
            raise self.fail(key, f"expected an array of tables ([[{header}]])")
        return value

    # -- endpoints ----------------------------------------------------------------------------

    def server_endpoint(self, value: Any, key: str) -> str:
        """Check a listening endpoint string parses (no socket is bound) and is not used twice."""
        from twisted.internet.endpoints import _parseServer

        value = self.string(value, key)
        kind = value.split(":", 1)[0].lower()
        if kind == "ssl":
            raise self.fail(key, "ssl: endpoints are not supported; use tcp: or unix:, the gateway adds TLS")
        fields = value.split(":")
        if kind == "tcp" and len(fields) == 3 and not fields[1].isdigit() and fields[2].isdigit():
            raise self.fail(
                key, f"bad endpoint {value!r}: a listening endpoint names the port first "
                f"(write tcp:{fields[2]}:interface={fields[1]})"
            )
        try:
            parsed = _parseServer(value, None)
        except Exception as error:  # the parsers raise ValueError, TypeError, IndexError, KeyError
            raise self.fail(key, f"bad endpoint {value!r}: {_endpoint_error(error)}") from None
        kind = parsed[0]
        if kind == "TCP":
            (port, _factory), options = parsed[1], parsed[2]
            if not 0 <= port <= 65535:
                raise self.fail(key, f"bad endpoint {value!r}: port out of range")
            identity: tuple[Any, ...] = ("tcp", port, options.get("interface", ""))
        elif kind == "UNIX":
            identity = ("unix", str(parsed[1][0]))
        else:
            identity = ("other", value)
        for other_identity, other_key, other_value in ((i, k, v) for k, i, v in self._listens):
            if _same_listen(identity, other_identity):
                raise self.fail(key, f"endpoint {value!r} is also used by {other_key} ({other_value!r})")
        self._listens.append((key, identity, value))
        return value

    def client_endpoint(self, value: Any, key: str) -> str:
        """Check a dialing endpoint string parses (nothing is resolved or connected)."""
        from twisted.internet.endpoints import clientFromString
        from twisted.internet.testing import MemoryReactor

        value = self.string(value, key)
        if value.split(":", 1)[0].lower() == "ssl":
            raise self.fail(key, "ssl: endpoints are not supported; use tcp: or unix:, the gateway adds TLS")
        fields = value.split(":")
        if len(fields) == 2 and fields[0].lower() == "tcp" and fields[1].strip().isdigit():
            raise self.fail(
                key, f"bad endpoint {value!r}: the host is missing (write tcp:HOST:{fields[1].strip()}, "
                f"e.g. tcp:127.0.0.1:{fields[1].strip()})"
            )
        try:
            clientFromString(MemoryReactor(), value)
        except Exception as error:
            raise self.fail(key, f"bad endpoint {value!r}: {_endpoint_error(error)}") from None
        return value

    # -- sections -----------------------------------------------------------------------------

    def gateway(self, data: dict[str, Any]) -> GatewayConfig:
        self.table(
            data,
            "",
            {
                "trust", "reload_interval", "expiry_warning", "status", "timeouts", "admin", "enrollment", "service",
                "workers",
            },
        )  # fmt: skip
        trust = self.required(data, "trust", "", self.existing_file)
        reload_interval = self.optional(data, "reload_interval", "", self.seconds, None)
        status = self.status(data.get("status", {}))
        timeouts = self.timeouts(data.get("timeouts", {}))
        expiry_warning = self.optional(data, "expiry_warning", "", self.fraction, 0.2)
        admin = self.admin(data["admin"]) if "admin" in data else None
        enrollment = self.enrollment(data["enrollment"]) if "enrollment" in data else None
        services_data = self.required(data, "service", "", self.tables)
        if not services_data:
            raise self.fail("service", "at least one [[service]] is required")
        services = tuple(
            self.service(item, f"service[{i}]", enrolled=enrollment is not None)
            for i, item in enumerate(services_data)
        )
        self.check_unique(
            ((f"service[{i}].name", s.name) for i, s in enumerate(services)), "service name"
        )
        self.check_unique(
            (
                (f"service[{i}].{kind}[{j}].name", route.name)
                for i, s in enumerate(services)
                for kind, routes in (("inbound", s.inbound), ("outbound", s.outbound))
                for j, route in enumerate(routes)
            ),
            "route name",
        )
        workers = self.optional(data, "workers", "", self.workers, 1)
        if workers > 1:
            self.check_workers(services)
        return GatewayConfig(
            path=self.path,
            trust=trust,
            services=services,
            status=status,
            timeouts=timeouts,
            reload_interval=reload_interval,
            admin=admin,
            expiry_warning=expiry_warning,
            enrollment=enrollment,
            workers=workers,
        )

    def workers(self, value: Any, key: str) -> int:
        """A count, or "auto": as many as the machine has CPUs."""
        if value == "auto":
            import os

            return os.cpu_count() or 1
        return self.count(value, key)

    def check_workers(self, services: tuple[ServiceConfig, ...]) -> None:
        """Workers share tcp: listening sockets (one SO_REUSEPORT socket per worker)."""
        from twisted.internet.endpoints import _parseServer

        for i, service in enumerate(services):
            for kind, routes in (("inbound", service.inbound), ("outbound", service.outbound)):
                for j, route in enumerate(routes):
                    if _parseServer(route.listen, None)[0] != "TCP":
                        raise self.fail(
                            f"service[{i}].{kind}[{j}].listen",
                            f"{route.listen!r}: with more than one worker, listen addresses must be tcp:",
                        )

    def enrollment(self, value: Any) -> EnrollmentConfig:
        from s2sgw.wire.est import WireFormatError, normalize_fingerprint

        key = "enrollment"
        table = self.table(value, key, {"url", "fingerprint", "renew_at"})
        urls = self.required(table, "url", key, self.url_list)
        for i, url in enumerate(urls):
            if not url.lower().startswith("https://"):
                where = "enrollment.url" if isinstance(table["url"], str) else f"enrollment.url[{i}]"
                raise self.fail(where, f"EST needs https://, got {url!r}")
        text = self.required(table, "fingerprint", key, self.string)
        try:
            fingerprint = normalize_fingerprint(text)
        except WireFormatError as error:
            raise self.fail("enrollment.fingerprint", str(error)) from None
        return EnrollmentConfig(
            urls=urls,
            fingerprint=fingerprint,
            renew_at=self.optional(table, "renew_at", key, self.fraction, DEFAULT_RENEW_AT),
        )

    def admin(self, value: Any) -> AdminConfig:
        table = self.table(value, "admin", {"listen", "allow_remote", "probe_interval"})
        listen = self.required(table, "listen", "admin", self.server_endpoint)
        allow_remote = self.optional(table, "allow_remote", "admin", self.boolean, False)
        if not allow_remote and not _local_endpoint(listen):
            raise self.fail(
                "admin.listen",
                f"{listen!r} is not a loopback address or unix socket; the admin endpoint shows "
                "identities and metrics (set admin.allow_remote = true to listen there anyway)",
            )
        return AdminConfig(
            listen=listen,
            allow_remote=allow_remote,
            probe_interval=self.optional(table, "probe_interval", "admin", self.seconds, 5.0),
        )

    def check_unique(self, items: Iterator[tuple[str, str]], what: str) -> None:
        seen: dict[str, str] = {}
        for key, value in items:
            if value in seen:
                raise self.fail(key, f"duplicate {what} {value!r} (also at {seen[value]})")
            seen[value] = key

    def status(self, value: Any) -> StatusConfig:
        key = "status"
        table = self.table(
            value,
            key,
            {
                "mode",
                "url",
                "fail",
                "crl",
                "timeout",
                "max_cache_age",
                "cache_size",
                "crl_url",
                "crl_refresh",
                "feed",
                "staple",
                "responder",
            },
        )
        defaults = StatusConfig()
        mode = self.optional(table, "mode", key, self.choice(("ocsp", "crl", "off")), defaults.mode)
        crl = self.optional(table, "crl", key, self.file, None)
        if mode == "crl" and crl is None:
            raise self.fail("status.crl", 'required when status.mode = "crl"')
        responders = [self.responder(table, key, mode, None)]
        tables = self.optional(table, "responder", key, self.tables, [])
        for i, item in enumerate(tables):
            where = f"status.responder[{i}]"
            self.table(item, where, {"fingerprint", "url", "feed", "crl_url"})
            responders.append(self.responder(item, where, mode, self.required(item, "fingerprint", where, self.root)))
        self.check_unique(
            ((f"status.responder[{i}].fingerprint", r.fingerprint.hex()) for i, r in enumerate(responders[1:])),
            "responder fingerprint",
        )
        return StatusConfig(
            mode=mode,
            fail=self.optional(table, "fail", key, self.choice(("closed", "open")), defaults.fail),
            crl=crl,
            timeout=self.optional(table, "timeout", key, self.seconds, defaults.timeout),
            max_cache_age=self.optional(table, "max_cache_age", key, self.seconds, defaults.max_cache_age),
            cache_size=self.optional(table, "cache_size", key, self.count, defaults.cache_size),
            crl_refresh=self.optional(table, "crl_refresh", key, self.seconds, defaults.crl_refresh),
            staple=self.optional(table, "staple", key, self.boolean, defaults.staple),
            responders=tuple(responders),
        )

    def root(self, value: Any, key: str) -> bytes:
        """A root's SHA-256 fingerprint, written like ``enrollment.fingerprint``."""
        from s2sgw.wire.est import WireFormatError, normalize_fingerprint

        try:
            return bytes.fromhex(normalize_fingerprint(self.string(value, key)))
        except WireFormatError as error:
            raise self.fail(key, str(error)) from None

    def responder(self, table: dict[str, Any], key: str, mode: str, fingerprint: bytes | None) -> ResponderConfig:
        """The url/feed/crl_url of one responder: ``[status]`` itself or a ``[[status.responder]]``."""
        urls = self.optional(table, "url", key, self.url_list, ())
        if mode == "ocsp" and not urls:
            raise self.fail(f"{key}.url", 'required when status.mode = "ocsp"')
        crl_urls = self.optional(table, "crl_url", key, self.url_list, ())
        if crl_urls and mode != "crl":
            raise self.fail(f"{key}.crl_url", 'only used when status.mode = "crl"')
        if crl_urls and fingerprint is not None:
            raise self.fail(f"{key}.crl_url", "CRLs are fetched from status.crl_url only (one CRL file)")
        feed = self.optional(table, "feed", key, self.feed, True)
        if table.get("feed") is True and mode != "ocsp":
            raise self.fail(f"{key}.feed", f'true derives the feed from {key}.url (mode = "ocsp"); give its URL')
        if isinstance(feed, tuple) and mode == "off":
            raise self.fail(f"{key}.feed", 'not used when status.mode = "off"')
        return ResponderConfig(fingerprint=fingerprint, urls=urls, feed=feed, crl_urls=crl_urls)

    def timeouts(self, value: Any) -> TimeoutsConfig:
        key = "timeouts"
        table = self.table(value, key, {"handshake", "connect", "idle", "drain"})
        d = TimeoutsConfig()
        return TimeoutsConfig(
            handshake=self.optional(table, "handshake", key, self.seconds, d.handshake),
            connect=self.optional(table, "connect", key, self.seconds, d.connect),
            idle=self.optional(table, "idle", key, self.seconds, d.idle),
            drain=self.optional(table, "drain", key, self.seconds, d.drain),
        )

    def service(self, value: Any, key: str, enrolled: bool = False) -> ServiceConfig:
        table = self.table(value, key, {"name", "cert", "key", "inbound", "outbound", "renew"})
        renew = self.optional(table, "renew", key, self.boolean, enrolled)
        if renew and not enrolled:
            raise self.fail(f"{key}.renew", "renewal needs an [enrollment] table (url, fingerprint)")
        name = self.required(table, "name", key, self.service_name)
        cert = self.required(table, "cert", key, self.existing_file)
        private_key = self.required(table, "key", key, self.existing_file)
        inbound = [
            self.inbound(item, f"{key}.inbound[{i}]", name, i)
            for i, item in enumerate(self.optional(table, "inbound", key, self.tables, []))
        ]
        outbound = [
            self.outbound(item, f"{key}.outbound[{i}]", name)
            for i, item in enumerate(self.optional(table, "outbound", key, self.tables, []))
        ]
        return ServiceConfig(
            name=name, cert=cert, key=private_key, inbound=tuple(inbound), outbound=tuple(outbound), renew=renew
        )

    def inbound(self, value: Any, key: str, service: str, index: int) -> InboundRoute:
        table = self.table(
            value,
            key,
            {
                "name", "listen", "backend", "allow", "max_connections", "identity", "jwt_forward",
                "max_pending", "max_pending_per_source",
            },
        )
        identity = self.optional(table, "identity", key, self.choice(("none", "proxy-v2", "http-headers", "jwt")), "none")
        jwt_forward = self.optional(table, "jwt_forward", key, self.boolean, False)
        if "jwt_forward" in table and identity != "jwt":
            raise self.fail(f"{key}.jwt_forward", 'only used with identity = "jwt"')
        return InboundRoute(
            identity=identity,
            jwt_forward=jwt_forward,
            name=self.optional(table, "name", key, self.name, f"{service}-in-{index}"),
            service=service,
            listen=self.required(table, "listen", key, self.server_endpoint),
            backend=self.required(table, "backend", key, self.client_endpoint),
            allow=self.optional(table, "allow", key, self.allow_list, ()),
            max_connections=self.optional(table, "max_connections", key, self.count, 1024),
            max_pending=self.optional(table, "max_pending", key, self.count, 1024),
            max_pending_per_source=self.optional(table, "max_pending_per_source", key, self.count, 256),
        )

    def outbound(self, value: Any, key: str, service: str) -> OutboundRoute:
        table = self.table(
            value, key, {"name", "listen", "remote", "peer", "max_connections", "identity", "allow_remote"}
        )
        peer = self.required(table, "peer", key, self.peer_name)
        listen = self.required(table, "listen", key, self.server_endpoint)
        allow_remote = self.optional(table, "allow_remote", key, self.boolean, False)
        if not allow_remote and not _local_endpoint(listen):
            raise self.fail(
                f"{key}.listen",
                f"{listen!r} is not a loopback address or unix socket; whoever can connect to an "
                "outbound listener speaks as this service (set allow_remote = true in this route "
                "to listen there anyway)",
            )
        identity = self.optional(table, "identity", key, self.choice(("none", "jwt")), "none")
        default_name = f"{service}-to-{peer.rstrip('/').rsplit('/', 1)[-1]}"
        return OutboundRoute(
            identity=identity,
            name=self.optional(table, "name", key, self.name, default_name),
            service=service,
            listen=listen,
            remote=self.required(table, "remote", key, self.client_endpoint),
            peer=peer,
            max_connections=self.optional(table, "max_connections", key, self.count, 1024),
            allow_remote=allow_remote,
        )


def _same_listen(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two listening endpoints would collide (port 0 never does)."""
    if a[0] == b[0] == "tcp":
        if a[1] == 0 or a[1] != b[1]:
            return False
        wildcard = ("", "0.0.0.0", "::")
        return a[2] == b[2] or a[2] in wildcard or b[2] in wildcard
    return a == b


def _local_endpoint(value: str) -> bool:
    """Whether a (valid) listening endpoint is reachable from this host only: loopback or unix."""
    import ipaddress

    from twisted.internet.endpoints import _parseServer

    kind, args, options = _parseServer(value, None)
    if kind == "UNIX":
        return True
    if kind != "TCP":
        return False  # systemd: and plugins: we cannot tell
    interface = str(options.get("interface", "")).strip("[]")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # "" (every interface) or a host name


def _endpoint_error(error: Exception) -> str:
    """Turn a Twisted endpoint parser exception into words."""
    text = str(error)
    if isinstance(error, TypeError):
        if "unexpected keyword argument" in text:
            return "unknown option " + text.rsplit(" ", 1)[-1]
        if "multiple values" in text or "positional argument" in text:
            return "wrong number of fields (escape ':' in addresses as '\\:')"
    if isinstance(error, (IndexError, KeyError)):
        return "incomplete description"
    return text or type(error).__name__
