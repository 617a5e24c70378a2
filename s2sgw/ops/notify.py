"""systemd readiness notification (``sd_notify``) without libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace) and waits for ``READY=1``; a reload is framed by ``RELOADING=1`` with
``MONOTONIC_USEC`` and a new ``READY=1``; ``STOPPING=1`` announces a graceful stop; ``STATUS=``
is the one line ``systemctl status`` shows. Each message is one datagram of ``KEY=value`` lines.
Sending never blocks and never raises: losing a notification must not stop the gateway.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` -> a ``sendto`` address; ``@name`` is the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    return value


def format_message(fields: Mapping[str, object]) -> bytes:
    """``KEY=value`` lines; newlines inside a value would start a new field, so they become spaces."""
    return "\n".join(
        f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items()
    ).encode("utf-8")


@attrs.define(eq=False)
class Notifier:
    """Sends notifications to one ``NOTIFY_SOCKET``."""

    address: str
    _socket: socket.socket | None = attrs.field(default=None, init=False)
    _failing: bool = attrs.field(default=False, init=False)
    _log = Logger()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """A notifier when systemd asked for notifications (``NOTIFY_SOCKET`` set), else None."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None  # unset, or a vsock:/other address we do not speak
        return cls(address)

    def send(self, **fields: object) -> bool:
        """Send one message (``send(READY=1, STATUS="...")``); False if it could not be sent."""
        data = format_message(fields)
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(data, socket_address(self.address))
        except OSError as error:
            if not self._failing:
                self._failing = True
                self._log.warn(
                    "systemd notification to {address} failed: {error}", address=self.address, error=error
                )
            return False
        if self._failing:
            self._failing = False
            self._log.info("systemd notifications to {address} work again", address=self.address)
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@attrs.define(eq=False)
class NotifyService(Service):
    """READY=1 once started (add it after the services that bind), STOPPING=1 when stopping.

    ``summary`` gives the STATUS line. Wrap the reload callable with :meth:`reloading` to frame
    each reload with RELOADING=1 / READY=1.
    """

    notifier: Notifier
    summary: Callable[[], str]
    monotonic: Callable[[], int] = monotonic_usec
    _log = Logger()

    def startService(self) -> None:
        super().startService()
        self.notifier.send(READY=1, STATUS=self.summary())

    def stopService(self) -> None:
        super().stopService()
        self.notifier.send(STOPPING=1, STATUS="stopping: draining connections")
        self.notifier.close()

    def status(self, text: str) -> None:
        """Update the STATUS line (e.g. when readiness changes)."""
        if self.running:
            self.notifier.send(STATUS=text)

    def reloading(self, reload: Callable[[], Deferred[Any]]) -> Callable[[], Deferred[Any]]:
        """``reload`` framed by RELOADING=1 (with MONOTONIC_USEC) and READY=1, success or not."""

        def framed() -> Deferred[Any]:
            self.notifier.send(RELOADING=1, MONOTONIC_USEC=self.monotonic(), STATUS="reloading trust material")
            d = reload()

            def done(result: object) -> object:
                if self.running:
                    self.notifier.send(READY=1, STATUS=self.summary())
                return result

            return d.addBoth(done)

        return framed
