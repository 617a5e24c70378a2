"""The gateway's log: a minimum level, JSON lines on request, no factory chatter, logfmt audit lines."""

from __future__ import annotations

import io
import json
import re

import pytest
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogPublisher,
    formatEventAsClassicLogText,
)

from s2sgw.ops.audit import AUDIT_FIELDS, AuditLog, AuditRecord
from s2sgw.ops.logs import LogSetup, worker_observer
from s2sgw.workers.supervisor import Worker, _WorkerOutput

LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]*)')


def logfmt(line: str) -> dict[str, str]:
    """Read key=value pairs the logfmt way: bare values end at a space, quoted ones use escapes."""
    return {key: json.loads(value) if value.startswith('"') else value for key, value in LOGFMT_PAIR.findall(line)}


def setup(level: str = "info", form: str = "text") -> tuple[LogPublisher, io.StringIO, LogSetup]:
    out = io.StringIO()
    publisher = LogPublisher(FileLogObserver(out, lambda event: formatEventAsClassicLogText(event)))
    logs = LogSetup(level, form, publisher)
    logs.privilegedStartService()
    logs.startService()
    return publisher, out, logs


def refusal(detail: str) -> AuditRecord:
    return AuditRecord(
        route="users-in", direction="inbound", outcome="refused", reason="identity_not_allowed",
        peer="spiffe://example.org/billing", serial="0A1B", address="127.0.0.1:5555",
        detail=detail,
    )


def test_factory_start_and_stop_lines_are_dropped() -> None:
    publisher, out, logs = setup()
    log = Logger(namespace="twisted.internet.protocol", observer=publisher)
    log.info("Starting factory {factory!r}", factory=object())
    log.info("Stopping factory {factory!r}", factory=object())
    log.info("route {route} listening", route="users-in")
    logs.restore()
    assert "factory" not in out.getvalue()
    assert "route users-in listening" in out.getvalue()


def test_log_level_drops_less_severe_events() -> None:
    publisher, out, logs = setup(level="warn")
    log = Logger(namespace="s2sgw.test", observer=publisher)
    log.info("quiet {n}", n=1)
    log.warn("loud {n}", n=2)
    logs.restore()
    assert "quiet" not in out.getvalue() and "loud 2" in out.getvalue()


def test_stopping_restores_the_original_observers() -> None:
    publisher, out, logs = setup(level="error")
    logs.restore()
    Logger(namespace="s2sgw.test", observer=publisher).info("after {n}", n=3)
    assert "after 3" in out.getvalue()


def test_json_format_writes_one_object_per_line_with_the_audit_fields() -> None:
    publisher, out, logs = setup(form="json")
    audit = AuditLog()
    audit._log.observer = publisher
    audit.connection(refusal('not on the allow-list "users"'))
    Logger(namespace="s2sgw.test", observer=publisher).info("hello {who}", who="you")
    logs.restore()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "warn" and first["namespace"] == "s2sgw.audit"
    assert {name: first[name] for name in ("route", "outcome", "reason", "serial", "detail")} == {
        "route": "users-in", "outcome": "refused", "reason": "identity_not_allowed", "serial": "0A1B",
        "detail": 'not on the allow-list "users"',
    }
    assert set(AUDIT_FIELDS) <= set(first)
    assert second["message"] == "hello you" and second["time"].endswith("+00:00")


@pytest.mark.parametrize("detail", ["the CA said no", 'quote " and back\\slash', "a=b", ""])
def test_audit_lines_read_as_logfmt(detail: str) -> None:
    out = io.StringIO()
    publisher = LogPublisher(FileLogObserver(out, lambda event: formatEventAsClassicLogText(event)))
    audit = AuditLog()
    audit._log.observer = publisher
    audit.connection(refusal(detail))
    fields = logfmt(out.getvalue().split("] ", 1)[1])
    assert fields["detail"] == detail
    assert fields["route"] == "users-in" and fields["peer"] == "spiffe://example.org/billing"
    assert fields["reason"] == "identity_not_allowed" and fields["alert"] == "-"


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_worker_writes_finished_lines_at_the_parents_level_and_format(form: str) -> None:
    out = io.StringIO()
    publisher = LogPublisher(worker_observer(out, "warn", form, worker=1))
    log = Logger(namespace="s2sgw.test", observer=publisher)
    log.info("quiet {n}", n=1)
    log.warn("loud {n}", n=2)
    Logger(namespace="twisted.internet.protocol", observer=publisher).warn("Starting factory {f}", f=0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "quiet" not in lines[0]
    if form == "json":
        record = json.loads(lines[0])
        assert (record["message"], record["level"], record["worker"]) == ("loud 2", "warn", 1)
    else:
        assert lines[0].endswith("[s2sgw.test#warn] loud 2")


@pytest.mark.parametrize("form", ["text", "json"])
def test_the_parent_writes_worker_lines_as_they_are_whatever_its_level(form: str) -> None:
    publisher, out, logs = setup(level="error", form=form)
    output = _WorkerOutput(supervisor=None, worker=Worker(1, {}))  # type: ignore[arg-type]
    output._log = Logger(namespace="s2sgw.workers", observer=publisher)
    output.outReceived(b'{"message": "first"}\n{"mess')
    assert out.getvalue() == '{"message": "first"}\n'
    output.outReceived(b'age": "second"}\n')
    Logger(namespace="s2sgw.test", observer=publisher).warn("the parent's own {n}", n=3)
    logs.restore()
    assert out.getvalue() == '{"message": "first"}\n{"message": "second"}\n'
