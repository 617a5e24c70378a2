"""Listening sockets made once in the parent and adopted by the workers.

Every worker gets its own socket per route, all bound to the same address with SO_REUSEPORT, so
the kernel spreads new connections over the workers (by a hash of the connection's addresses)
instead of waking every worker for each one. The parent binds them before twistd drops
privileges and keeps them open: a worker that dies leaves its socket's queue to its successor,
which adopts the same socket, and port 0 is resolved once so that every worker listens on the
same port. Workers adopt their sockets as the relay's eager ports (:mod:`s2sgw.transport`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from s2sgw.transport import EagerPort

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


@attrs.frozen
class TCPListen:
    """Where a ``tcp:`` listen description binds."""

    port: int
    interface: str
    backlog: int

    @classmethod
    def parse(cls, description: str) -> TCPListen:
        # The parser s2sgw.config checks listen addresses with.
        from twisted.internet.endpoints import _parseServer

        kind, args, options = _parseServer(description, None)
        if kind != "TCP":
            raise ValueError(f"{description!r} is not a tcp: endpoint")
        return cls(int(args[0]), str(options.get("interface", "")), int(options.get("backlog", 50)))

    @property
    def family(self) -> str:
        return "inet6" if isIPv6Address(self.interface) else "inet"


def check_free(listen: TCPListen) -> None:
    """Raise "address in use" if anything listens there already.

    SO_REUSEPORT would otherwise let a second gateway of the same user join the first one's
    sockets and silently take half of its connections. A plain bind (SO_REUSEADDR only, so
    that connections in TIME_WAIT do not count) fails if any socket listens on the address.
    """
    if listen.port == 0:
        return
    with socket.socket(FAMILIES[listen.family], socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((listen.interface, listen.port))


def reuseport_sockets(listen: TCPListen, count: int) -> list[socket.socket]:
    """``count`` non-blocking listening sockets on one address (port 0: the first one's port)."""
    check_free(listen)
    made: list[socket.socket] = []
    port = listen.port
    try:
        for _ in range(count):
            sock = socket.socket(FAMILIES[listen.family], socket.SOCK_STREAM)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((listen.interface, port))
            sock.listen(listen.backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


@implementer(IStreamServerEndpoint)
@attrs.frozen
class AdoptedEndpoint:
    """A listening socket inherited as file descriptor ``fd``, served by an eager port.

    The port works on a duplicate; the inherited descriptor is closed once adopted, so stopping
    the port closes this worker's last reference.
    """

    reactor: Any
    fd: int
    family: str
    on_no_descriptors: Callable[[Any], None] | None = None  # as for the route's own endpoint

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            port = EagerPort.adopted(self.reactor, self.fd, FAMILIES[self.family], factory, self.on_no_descriptors)
            port.startListening()
        except Exception:
            return fail()
        finally:
            try:
                socket.close(self.fd)
            except OSError:
                pass
        return succeed(port)
