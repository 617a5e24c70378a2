"""TLS for the relay path: records sent at once (no write aggregation), half-close over TLS, and
the trust store's current context asked per connection so reloads apply.

Why: Twisted's TLS transport holds small writes until the next reactor tick and has no
half-close; a relay turns every read into one write and must let a client that shut its write
side still read the whole answer. The subclasses are used only by the relay's own factories.
"""

from __future__ import annotations

from typing import Any

import attrs
from OpenSSL.SSL import Connection, Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.task import Clock
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw import tlsalert
from s2sgw.interfaces import IConnectionCreators
from s2sgw.tlsalert import RecordCounter
from s2sgw.transport import set_tcp_nodelay


class HalfCloseTLSProtocol(TLSMemoryBIOProtocol):
    """``TLSMemoryBIOProtocol`` without small-write aggregation, with TCP_NODELAY and half-close.

    Stock Twisted has no half-close over TLS: receiving ``close_notify`` closes the whole
    connection, and ``loseWriteConnection`` would reach the TCP socket under the TLS layer. A
    relay must let a client that shuts its write side still read the whole answer, so:

    - ``loseWriteConnection()`` sends ``close_notify`` and keeps the connection open for reading;
    - a received ``close_notify`` is delivered as ``readConnectionLost()`` when the wrapped
      protocol provides ``IHalfCloseableProtocol`` and this side has not closed its write side
      (otherwise it closes as before);
    - ``loseConnection()`` sends ``close_notify`` and closes the TCP connection without waiting
      for the peer's reply: a relay that closes has nothing more to say or to hear.

    A TCP EOF without ``close_notify`` stays a full close (truncation is not a half-close).
    This overrides ``_flushReceiveBIO``, an internal of Twisted's TLS layer (tested against
    Twisted 26.x in tests/test_transport.py).
    """

    _write_shut = False
    _read_eof = False
    _sealed = False  # a refusal alert went out: OpenSSL's sequence numbers no longer match
    _app_records: RecordCounter | None = None  # server records sealed with the application secret

    def makeConnection(self, transport: Any) -> None:
        set_tcp_nodelay(transport)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        if self._write_shut:
            return
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseWriteConnection(self) -> None:
        """Send ``close_notify``; keep reading until the peer closes too."""
        if self._write_shut or self.disconnecting or not self.connected or self._lostTLSConnection:
            return
        if not self._handshakeDone or self._appSendBuffer:
            self.loseConnection()
            return
        self._write_shut = True
        self._shutdownTLS()
        handler = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if handler is not None:
            handler.writeConnectionLost()

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        super().loseConnection()
        if not self._appSendBuffer and self._producer is None and self.transport is not None:
            self.transport.loseConnection()

    def unregisterProducer(self) -> None:
        had_producer = self._producer is not None
        super().unregisterProducer()
        # A close deferred by a producer happens now, again without waiting for the peer.
        if had_producer and self.disconnecting and not self._appSendBuffer and self.transport is not None:
            self.transport.loseConnection()

    def _flushSendBIO(self) -> None:
        if self._sealed:
            return
        if not self._handshakeDone or getattr(self, tlsalert.SECRET, None) is None:
            super()._flushSendBIO()
            return
        try:
            data = self._tlsConnection.bio_read(2**15)
        except WantReadError:
            return
        if self._app_records is None:
            self._app_records = tlsalert.RecordCounter()
        self._app_records.feed(data)  # after the handshake: records under the application secret
        self.transport.write(data)

    def refuse_with_alert(self, alert: str) -> bool:
        """Send the fatal ``alert`` (a name in :data:`tlsalert.ALERTS`) and close the connection.

        Possible on the server side of a TLS 1.3 connection whose secret was kept (see
        :mod:`s2sgw.tlsalert`); False (and nothing sent) otherwise, and the caller closes as usual.
        """
        secret = getattr(self, tlsalert.SECRET, None)
        connection = self._tlsConnection
        if (
            secret is None
            or self._sealed
            or not self._handshakeDone
            or self._lostTLSConnection
            or self.transport is None
            or connection.get_protocol_version_name() != "TLSv1.3"
        ):
            return False
        self._flushSendBIO()  # tickets still in the send buffer were sealed first
        sequence = self._app_records.records if self._app_records is not None else 0
        try:
            record = tlsalert.sealed_alert(
                connection.get_cipher_name() or "", secret, sequence, tlsalert.ALERTS[alert]
            )
        except (KeyError, ValueError):
            return False
        tlsalert.forget_secret(self)
        self._sealed = self._write_shut = self._lostTLSConnection = True
        self.transport.write(record)
        self.transport.loseConnection()
        return True

    def _flushReceiveBIO(self) -> None:
        # Same as TLSMemoryBIOProtocol._flushReceiveBIO, except for ZeroReturnError (see class doc).
        while not self._lostTLSConnection and not self._read_eof:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                handler = IHalfCloseableProtocol(self.wrappedProtocol, None)
                if handler is None or self._write_shut or self._aborted:
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                else:
                    self._read_eof = True
                    handler.readConnectionLost()
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()


class TLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose connections send each write at once (no aggregation)."""

    protocol = HalfCloseTLSProtocol
    noisy = False  # one per dialled connection on outbound routes: see dial_factory

    def __init__(
        self,
        creator: Any,
        is_client: bool,
        wrapped_factory: IProtocolFactory,
        clock: IReactorTime | None = None,
    ) -> None:
        # The clock only drives the aggregation HalfCloseTLSProtocol does not do.
        super().__init__(creator, is_client, wrapped_factory, clock if clock is not None else Clock())


def _connection_from(creator: Any, tls_protocol: Any, is_client: bool) -> Connection:
    if is_client and IOpenSSLClientConnectionCreator.providedBy(creator):
        return creator.clientConnectionForTLS(tls_protocol)
    if not is_client and IOpenSSLServerConnectionCreator.providedBy(creator):
        return creator.serverConnectionForTLS(tls_protocol)
    return Connection(creator.getContext(), None)


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class CurrentServerCreator:
    """Asks the trust store for the service's server creator per connection, so reloads apply."""

    store: IConnectionCreators
    service: str

    def serverConnectionForTLS(self, tls_protocol: Any) -> Connection:
        return _connection_from(self.store.server_creator(self.service), tls_protocol, False)


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class CurrentClientCreator:
    """Asks the trust store for the service's client creator per connection, so reloads apply."""

    store: IConnectionCreators
    service: str
    hostname: str

    def clientConnectionForTLS(self, tls_protocol: Any) -> Connection:
        return _connection_from(self.store.client_creator(self.service, self.hostname), tls_protocol, True)
