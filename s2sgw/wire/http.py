"""HTTP towards the CA: a treq client over its own connection pool, and bounded bodies (read an
answer up to a limit, never more, whoever sent it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

MAX_RESPONSE_BYTES = 64 * 1024
# Kept-alive connections to the CA are closed after this many idle seconds: before the CA's own
# idle timeout (``twistd s2sgw-ca --timeout``, 10 s by default) closes them under a request.
KEEPALIVE_SECONDS = 4.0

_T = TypeVar("_T")



class ResponseTooLarge(Exception):
    """The status server sent more than we are willing to read."""


class HTTPStatusError(Exception):
    """A server answered with an HTTP error code: a 5xx says another server may do better
    (:func:`s2sgw.wire.failover.another_server_might_answer`), a 4xx is the server's word."""

    def __init__(self, code: int, words: str | None = None) -> None:
        super().__init__(words if words is not None else f"HTTP {code}")
        self.code = code



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


def stale_connection(failure: Failure) -> bool:
    """Whether a request failed before any answer because its connection went away under it.

    That is how a kept-alive connection the server closed just as we sent on it fails; the
    request was not answered, so sending it again on a fresh connection is safe for queries.
    A cancelled request (our own timeout) is not one.
    """
    from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived

    if not failure.check(RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived):
        return False
    reasons = getattr(failure.value, "reasons", None) or []
    return not any(isinstance(reason, Failure) and reason.check(CancelledError) for reason in reasons)


def retry_on_fresh(first: Callable[[], Deferred[_T]], again: Callable[[], Deferred[_T]]) -> Deferred[_T]:
    """``first()``; if it fails on a stale connection, ``again()`` once (on a fresh connection).

    Cancelling the result cancels whichever attempt is running, and never starts another.
    """
    state: dict[str, Any] = {"cancelled": False}

    def cancel(_: Deferred[_T]) -> None:
        state["cancelled"] = True
        state["running"].cancel()

    result: Deferred[_T] = Deferred(cancel)

    def failed(failure: Failure) -> None:
        if state["cancelled"] or result.called:
            return
        if not stale_connection(failure):
            result.errback(failure)
            return
        state["running"] = maybeDeferred(again)
        state["running"].addCallbacks(_settle(result), _settle(result, failed=True))

    state["running"] = maybeDeferred(first)
    state["running"].addCallbacks(_settle(result), failed)
    return result


def _settle(result: Deferred[_T], failed: bool = False) -> Callable[[Any], None]:
    def settle(outcome: Any) -> None:
        if result.called:
            return
        if failed:
            result.errback(outcome)
        else:
            result.callback(outcome)

    return settle


def http_client(
    reactor: Any,
    *,
    persistent: bool = True,
    max_per_host: int | None = None,
    connect_timeout: float | None = None,
    idle_timeout: float | None = KEEPALIVE_SECONDS,
) -> tuple[Any, Any]:
    """A treq ``HTTPClient`` over an ``Agent`` with a pool of its own: (client, pool).

    ``persistent`` keeps connections open for reuse, at most ``max_per_host`` per server (Twisted's
    default when None); close them with ``pool.closeCachedConnections()``. ``connect_timeout`` is
    the Agent's (None: its default); ``idle_timeout`` closes kept-alive connections idle that long
    (None: Twisted's 240 s).
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=persistent)
    if max_per_host is not None:
        pool.maxPersistentPerHost = max_per_host
    if idle_timeout is not None:
        pool.cachedConnectionTimeout = idle_timeout
    return HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=pool)), pool
