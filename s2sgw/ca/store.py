"""The CA's durable state: issued certificates, revocations and counters, in SQLite.

Every operation opens its own connection, so the store is safe to call from several
threads (the status server) and several processes (two ``s2sgw ca issue`` at once).
Writes take the database lock up front (``BEGIN IMMEDIATE``) and commit with
``synchronous=FULL``, so a call returns only after its change is on disk. Certificates
inserted by several threads at once share a transaction (``batching``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from zope.interface import implementer

from s2sgw.ca.batching import GroupCommit
from s2sgw.errors import S2sgwError
from s2sgw.interfaces import ICAStore
from s2sgw.serials import serial_text

SCHEMA_VERSION = 2  # 2: certificates.issued_via and enrollment_tokens
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,          -- lowercase hex, no leading zeros
    kind TEXT NOT NULL,               -- 'leaf', 'ocsp-signer', 'est-server' or 'intermediate'
    name TEXT NOT NULL,
    sans TEXT NOT NULL,               -- JSON list of "URI:...", "DNS:...", "IP:..."
    not_before TEXT NOT NULL,         -- ISO 8601, UTC
    not_after TEXT NOT NULL,
    pem TEXT NOT NULL,
    revoked_at TEXT,
    reason TEXT,
    revocation_seq INTEGER UNIQUE,
    issued_via TEXT NOT NULL DEFAULT 'cli'  -- 'cli', 'token' or 'renewal'
);
CREATE INDEX certificates_name ON certificates (name);
"""

_ISSUED_VIA_COLUMN = "ALTER TABLE certificates ADD COLUMN issued_via TEXT NOT NULL DEFAULT 'cli'"
_TOKENS_TABLE = """
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    digest TEXT PRIMARY KEY,          -- SHA-256 of the token, hex; the token itself is never stored
    name TEXT NOT NULL,
    dns TEXT NOT NULL,                -- JSON list of extra DNS names
    created_at REAL NOT NULL,         -- Unix seconds
    expires_at REAL NOT NULL,
    used_at REAL,
    serial TEXT                       -- the certificate it was spent on
);
"""

LEAF = "leaf"
OCSP_SIGNER = "ocsp-signer"
INTERMEDIATE = "intermediate"  # an issuing CA this directory has held; revoked only by the root's CRL
EST_SERVER = "est-server"  # the EST listener's own certificate: serverAuth only, no service identity
ISSUED_VIA = ("cli", "token", "renewal")


class CAError(S2sgwError):
    """A CA operation failed for a reason the user can act on (bad input, bad directory)."""


class StoreError(CAError):
    """The CA database is missing, unreadable or not ours."""


class SerialInUse(Exception):
    """The serial is already taken; the caller signs a new certificate with a fresh one."""


class NotRevocable(CAError):
    """Nothing matched, or everything matched was already revoked."""


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat()


def _parse(text: str | None) -> datetime.datetime | None:
    return None if text is None else datetime.datetime.fromisoformat(text)


@attrs.frozen
class Row:
    """One certificate as stored; the authority turns it into a ``CertRecord``."""

    serial: int
    kind: str
    name: str
    sans: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    pem: bytes
    revoked_at: datetime.datetime | None
    reason: str | None
    revocation_seq: int | None
    issued_via: str = "cli"


_COLUMNS = "serial, kind, name, sans, not_before, not_after, pem, revoked_at, reason, revocation_seq, issued_via"


def _row(values: Sequence) -> Row:
    return Row(
        serial=int(values[0], 16),
        kind=values[1],
        name=values[2],
        sans=tuple(json.loads(values[3])),
        not_before=_parse(values[4]),
        not_after=_parse(values[5]),
        pem=values[6].encode("ascii"),
        revoked_at=_parse(values[7]),
        reason=values[8],
        revocation_seq=values[9],
        issued_via=values[10],
    )


class CertificateReads:
    """The certificate reads both stores answer with the same SQL.

    A store provides ``connection()`` (one whose ``execute`` takes ``?`` placeholders: PgStore
    translates them) and names the column that keeps insertion order.
    """

    _insertion_order: ClassVar[str] = "rowid"

    def connection(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def get(self, serial: int, kind: str = LEAF) -> Row | None:
        with self.connection() as connection:
            values = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE serial = ? AND kind = ?", (serial_hex(serial), kind)
            ).fetchone()
        return None if values is None else _row(values)

    def rows(self, kind: str = LEAF) -> list[Row]:
        """All certificates of a kind, oldest first."""
        with self.connection() as connection:
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE kind = ? ORDER BY not_before, {self._insertion_order}",
                (kind,),
            ).fetchall()
        return [_row(values) for values in found]

    def revoked_since(self, seq: int) -> list[Row]:
        with self.connection() as connection:
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE revocation_seq > ? ORDER BY revocation_seq", (seq,)
            ).fetchall()
        return [_row(values) for values in found]


