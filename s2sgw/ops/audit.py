"""The audit trail: one structured log event per connection, refusals included.

Events go to the ``s2sgw.audit`` namespace with stable keys, so they can be filtered as objects
(``twisted.logger`` observers, JSON logs) or read from text logs as logfmt (``route=...
outcome=...``: a value with a space, a quote, ``=`` or a backslash, or an empty one, is written
double-quoted with JSON escapes). Nothing secret is logged: identities, serial numbers, addresses,
TLS parameters and counters.
"""

from __future__ import annotations

import json
from typing import Literal

import attrs
from twisted.logger import Logger

Direction = Literal["inbound", "outbound"]
Outcome = Literal["closed", "refused"]

AUDIT_NAMESPACE = "s2sgw.audit"

AUDIT_FORMAT = (
    "route={route} outcome={outcome} reason={reason} peer={peer} serial={serial} "
    "direction={direction} address={address} tls={tls_version} cipher={cipher} "
    "bytes_in={bytes_in} bytes_out={bytes_out} duration={duration}"
)


@attrs.frozen
class AuditRecord:
    """What is known about one connection when it ends.

    ``bytes_in`` counts bytes read from the accepted connection (the peer gateway for inbound
    routes, the local client for outbound ones) and relayed on; ``bytes_out`` the bytes written
    back to it.
    """

    route: str
    direction: Direction
    outcome: Outcome
    reason: str
    peer: str = "-"  # the proven identity (SPIFFE ID or DNS name), "-" before it is known
    serial: str = "-"  # the peer certificate's serial number in hex
    address: str = "-"  # the accepted connection's remote address
    tls_version: str = "-"
    cipher: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0  # seconds from accept to close
    detail: str = ""  # plain words for a human (never secrets)
    alert: str = "-"  # the TLS alert a remote gateway refused an outbound connection with


AUDIT_FIELDS: tuple[str, ...] = tuple(field.name for field in attrs.fields(AuditRecord))


def logfmt_value(text: str) -> str:
    """``text`` as a logfmt value: bare when that is unambiguous, else quoted with JSON escapes."""
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class LogfmtText(str):
    """A string that writes itself as a logfmt value inside a log format, and stays itself
    everywhere else (event keys, JSON logs)."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return logfmt_value(str(self))


class AuditLog:
    """Writes :class:`AuditRecord` events: info for closes, warn for refusals."""

    def __init__(self) -> None:
        # An instance attribute: a Logger class attribute would take the class's namespace.
        self._log = Logger(namespace=AUDIT_NAMESPACE, source=self)

    def connection(self, record: AuditRecord) -> None:
        fields = {
            name: LogfmtText(value) if isinstance(value, str) else value
            for name, value in attrs.asdict(record).items()
        }
        fields["duration"] = round(record.duration, 3)
        if record.outcome == "refused":
            self._log.warn(AUDIT_FORMAT + " alert={alert} detail={detail}", audit=True, **fields)
        else:
            self._log.info(AUDIT_FORMAT, audit=True, **fields)
