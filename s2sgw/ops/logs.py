"""What the gateway's log looks like: a minimum level, text or JSON lines, no factory chatter.

twistd installs its log observer (the ``--logfile`` or stdout writer) after ``makeService`` and
before services start, and offers a plugin no hook into it. So :class:`LogSetup`, the first
service to start, wraps the observers already on the publisher: a filter for the level and for
Twisted's ``Starting factory``/``Stopping factory`` lines (one pair per dial, most of a busy log),
and, for ``json``, a writer of one JSON object per line to the same file. Audit events keep
their fields as JSON keys. What twistd writes before services start (its own banner, the trust
material loaded while options are checked) stays in its text form.

Worker processes (``workers = N``) format their own lines with the same level and format
(:func:`worker_observer`); the parent hands them to its files as they are (:data:`PREFORMATTED`),
so a worker's event is formatted once, in the worker, and the parent only copies bytes.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    PredicateResult,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)

from s2sgw.ops.audit import AUDIT_FIELDS

LEVELS = ("debug", "info", "warn", "error", "critical")
FORMATS = ("text", "json")
_CHATTER = ("Starting factory", "Stopping factory")
PREFORMATTED = "preformatted"  # event key: lines a worker already formatted, written as they are


def no_factory_chatter(event: dict[str, Any]) -> PredicateResult:
    """Drop Twisted's per-connection factory start and stop lines."""
    if str(event.get("log_format") or "").startswith(_CHATTER):
        return PredicateResult.no
    return PredicateResult.maybe


def preformatted_passes(event: dict[str, Any]) -> PredicateResult:
    """Lines a worker formatted were filtered there, by the same level."""
    return PredicateResult.yes if PREFORMATTED in event else PredicateResult.maybe


def passing_preformatted(formatter: Any) -> Any:
    """``formatter``, except that an event carrying worker lines is written as those lines."""

    def format_event(event: dict[str, Any]) -> str | None:
        lines = event.get(PREFORMATTED)
        return lines if isinstance(lines, str) else formatter(event)

    return format_event


def level_predicates(level: str) -> list[Any]:
    return [LogLevelFilterPredicate(LogLevel.levelWithName(level)), no_factory_chatter]


def worker_observer(out: Any, level: str, format: str, worker: int) -> ILogObserver:
    """What worker ``worker`` writes to its parent: finished lines in the parent's ``format``
    (JSON lines also name the worker), at ``level``."""
    if format == "json":
        writer = FileLogObserver(out, functools.partial(json_line, worker=worker))
    else:
        writer = textFileLogObserver(out)
    return FilteringLogObserver(writer, level_predicates(level))


def json_line(event: dict[str, Any], worker: int | None = None) -> str | None:
    """One event as one JSON object on one line: time, level, namespace, message (+ audit fields,
    + the worker that logged it)."""
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat() if isinstance(when, (int, float)) else None
        ),
        "level": level.name if isinstance(level, type(LogLevel.info)) else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    if worker is not None:
        record["worker"] = worker
    if event.get("audit"):
        record.update({name: event.get(name) for name in AUDIT_FIELDS})
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, default=str) + "\n"


@attrs.define(eq=False)
class LogSetup(Service):
    """Applies ``level`` and ``format`` to the observers on ``publisher`` while it runs."""

    level: str = "info"
    format: str = "text"
    publisher: LogPublisher = globalLogPublisher
    _swapped: list[tuple[ILogObserver, ILogObserver]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {self.level!r}")
        if self.format not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {self.format!r}")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._swapped:
            return
        predicates = [preformatted_passes, *level_predicates(self.level)]
        for observer in list(self.publisher._observers):  # no public listing; stable since Twisted 15
            writer = observer
            out = getattr(observer, "_outFile", None)
            if isinstance(observer, FileLogObserver) and out is not None:
                formatter = json_line if self.format == "json" else observer.formatEvent
                writer = FileLogObserver(out, passing_preformatted(formatter))
            wrapped = FilteringLogObserver(writer, predicates)
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(wrapped)
            self._swapped.append((observer, wrapped))

    def restore(self) -> None:
        """Put the original observers back. Not done on stop: the drain and the last lines of a
        stopping gateway are logged the same way as everything before."""
        swapped, self._swapped = self._swapped, []
        for observer, wrapped in swapped:
            self.publisher.removeObserver(wrapped)
            self.publisher.addObserver(observer)