def revoke_target(name: str | None, serial: int | None) -> tuple[str, tuple[str], str, str]:
    """What ``revoke`` matches: a WHERE clause (``?`` placeholder) and its argument, and the
    refusals for "nothing matched" and "all already revoked"."""
    if serial is not None:
        shown = serial_text(serial)
        unknown, done = f"no certificate with serial {shown}", f"certificate {shown} is already revoked"
        return "serial = ?", (serial_hex(serial),), unknown, done
    unknown, done = f"no certificate was issued to {name!r}", f"every certificate issued to {name!r} is already revoked"
    return "name = ?", (str(name),), unknown, done


@implementer(ICAStore)
@attrs.frozen
class CAStore(CertificateReads):
    """The SQLite file ``ca.db`` of one CA directory."""

    path: Path
    _inserts: GroupCommit = attrs.field(factory=GroupCommit, init=False, eq=False, repr=False)
    _idle: list[sqlite3.Connection] = attrs.field(factory=list, init=False, eq=False, repr=False)

    def _uri(self) -> str:
        # "mode=rw" refuses to create a missing database: a missing file is an error.
        return "file:" + str(self.path.absolute()).replace("?", "%3f").replace("#", "%23") + "?mode=rw"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            connection = sqlite3.connect(
                self._uri(), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
        except sqlite3.Error as error:
            raise StoreError(f"cannot open CA database {self.path}: {error}") from None
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA synchronous = FULL")
            yield connection
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.IntegrityError):
                raise
            raise StoreError(f"CA database {self.path}: {error}") from None
        finally:
            connection.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database lock from its first statement."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction, for tables kept beside the certificates (enrollment tokens)."""
        return self._write()

    def connection(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection for reads outside a transaction."""
        return self._connect()

    def keep_open(self) -> None:
        """Hold one idle connection for as long as this store lives (a long-running server).

        SQLite checkpoints and deletes the write-ahead log whenever the last connection to a
        database closes; with a connection per operation that is every operation, and costs each
        write two more syncs and a new log. An idle connection (no transaction) blocks nothing.
        """
        if self._idle:
            return
        connection = sqlite3.connect(self._uri(), uri=True, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("SELECT COUNT(*) FROM meta").fetchall()  # opens the file and the log index
        except sqlite3.Error as error:
            connection.close()
            raise StoreError(f"cannot open CA database {self.path}: {error}") from None
        self._idle.append(connection)

    def watch(self, on_change: Callable[[], None], on_error: Callable[[str], None]) -> None:
        """SQLite cannot tell other processes' connections about a commit: servers poll."""
        return None

    def migrate(self) -> None:
        """Bring a store made by an earlier version up to this schema (no-op when current)."""
        with self._connect() as connection:
            try:
                found = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError:
                return  # not ours: meta() says so
            if found is None or found[0] != 1:
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                (version,) = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if version == 1:  # another process may have migrated while this one waited
                    columns = {row[1] for row in connection.execute("PRAGMA table_info(certificates)")}
                    if "issued_via" not in columns:
                        connection.execute(_ISSUED_VIA_COLUMN)
                    connection.execute(_TOKENS_TABLE)
                    connection.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @classmethod
    def create(cls, path: Path, meta: dict[str, object]) -> CAStore:
        """Make a fresh database at ``path`` (which must not exist yet)."""
        connection = sqlite3.connect(str(path), isolation_level=None)
        try:
            # A fresh temporary file renamed into place by the caller: no transaction needed.
            connection.execute("PRAGMA journal_mode = WAL")
            connection.executescript(_SCHEMA + _TOKENS_TABLE)
            values = {
                "schema_version": SCHEMA_VERSION,
                "crl_number": 0,
                "revocation_seq": 0,
                "changes": 0,
                **meta,
            }
            connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", values.items())
        finally:
            connection.close()
        return cls(path)

    def meta(self) -> dict[str, object]:
        with self._connect() as connection:
            try:
                rows = connection.execute("SELECT key, value FROM meta").fetchall()
            except sqlite3.OperationalError:
                raise StoreError(f"{self.path} is not an s2sgw CA database") from None
        values = dict(rows)
        if values.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path} is not an s2sgw CA database of a known version")
        return values

    def insert(self, row: Row, *, claim: Callable[[sqlite3.Connection, Row], None] | None = None) -> None:
        """Record a newly signed certificate; ``SerialInUse`` if its serial was ever issued.

        ``claim`` runs first in the same transaction (spending an enrollment token): if it
        raises, nothing is recorded, so a token buys at most one certificate. Returns once the
        row is on disk, possibly committed together with other threads' rows.
        """
        self._inserts.submit((row, claim), self._insert_batch)

    def _insert_batch(self, items: Sequence[tuple[Row, Callable[..., None] | None]]) -> list[BaseException | None]:
        """One transaction for ``items``, each in a savepoint: one refused claim or taken serial
        leaves the others recorded. A database failure fails them all."""
        outcomes: list[BaseException | None] = []
        with self._write() as connection:
            for row, claim in items:
                connection.execute("SAVEPOINT certificate")
                try:
                    if claim is not None:
                        claim(connection, row)
                    connection.execute(
                        f"INSERT INTO certificates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?)",
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
                except sqlite3.IntegrityError:
                    outcomes.append(SerialInUse(row.serial))
                except sqlite3.Error:
                    raise  # the database itself failed: no row of this batch is recorded
                except Exception as refused:  # the claim said no
                    outcomes.append(refused)
                else:
                    outcomes.append(None)
                    connection.execute("RELEASE certificate")
                    continue
                connection.execute("ROLLBACK TO certificate")
                connection.execute("RELEASE certificate")
            if any(outcome is None for outcome in outcomes):
                connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
        return outcomes

    def revoke(
        self,
        *,
        name: str | None,
        serial: int | None,
        reason: str,
        revoked_at: datetime.datetime,
    ) -> list[Row]:
        """Mark matching unrevoked leaves revoked in one transaction; return them as revoked."""
        with self._write() as connection:
            where, args, unknown, done = revoke_target(name, serial)
            matched = connection.execute(
                f"SELECT serial, revoked_at FROM certificates WHERE kind = 'leaf' AND {where}", args
            ).fetchall()
            if not matched:
                raise NotRevocable(unknown)
            pending = [stored for stored, already in matched if already is None]
            if not pending:
                raise NotRevocable(done)
            (seq,) = connection.execute("SELECT value FROM meta WHERE key = 'revocation_seq'").fetchone()
            for stored in pending:
                seq += 1
                connection.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ?, revocation_seq = ? WHERE serial = ?",
                    (_iso(revoked_at), reason, seq, stored),
                )
            connection.execute("UPDATE meta SET value = ? WHERE key = 'revocation_seq'", (seq,))
            connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
            marks = ",".join("?" * len(pending))
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE serial IN ({marks}) ORDER BY revocation_seq",
                pending,
            ).fetchall()
        return [_row(values) for values in found]

    def revoke_intermediate(self, serial: int, *, reason: str, revoked_at: datetime.datetime) -> Row:
        """Mark an issuing CA revoked, for the root's CRL. It takes no ``revocation_seq``: the
        leaves' OCSP answers, CRL and feed speak only of leaves."""
        with self._write() as connection:
            found = connection.execute(
                "SELECT revoked_at FROM certificates WHERE kind = ? AND serial = ?", (INTERMEDIATE, serial_hex(serial))
            ).fetchone()
            if found is None:
                raise NotRevocable(f"no issuing CA with serial {serial_text(serial)}")
            if found[0] is not None:
                raise NotRevocable(f"issuing CA {serial_text(serial)} is already revoked")
            connection.execute(
                "UPDATE certificates SET revoked_at = ?, reason = ? WHERE serial = ?",
                (_iso(revoked_at), reason, serial_hex(serial)),
            )
            connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
            values = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE serial = ?", (serial_hex(serial),)
            ).fetchone()
        return _row(values)

    def next_crl_number(self) -> tuple[int, list[Row]]:
        """Take the next CRL number and, in the same transaction, every revoked leaf.

        The one CRL number sequence of this CA: ``s2sgw ca crl`` and the status server both
        take their numbers here. Taking one also bumps the change marker, so a running server
        notices a CRL made by hand and publishes a newer one (see ``crl_number``).
        """
        with self._write() as connection:
            connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'crl_number'")
            connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
            (number,) = connection.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE kind = 'leaf' AND revocation_seq IS NOT NULL "
                "ORDER BY revocation_seq"
            ).fetchall()
        return number, [_row(values) for values in found]

    def crl_number(self) -> int:
        """The last CRL number handed out (0 before the first CRL)."""
        with self._connect() as connection:
            (value,) = connection.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        return value

    def publish_crl(self, number: int, der: bytes) -> None:
        """Nothing to share: one SQLite file serves one status server (see ``PgStore``)."""

    def published_crl(self, above: int) -> tuple[int, bytes] | None:
        return None

    def change_marker(self) -> int:
        """A counter bumped by every issue, revoke and CRL number taken; one indexed read."""
        with self._connect() as connection:
            (value,) = connection.execute("SELECT value FROM meta WHERE key = 'changes'").fetchone()
        return value
