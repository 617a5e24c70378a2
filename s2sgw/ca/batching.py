"""Group commit: writes from several threads at once share one transaction, hence one fsync.

Every certificate is on disk before anyone sees it (``synchronous=FULL``), and an fsync costs
milliseconds on real disks: one transaction per certificate would cap issuance at a few hundred
per second whatever the CPU. Here the first writer becomes the leader and commits everything
queued by the time it starts; writers arriving meanwhile wait and are committed by the next
leader, one of them, together. Nobody returns before the transaction holding its write commits,
and each write keeps its own outcome (the batch runs each in a savepoint).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs


@attrs.define(eq=False)
class Write:
    """One queued write: its argument, and later its outcome (None, or the exception to raise)."""

    item: Any
    outcome: BaseException | None = None
    promoted: bool = False  # woken to lead the next batch rather than with an outcome
    done: threading.Event = attrs.field(factory=threading.Event)


Batch = Callable[[Sequence[Any]], list[BaseException | None]]


@attrs.define(eq=False)
class GroupCommit:
    """Runs ``batch(items)`` for whatever writers are waiting; one batch at a time."""

    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _queue: list[Write] = attrs.field(factory=list)
    _leading: bool = False

    def submit(self, item: Any, batch: Batch) -> None:
        """Queue ``item``, return once the batch holding it committed; raise its outcome if any."""
        write = Write(item)
        with self._lock:
            self._queue.append(write)
            lead = not self._leading
            self._leading = True
        if not lead:
            write.done.wait()
            if not write.promoted:
                return self._result(write)
        with self._lock:
            writes, self._queue = self._queue, []
        try:
            outcomes = batch([w.item for w in writes])
            if len(outcomes) != len(writes):
                raise RuntimeError(f"a batch of {len(writes)} writes gave {len(outcomes)} outcomes")
        except BaseException as error:
            outcomes = [error] * len(writes)
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
            else:
                successor.promoted = True
        for other, outcome in zip(writes, outcomes):
            other.outcome = outcome
            if other is not write:
                other.done.set()
        if successor is not None:
            successor.done.set()
        return self._result(write)

    @staticmethod
    def _result(write: Write) -> None:
        if write.outcome is not None:
            raise write.outcome
