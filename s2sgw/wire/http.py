"""HTTP towards the CA: a treq client over its own connection pool, and bounded bodies (read an
answer up to a limit, never more, whoever sent it)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

MAX_RESPONSE_BYTES = 64 * 1024



class ResponseTooLarge(Exception):
    """The status server sent more than we are willing to read."""



class _LimitedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; drops the connection past that."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self._done = False
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done = True
            self._chunks.clear()
            self.transport.stopProducing()
            self.finished.errback(ResponseTooLarge(f"answer larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _cancel(self, _: Deferred) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.stopProducing()



def read_limited(response, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """The body of a treq/Agent response, failing with ResponseTooLarge past ``limit`` bytes."""
    protocol = _LimitedBody(limit)
    response.deliverBody(protocol)
    return protocol.finished


def http_client(
    reactor: Any,
    *,
    persistent: bool = True,
    max_per_host: int | None = None,
    connect_timeout: float | None = None,
) -> tuple[Any, Any]:
    """A treq ``HTTPClient`` over an ``Agent`` with a pool of its own: (client, pool).

    ``persistent`` keeps connections open for reuse, at most ``max_per_host`` per server (Twisted's
    default when None); close them with ``pool.closeCachedConnections()``. ``connect_timeout`` is
    the Agent's (None: its default).
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=persistent)
    if max_per_host is not None:
        pool.maxPersistentPerHost = max_per_host
    return HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=pool)), pool
