"""The CA's durable state in PostgreSQL, shared by several status servers (replicas).

Same contract as the SQLite :class:`~s2sgw.ca.store.CAStore` (``ICAStore``), with what sharing
needs on top:

- Counters (revocation sequence, CRL number, change marker) are rows updated in the
  transaction that uses them (``UPDATE ... RETURNING``): the row lock serializes writers, so
  revocation sequence numbers are contiguous and become visible in order on every replica, and
  CRL numbers strictly increase whichever replica signs.
- Every write that changes what a status server publishes sends ``NOTIFY s2sgw_ca`` in its
  transaction; PostgreSQL delivers it at commit. :meth:`PgStore.watch` keeps one listening
  connection in a thread of its own and calls back for each.
- Blocking (psycopg): call from threads, never on a reactor. Connections come from a small
  pool; each thread uses its own.

The schema is created by ``s2sgw ca init --store`` and versioned in ``meta.schema_version``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import attrs
import psycopg
from psycopg import errors as pg_errors
from zope.interface import implementer

from s2sgw.ca.store import (
    _COLUMNS,
    INTERMEDIATE,
    CertificateReads,
    NotRevocable,
    Row,
    SerialInUse,
    StoreError,
    _iso,
    _row,
    revoke_target,
    serial_hex,
)
from s2sgw.interfaces import ICAStore
from s2sgw.serials import serial_text

SCHEMA_VERSION = 1  # of this PostgreSQL schema; the SQLite file has its own numbering
CHANNEL = "s2sgw_ca"
MAX_IDLE = 8
CONNECT_TIMEOUT = 10
COUNTERS = ("crl_number", "revocation_seq", "changes")

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value JSONB);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE certificates (
    id BIGSERIAL UNIQUE,
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    sans TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    pem TEXT NOT NULL,
    revoked_at TEXT,
    reason TEXT,
    revocation_seq BIGINT UNIQUE,
    issued_via TEXT NOT NULL DEFAULT 'cli'
);
CREATE INDEX certificates_name ON certificates (name);
CREATE TABLE published_crl (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    number BIGINT NOT NULL,
    der BYTEA NOT NULL
);
CREATE TABLE enrollment_tokens (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    dns TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION,
    serial TEXT
);
INSERT INTO counters (name, value) VALUES {", ".join(f"('{name}', 0)" for name in COUNTERS)};
"""


class _Portable:
    """A psycopg connection that takes the ``?`` placeholders of the store-neutral SQL
    (enrollment tokens) the way ``sqlite3`` does."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        return self._connection.execute(sql.replace("?", "%s"), params)


@contextlib.contextmanager
def _portable(opened: contextlib.AbstractContextManager[psycopg.Connection]) -> Iterator[_Portable]:
    with opened as connection:
        yield _Portable(connection)


def _describe(url: str) -> str:
    """The URL without a password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "a PostgreSQL database"
    host, port, name = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
    return f"postgresql://{host}:{port}/{name}"


