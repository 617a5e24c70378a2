"""TCP for the relay path: eager writes, ports that report descriptor shortage, endpoints (TLS: :mod:`s2sgw.tlstransport`).

Why: Twisted's default TCP transport never sends inside ``write()`` (it registers
for writability and sends on the next reactor pass). In a relay every read becomes exactly one
write, so waiting only adds latency and system calls. Nothing here patches Twisted globally: the subclasses are used only by
the ports and connectors this module creates.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import endpoints, tcp
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorTCP,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

# Listen backlog of tcp: listeners that name none (nginx's default; the kernel caps it at somaxconn).
DEFAULT_BACKLOG = 511

# ---------------------------------------------------------------------------------------------
# Eager writes


class _EagerWrites:
    """Send inside ``write()`` when nothing is queued; hand any remainder to the normal path.

    Mixed in front of ``tcp.Server`` / ``tcp.Client``. The normal path (buffer, register for
    writability, ``doWrite``) still owns partial sends, producer pausing, half-close and error
    reporting, so the fast path only ever runs when the transport's buffers are empty and no
    close is pending. A send error is not reported here (that would re-enter the protocol from
    inside its own ``write``): the data goes to the normal path, whose ``doWrite`` on the next
    reactor pass fails the same way and reports it through ``connectionLost``.
    """

    # Attributes of abstract.FileDescriptor (Twisted >= 26.4); declared for type checkers.
    connected: int
    disconnecting: int
    _writeDisconnecting: bool
    _writeDisconnected: bool
    dataBuffer: bytes
    offset: int
    _tempDataLen: int

    def write(self, data: bytes) -> None:
        if (
            self._tempDataLen == 0
            and self.offset == len(self.dataBuffer)
            and type(data) is bytes
            and data
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
        ):
            sent = self.writeSomeData(data)  # type: ignore[attr-defined]
            if type(sent) is int:
                if sent == len(data):
                    return
                if sent > 0:
                    data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))


class EagerServer(_EagerWrites, tcp.Server):
    """An accepted TCP connection that writes eagerly."""

    direct_events = True  # no per-event logging context (s2sgw.reactor)


class EagerClient(_EagerWrites, tcp.Client):
    """An outgoing TCP connection that writes eagerly."""

    direct_events = True  # no per-event logging context (s2sgw.reactor)


# Twisted's accept loop reports a connection it had to close for lack of descriptors (EMFILE:
# it frees a reserved descriptor, accepts and closes) only as these log events.
_CLOSED_FOR_EMFILE = "EMFILE recovery: Closed socket from {address}"
_NOT_ACCEPTED = "Could not accept new connection ({acceptError})"
_OUT_OF_DESCRIPTORS = ("EMFILE", "ENFILE")


class EagerPort(tcp.Port):
    """A listening TCP port whose connections write eagerly.

    ``on_no_descriptors(address)`` hears of each connection the accept loop closed, or could not
    accept, because the process or system ran out of descriptors (address None when not
    accepted); those events go on to the log as before.
    """

    transport = EagerServer
    direct_events = True  # no per-event logging context (s2sgw.reactor)
    on_no_descriptors: Callable[[Any], None] | None = None

    def __init__(self, *args: Any, on_no_descriptors: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if on_no_descriptors is not None:
            self.on_no_descriptors = on_no_descriptors
            self._logger = Logger(namespace=tcp.Port._logger.namespace, observer=self._observe_accept)

    @classmethod
    def adopted(
        cls,
        reactor: Any,
        fd: int,
        family: int,
        factory: IProtocolFactory,
        on_no_descriptors: Callable[[Any], None] | None = None,
    ) -> EagerPort:
        """A port on an inherited listening socket (a worker's, see :mod:`s2sgw.workers`), like
        ``reactor.adoptStreamPort``; works on a duplicate of ``fd``. Call ``startListening()``."""
        sock = socket.fromfd(fd, family, cls.socketType)
        port = cls(None, factory, None, sock.getsockname()[0], reactor, on_no_descriptors=on_no_descriptors)
        port._preexistingSocket = sock  # as tcp.Port._fromListeningDescriptor does
        return port

    def _observe_accept(self, event: dict[str, Any]) -> None:
        hook, text = self.on_no_descriptors, event.get("log_format")
        if hook is not None:
            if text == _CLOSED_FOR_EMFILE:
                hook(self._address_of(event.get("address")))
            elif text == _NOT_ACCEPTED and event.get("acceptError") in _OUT_OF_DESCRIPTORS:
                hook(None)
        tcp.Port._logger.observer(event)

    def _address_of(self, address: Any) -> Any:
        if isinstance(address, tuple) and len(address) >= 2:
            return self._buildAddr(address)
        return None


class EagerConnector(tcp.Connector):
    """A TCP connector whose connection writes eagerly."""

    def _makeTransport(self) -> EagerClient:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


@implementer(IReactorTCP)
@attrs.define(eq=False)
class _EagerTCPReactor:
    """The real reactor's TCP, with the eager transports for listens and connects.

    Handed only to the endpoints this module builds from ``tcp:`` strings, so Twisted's own
    endpoint parsing and options (interface, backlog, timeout, bindAddress) stay in charge.
    Those endpoints (``TCP4ServerEndpoint``, ``TCP6ServerEndpoint``, ``TCP4ClientEndpoint``)
    ask their reactor for ``IReactorTCP`` only, so that is all this provides.
    """

    _reactor: PosixReactorBase
    on_no_descriptors: Callable[[Any], None] | None = None

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = DEFAULT_BACKLOG, interface: str = ""
    ) -> EagerPort:
        listening = EagerPort(port, factory, backlog, interface, self._reactor, on_no_descriptors=self.on_no_descriptors)
        listening.startListening()
        return listening

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> EagerConnector:
        connector = EagerConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector


_TCP_SCHEMES = ("tcp", "tcp6")


def _scheme(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def _endpoint_reactor(reactor: Any, description: str, on_no_descriptors: Callable[[Any], None] | None = None) -> Any:
    if _scheme(description) in _TCP_SCHEMES and isinstance(reactor, PosixReactorBase):
        return _EagerTCPReactor(reactor, on_no_descriptors)
    return reactor


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=DEFAULT_BACKLOG`` added to a ``tcp:``/``tcp6:`` listen that
    names none (Twisted's default of 50 stalls a burst of new connections a second per 50)."""
    if _scheme(description) not in _TCP_SCHEMES:
        return description
    options = _split_unescaped(description)[1:]
    if any(option.strip().lower().startswith("backlog=") for option in options):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def server_endpoint(
    reactor: Any, description: str, on_no_descriptors: Callable[[Any], None] | None = None
) -> IStreamServerEndpoint:
    """A server endpoint for ``description``; ``tcp:``/``tcp6:`` ones write eagerly, listen with a
    backlog of :data:`DEFAULT_BACKLOG` unless told otherwise, and report connections closed at
    accept for lack of descriptors to ``on_no_descriptors``."""
    description = with_backlog(description)
    return endpoints.serverFromString(_endpoint_reactor(reactor, description, on_no_descriptors), description)


def client_endpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """A client endpoint for ``description``; ``tcp:``/``tcp6:`` ones write eagerly."""
    return endpoints.clientFromString(_endpoint_reactor(reactor, description), description)


def _split_unescaped(text: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def endpoint_host(description: str) -> str | None:
    """The host named by a ``tcp:``/``tcp6:`` client endpoint string (for SNI), else None."""
    parts = _split_unescaped(description)
    if parts[0].strip().lower() not in _TCP_SCHEMES:
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "host":
            return value
    return positional[0] if positional else None


def set_tcp_nodelay(transport: Any) -> None:
    """Disable Nagle on a TCP transport (no-op for other transports): lowers relay latency."""
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def dial_factory(build: Any) -> Factory:
    """A factory for one outgoing connection of the relay, without Twisted's "Starting factory"
    and "Stopping factory" log events: two per relayed connection, formatted and written for
    nothing (the audit event says what happened)."""
    factory = Factory.forProtocol(build)
    factory.noisy = False
    return factory
