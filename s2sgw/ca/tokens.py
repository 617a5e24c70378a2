"""One-time enrollment tokens: what lets a new service get its first certificate over EST.

``s2sgw ca token NAME`` makes a random 256-bit secret bound to NAME (and the extra DNS names it
may carry), valid for a short time, and prints it once. The store keeps only its SHA-256: a
copy of ``ca.db`` gives nobody a usable token, and a presented token is found by the hash of
what was sent, so no secret is ever compared byte by byte. A token is spent in the same
transaction that records the certificate it buys (``UPDATE ... WHERE used_at IS NULL``), so
two requests racing with one token get one certificate between them.

Blocking (SQLite): call from a thread on a reactor.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Callable, Sequence

import attrs

from s2sgw.ca.authority import validate_dns_name, validate_service_name
from s2sgw.ca.store import CAError, CAStore, Row, serial_hex

TOKEN_BYTES = 32
PREFIX = "s2sgw_"  # never a leading "-" that a command line would take for an option; easy to grep for
DEFAULT_TTL = datetime.timedelta(minutes=15)
MAX_TTL = datetime.timedelta(days=30)


class TokenRefused(Exception):
    """A token that buys nothing: unknown, spent, expired or bound to another name.

    ``other_name`` tells a valid token for another service (403) from a bad one (401).
    """

    def __init__(self, reason: str, *, other_name: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.other_name = other_name


def digest(token: str) -> str:
    """SHA-256 of the token's text, hex: the only form the store keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _seconds(moment: datetime.datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


@attrs.frozen
class Token:
    """What the store knows about one token (never the token itself)."""

    digest: str
    name: str
    dns: tuple[str, ...]
    created_at: float  # Unix seconds
    expires_at: float
    used_at: float | None = None
    serial: int | None = None


@attrs.frozen
class TokenBook:
    """The enrollment tokens of one CA store."""

    store: CAStore

    def create(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ttl: datetime.timedelta = DEFAULT_TTL,
        now: datetime.datetime,
    ) -> str:
        """A new token for ``name``; the caller shows it once, the store keeps its hash."""
        validate_service_name(name)
        names = list(dict.fromkeys(validate_dns_name(d) for d in dns))
        if not datetime.timedelta(0) < ttl <= MAX_TTL:
            raise CAError(f"a token's time to live must be positive and at most {MAX_TTL.days} days")
        token = PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        created = _seconds(now)
        with self.store.transaction() as connection:
            connection.execute(
                "INSERT INTO enrollment_tokens (digest, name, dns, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (digest(token), name, json.dumps(names), created, created + ttl.total_seconds()),
            )
        return token

    def find(self, token: str) -> Token | None:
        with self.store.connection() as connection:
            values = connection.execute(
                "SELECT digest, name, dns, created_at, expires_at, used_at, serial "
                "FROM enrollment_tokens WHERE digest = ?",
                (digest(token),),
            ).fetchone()
        if values is None:
            return None
        return Token(
            digest=values[0],
            name=values[1],
            dns=tuple(json.loads(values[2])),
            created_at=values[3],
            expires_at=values[4],
            used_at=values[5],
            serial=None if values[6] is None else int(values[6], 16),
        )

    def check(self, token: str, name: str, now: datetime.datetime) -> Token:
        """The token's record if it may buy a certificate for ``name`` now; else ``TokenRefused``.

        Spending happens later, in ``claim``: a refused CSR does not burn the token.
        """
        found = self.find(token)
        if found is None:
            raise TokenRefused("unknown token")
        if found.used_at is not None:
            raise TokenRefused("token already used")
        if _seconds(now) >= found.expires_at:
            raise TokenRefused("token expired")
        if found.name != name:
            raise TokenRefused("token is bound to another name", other_name=True)
        return found

    @staticmethod
    def claim(token: Token, now: datetime.datetime) -> Callable[[sqlite3.Connection, Row], None]:
        """Spend ``token`` inside the transaction recording ``row``; raise if it is gone already."""

        def spend(connection: sqlite3.Connection, row: Row) -> None:
            cursor = connection.execute(
                "UPDATE enrollment_tokens SET used_at = ?, serial = ? "
                "WHERE digest = ? AND name = ? AND used_at IS NULL AND expires_at > ?",
                (_seconds(now), serial_hex(row.serial), token.digest, token.name, _seconds(now)),
            )
            if cursor.rowcount != 1:
                raise TokenRefused("token already used")

        return spend

    def count(self) -> int:
        with self.store.connection() as connection:
            (value,) = connection.execute("SELECT COUNT(*) FROM enrollment_tokens").fetchone()
        return value
