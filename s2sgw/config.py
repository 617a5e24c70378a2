"""Gateway configuration: a TOML file loaded into frozen attrs classes.

The classes below are the contract the rest of the gateway reads. ``load_config`` (file ->
``GatewayConfig``) raises :class:`ConfigError` naming the file, the key and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from s2sgw.errors import S2sgwError

StatusMode = Literal["ocsp", "crl", "off"]
FailMode = Literal["closed", "open"]


class ConfigError(S2sgwError):
    """A configuration file is unreadable or invalid; the message names file and key."""


@attrs.frozen
class StatusConfig:
    """How a gateway asks whether a peer's certificate is still good."""

    mode: StatusMode = "ocsp"
    url: str | None = None  # OCSP responder, e.g. http://127.0.0.1:8080/ocsp
    fail: FailMode = "closed"  # when the CA cannot be asked
    crl: Path | None = None  # local CRL file for mode = "crl"
    timeout: float = 2.0  # seconds for one status query
    max_cache_age: float = 300.0  # cap on how long a good answer is trusted, even if nextUpdate is later
    cache_size: int = 10000


@attrs.frozen
class TimeoutsConfig:
    """Seconds; the same for every route in the process."""

    handshake: float = 10.0  # TCP accept -> TLS handshake and authorization done
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
    max_connections: int = 1024


@attrs.frozen
class OutboundRoute:
    """This service -> mTLS -> a peer's gateway."""

    name: str
    service: str
    listen: str  # plaintext server endpoint, normally on loopback
    remote: str  # client endpoint string of the peer's inbound listener
    peer: str  # the identity the remote must prove: a service name or a spiffe:// ID
    max_connections: int = 1024


@attrs.frozen
class ServiceConfig:
    name: str
    cert: Path  # leaf first, then the chain
    key: Path
    inbound: tuple[InboundRoute, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()


@attrs.frozen
class AdminConfig:
    listen: str


@attrs.frozen
class GatewayConfig:
    path: Path
    trust: Path  # the only roots trusted
    services: tuple[ServiceConfig, ...]
    status: StatusConfig = StatusConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    reload_interval: float | None = None
    admin: AdminConfig | None = None