@implementer(ICAStore)
@attrs.define(eq=False)
class PgStore(CertificateReads):
    """One PostgreSQL database holding one CA's state."""

    _insertion_order: ClassVar[str] = "id"

    url: str = attrs.field(repr=False)
    _idle: list[psycopg.Connection] = attrs.field(factory=list, init=False, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def where(self) -> str:
        return _describe(self.url)

    # -- connections ------------------------------------------------------------------------

    def _open(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as error:
            raise StoreError(f"cannot open CA database {self.where}: {str(error).strip()}") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None or connection.closed:
            connection = self._open()
        healthy = True
        try:
            yield connection
        except (pg_errors.UniqueViolation, pg_errors.SerializationFailure):
            raise
        except psycopg.Error as error:
            healthy = not isinstance(error, psycopg.OperationalError)
            raise StoreError(f"CA database {self.where}: {str(error).strip()}") from None
        finally:
            if healthy and not connection.closed and connection.info.transaction_status == 0:
                with self._lock:
                    if len(self._idle) < MAX_IDLE:
                        self._idle.append(connection)
                        connection = None
            if connection is not None:
                connection.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        with self._connect() as connection, connection.transaction():
            yield connection

    def transaction(self) -> contextlib.AbstractContextManager[_Portable]:
        """A write transaction, for tables kept beside the certificates (enrollment tokens)."""
        return _portable(self._write())

    def connection(self) -> contextlib.AbstractContextManager[_Portable]:
        """A connection for reads outside a transaction."""
        return _portable(self._connect())

    def keep_open(self) -> None:
        """Check the database answers now (a server fails at start, not at its first request)."""
        with self._connect() as connection:
            connection.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- schema -----------------------------------------------------------------------------

    def create(self, meta: dict[str, object]) -> None:
        """Make the schema in an empty database; CAError if it holds a CA (or anything of ours)."""
        with self._write() as connection:
            connection.execute("SELECT pg_advisory_xact_lock(hashtext('s2sgw_ca_schema'))")
            found = connection.execute("SELECT to_regclass('meta')").fetchone()
            if found != (None,):
                raise StoreError(f"{self.where} already holds a CA (or another application's meta table)")
            connection.execute(_SCHEMA)
            values = {"schema_version": SCHEMA_VERSION, **meta}
            for key, value in values.items():
                connection.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s)", (key, psycopg.types.json.Jsonb(value))
                )

    def migrate(self) -> None:
        """No earlier PostgreSQL schema exists: version 1 is the current one. A later version
        adds its steps here, under ``pg_advisory_xact_lock`` like ``create``."""

    def meta(self) -> dict[str, object]:
        with self._connect() as connection:
            try:
                rows = connection.execute("SELECT key, value FROM meta").fetchall()
                rows += connection.execute("SELECT name, value FROM counters").fetchall()
            except pg_errors.UndefinedTable:
                raise StoreError(f"{self.where} is not an s2sgw CA database") from None
        values = dict(rows)
        if values.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.where} is not an s2sgw CA database of a known version")
        return values

    # -- certificates -----------------------------------------------------------------------

    def insert(self, row: Row, *, claim: Callable[[Any, Row], None] | None = None) -> None:
        """Record a newly signed certificate; ``SerialInUse`` if its serial was ever issued.

        ``claim`` runs first in the same transaction; if it raises, nothing is recorded.
        """
        try:
            with self._write() as connection:
                if claim is not None:
                    claim(_Portable(connection), row)
                connection.execute(
                    f"INSERT INTO certificates ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL, NULL, %s)",
                    (
                        serial_hex(row.serial),
                        row.kind,
                        row.name,
                        json.dumps(list(row.sans)),
                        _iso(row.not_before),
                        _iso(row.not_after),
                        row.pem.decode("ascii"),
                        row.issued_via,
                    ),
                )
                self._changed(connection)
        except pg_errors.UniqueViolation:
            raise SerialInUse(row.serial) from None

    @staticmethod
    def _changed(connection: psycopg.Connection) -> int:
        """Bump the change marker and tell every listening replica (at commit)."""
        (marker,) = connection.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'changes' RETURNING value"
        ).fetchone()
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(marker)))
        return marker

    def revoke(
        self, *, name: str | None, serial: int | None, reason: str, revoked_at: datetime.datetime
    ) -> list[Row]:
        """Mark matching unrevoked leaves revoked in one transaction; return them as revoked.

        The matched rows are locked first: of two replicas revoking the same certificate at once,
        the second sees it revoked once the first commits.
        """
        with self._write() as connection:
            where, args, unknown, done = revoke_target(name, serial)
            where = where.replace("?", "%s")
            matched = connection.execute(
                f"SELECT serial, revoked_at FROM certificates WHERE kind = 'leaf' AND {where} ORDER BY serial FOR UPDATE",
                args,
            ).fetchall()
            if not matched:
                raise NotRevocable(unknown)
            pending = [stored for stored, already in matched if already is None]
            if not pending:
                raise NotRevocable(done)
            (last,) = connection.execute(
                "UPDATE counters SET value = value + %s WHERE name = 'revocation_seq' RETURNING value", (len(pending),)
            ).fetchone()
            for seq, stored in enumerate(pending, start=last - len(pending) + 1):
                connection.execute(
                    "UPDATE certificates SET revoked_at = %s, reason = %s, revocation_seq = %s WHERE serial = %s",
                    (_iso(revoked_at), reason, seq, stored),
                )
            self._changed(connection)
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE serial = ANY(%s) ORDER BY revocation_seq", (pending,)
            ).fetchall()
        return [_row(values) for values in found]

    def revoke_intermediate(self, serial: int, *, reason: str, revoked_at: datetime.datetime) -> Row:
        """Mark an issuing CA revoked, for the root's CRL (no ``revocation_seq``: the feed,
        OCSP answers and the CRL of leaves speak only of leaves)."""
        with self._write() as connection:
            found = connection.execute(
                "SELECT revoked_at FROM certificates WHERE kind = %s AND serial = %s FOR UPDATE",
                (INTERMEDIATE, serial_hex(serial)),
            ).fetchone()
            if found is None:
                raise NotRevocable(f"no issuing CA with serial {serial_text(serial)}")
            if found[0] is not None:
                raise NotRevocable(f"issuing CA {serial_text(serial)} is already revoked")
            connection.execute(
                "UPDATE certificates SET revoked_at = %s, reason = %s WHERE serial = %s",
                (_iso(revoked_at), reason, serial_hex(serial)),
            )
            self._changed(connection)
            values = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE serial = %s", (serial_hex(serial),)
            ).fetchone()
        return _row(values)

    def next_crl_number(self) -> tuple[int, list[Row]]:
        """Take the next CRL number and, in the same transaction, every revoked leaf.

        Like the SQLite store it moves the change marker, so the status servers notice a CRL
        made by hand and publish above it.
        """
        with self._write() as connection:
            (number,) = connection.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'crl_number' RETURNING value"
            ).fetchone()
            self._changed(connection)
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE kind = 'leaf' AND revocation_seq IS NOT NULL "
                "ORDER BY revocation_seq"
            ).fetchall()
        return number, [_row(values) for values in found]

    def crl_number(self) -> int:
        """The last CRL number handed out (0 before the first CRL)."""
        with self._connect() as connection:
            (value,) = connection.execute("SELECT value FROM counters WHERE name = 'crl_number'").fetchone()
        return value

    def publish_crl(self, number: int, der: bytes) -> None:
        """Offer a signed CRL to the other status servers; kept only if its number is the highest.

        A higher number was taken later, with every revocation the lower one holds: serving the
        highest everywhere never hides a revocation and never rolls a gateway back.
        """
        with self._write() as connection:
            stored = connection.execute(
                "INSERT INTO published_crl (only_row, number, der) VALUES (TRUE, %s, %s) "
                "ON CONFLICT (only_row) DO UPDATE SET number = excluded.number, der = excluded.der "
                "WHERE published_crl.number < excluded.number",
                (number, der),
            ).rowcount
            if stored:
                self._changed(connection)

    def published_crl(self, above: int) -> tuple[int, bytes] | None:
        """The highest CRL a status server published, if its number is above ``above``."""
        with self._connect() as connection:
            found = connection.execute(
                "SELECT number, der FROM published_crl WHERE number > %s", (above,)
            ).fetchone()
        return None if found is None else (found[0], bytes(found[1]))

    def change_marker(self) -> int:
        with self._connect() as connection:
            (value,) = connection.execute("SELECT value FROM counters WHERE name = 'changes'").fetchone()
        return value

    # -- change notifications ---------------------------------------------------------------

    def watch(self, on_change: Callable[[], None], on_error: Callable[[str], None]) -> Callable[[], None]:
        """Call ``on_change`` (in a thread of its own) after every committed change; returns stop.

        One dedicated connection does ``LISTEN``. When it breaks, the thread reconnects with
        backoff and calls ``on_change`` once connected again, since notifications sent while it
        was away are lost.
        """
        listener = _Listener(self, on_change, on_error)
        listener.start()
        return listener.stop


@attrs.define(eq=False)
class _Listener:
    store: PgStore
    on_change: Callable[[], None]
    on_error: Callable[[str], None]
    _stopping: threading.Event = attrs.field(factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="s2sgw-ca-listen", daemon=True).start()

    def stop(self) -> None:
        """Never blocks: the thread sees the flag within half a second and closes its connection."""
        self._stopping.set()

    def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.store.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    self.on_change()  # whatever happened while nobody listened
                    while not self._stopping.is_set():
                        # Wakes at the first notification (or every half second to see a stop).
                        news = any(True for _ in connection.notifies(timeout=0.5, stop_after=1))
                        if news and not self._stopping.is_set():
                            self.on_change()
            except psycopg.Error as error:
                if self._stopping.is_set():
                    return
                self.on_error(str(error).strip() or type(error).__name__)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
