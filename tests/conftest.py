"""Shared fixtures: logged failures fail the test that caused them."""

from __future__ import annotations

import gc

import pytest
from twisted.logger import LogLevel, globalLogPublisher


class LoggedErrors:
    """Collects error and critical log events (failures, unhandled Deferred errors)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._expected: list[str] = []

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            self.events.append(event)

    def expect(self, fragment: str) -> None:
        """Allow logged errors whose text contains ``fragment`` (the test checks them itself)."""
        self._expected.append(fragment)

    def unexpected(self) -> list[str]:
        from twisted.logger import formatEvent

        texts = []
        for event in self.events:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            if not any(fragment in text for fragment in self._expected):
                texts.append(text)
        return texts


@pytest.fixture(autouse=True)
def logged_errors():
    """Fail any test during which an error was logged and not expected."""
    observer = LoggedErrors()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
        gc.collect()  # flush "Unhandled error in Deferred" from collected Deferreds
    finally:
        globalLogPublisher.removeObserver(observer)
    unexpected = observer.unexpected()
    if unexpected:
        pytest.fail("errors were logged:\n" + "\n---\n".join(unexpected), pytrace=False)


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the session (initdb as an unprivileged user, a free port)."""
    from tests.pgcluster import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The URL of a fresh, empty database in the session's cluster."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def ca_store(request) -> str | None:
    """Each CA store in turn: None (the directory's own SQLite file), then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")
