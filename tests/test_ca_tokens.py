"""Enrollment tokens: hashed at rest, bound to a name, expiring, spent at most once even in a race."""

from __future__ import annotations

import datetime
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from s2sgw.ca.authority import CAError, CertificateAuthority
from s2sgw.ca.store import CAStore, StoreError
from s2sgw.ca.tokens import TokenBook, TokenRefused, digest

DOMAIN = "example.org"
NOW = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
BIN = Path(sys.executable).parent


@pytest.fixture
def ca(tmp_path: Path, ca_store: str | None) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", DOMAIN, store=ca_store)


@pytest.fixture
def book(ca: CertificateAuthority) -> TokenBook:
    return TokenBook(ca.store)


def spend(ca: CertificateAuthority, book: TokenBook, token: str, name: str, now: datetime.datetime) -> int:
    """What simpleenroll does with a token: check, then certify while claiming it."""
    found = book.check(token, name, now)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    record = ca.certify(
        name, key, ca.planned_sans(name, dns=found.dns), lifetime=datetime.timedelta(hours=1), now=now,
        issued_via="token", claim=TokenBook.claim(found, now),
    )  # fmt: skip
    return record.serial


def test_the_store_keeps_only_the_hash_of_a_token(
    ca: CertificateAuthority, book: TokenBook, ca_store: str | None
) -> None:
    """Neither the token nor any 16-character piece of it is in the store; its SHA-256 is."""
    token = book.create("orders", now=NOW)
    if ca_store is None:
        raw = (ca.directory / "ca.db").read_bytes() + b"".join(
            p.read_bytes() for p in ca.directory.glob("ca.db-*")
        )
    else:
        with psycopg.connect(ca_store) as connection:
            rows = connection.execute("SELECT t::text FROM enrollment_tokens t").fetchall()
        raw = "".join(text for (text,) in rows).encode()
        assert digest(token).encode() in raw
    assert token.startswith("s2sgw_") and len(token) >= 40
    secret = token.removeprefix("s2sgw_").encode()
    assert not any(secret[i : i + 16] in raw for i in range(len(secret) - 15))
    assert book.find(token).digest == digest(token)


def test_tokens_are_random_and_bound_to_their_name_and_dns(book: TokenBook) -> None:
    first = book.create("orders", dns=["orders.svc", "ORDERS.svc"], now=NOW)
    second = book.create("orders", now=NOW)
    assert first != second
    found = book.check(first, "orders", NOW)
    assert found.name == "orders" and found.dns == ("orders.svc",)
    with pytest.raises(TokenRefused) as refused:
        book.check(first, "billing", NOW)
    assert refused.value.other_name and "another name" in refused.value.reason


def test_a_token_expires_at_its_ttl_on_the_injected_clock(book: TokenBook) -> None:
    token = book.create("orders", ttl=datetime.timedelta(minutes=15), now=NOW)
    book.check(token, "orders", NOW + datetime.timedelta(minutes=14, seconds=59))
    with pytest.raises(TokenRefused, match="token expired"):
        book.check(token, "orders", NOW + datetime.timedelta(minutes=15))


def test_an_unknown_token_is_refused_without_saying_more(book: TokenBook) -> None:
    book.create("orders", now=NOW)
    with pytest.raises(TokenRefused, match="unknown token") as refused:
        book.check("s2sgw_" + "A" * 43, "orders", NOW)
    assert not refused.value.other_name


def test_a_token_buys_one_certificate_and_is_then_spent(ca: CertificateAuthority, book: TokenBook) -> None:
    token = book.create("orders", dns=["orders.svc"], now=NOW)
    serial = spend(ca, book, token, "orders", NOW)

    record = ca.lookup(serial)
    assert record is not None and record.issued_via == "token"
    assert "DNS:orders.svc" in record.sans and f"URI:spiffe://{DOMAIN}/orders" in record.sans
    assert book.find(token).serial == serial
    with pytest.raises(TokenRefused, match="already used"):
        spend(ca, book, token, "orders", NOW)
    assert len(ca.records()) == 1


def test_a_token_checked_twice_before_either_spends_it_buys_one_certificate(
    ca: CertificateAuthority, book: TokenBook
) -> None:
    """Both checks pass; the claim inside the recording transaction lets only the first through."""
    token = book.create("orders", now=NOW)
    found = book.check(token, "orders", NOW)
    book.check(token, "orders", NOW)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    sans = ca.planned_sans("orders")
    life = datetime.timedelta(hours=1)
    ca.certify("orders", key, sans, lifetime=life, now=NOW, claim=TokenBook.claim(found, NOW))
    with pytest.raises(TokenRefused, match="already used"):
        ca.certify("orders", key, sans, lifetime=life, now=NOW, claim=TokenBook.claim(found, NOW))
    assert len(ca.records()) == 1


def test_ten_threads_racing_with_one_token_get_one_certificate(ca: CertificateAuthority, book: TokenBook) -> None:
    token = book.create("orders", now=NOW)
    barrier = threading.Barrier(10)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait(timeout=10)
        try:
            spend(ca, book, token, "orders", NOW)
            outcome = "issued"
        except TokenRefused as refused:
            outcome = refused.reason
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["issued"] + ["token already used"] * 9
    assert len(ca.records()) == 1


def test_bad_names_dns_and_ttls_make_no_token(book: TokenBook) -> None:
    for kwargs in ({"name": "Orders"}, {"name": "orders", "dns": ["bad name"]},
                   {"name": "orders", "ttl": datetime.timedelta(0)},
                   {"name": "orders", "ttl": datetime.timedelta(days=31)}):  # fmt: skip
        with pytest.raises(CAError):
            book.create(now=NOW, **kwargs)
    assert book.count() == 0


def test_token_command_prints_only_the_token(ca: CertificateAuthority) -> None:
    """`T=$(s2sgw ca token ...)` holds exactly the token: one line on stdout, nothing else."""
    result = subprocess.run(
        [str(BIN / "s2sgw"), "ca", "token", "--dir", str(ca.directory), "orders", "--ttl", "15m", "--dns", "orders.svc"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token and " " not in token and result.stderr == ""
    found = TokenBook(ca.store).find(token)
    assert found is not None and found.name == "orders" and found.dns == ("orders.svc",)
    assert 899 <= found.expires_at - found.created_at <= 901


def test_token_command_refuses_bad_input_in_one_line(ca: CertificateAuthority) -> None:
    for args in (["Bad_Name"], ["orders", "--ttl", "soon"], ["orders", "--dns=-x-"]):
        result = subprocess.run(
            [str(BIN / "s2sgw"), "ca", "token", "--dir", str(ca.directory), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("s2sgw: error:") and result.stderr.count("\n") == 1
    assert TokenBook(ca.store).count() == 0


# -- schema migration ----------------------------------------------------------------------------

_VERSION_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, sans TEXT NOT NULL,
    not_before TEXT NOT NULL, not_after TEXT NOT NULL, pem TEXT NOT NULL, revoked_at TEXT,
    reason TEXT, revocation_seq INTEGER UNIQUE
);
CREATE INDEX certificates_name ON certificates (name);
"""


def _downgrade_to_version_1(ca: CertificateAuthority) -> None:
    """Rebuild ca.db the way the first release made it, keeping its rows."""
    path = ca.directory / "ca.db"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        meta = connection.execute("SELECT key, value FROM meta").fetchall()
        rows = connection.execute(
            "SELECT serial, kind, name, sans, not_before, not_after, pem, revoked_at, reason, revocation_seq "
            "FROM certificates"
        ).fetchall()
        connection.executescript("DROP TABLE meta; DROP TABLE certificates; DROP TABLE enrollment_tokens;")
        connection.executescript(_VERSION_1)
        connection.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        connection.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
        connection.executemany("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        connection.close()


def test_a_version_1_store_is_migrated_on_open_keeping_its_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN)  # version 1 existed in SQLite only
    issued = ca.issue("orders").record
    _downgrade_to_version_1(ca)
    with pytest.raises(StoreError):
        CAStore(ca.directory / "ca.db").meta()  # the old schema is not read as the new one

    reopened = CertificateAuthority.open(ca.directory)

    assert reopened.store.meta()["schema_version"] == 2
    (record,) = reopened.records()
    assert record.serial == issued.serial and record.issued_via == "cli"
    token = TokenBook(reopened.store).create("billing", now=NOW)
    assert spend(reopened, TokenBook(reopened.store), token, "billing", NOW)
    CertificateAuthority.open(ca.directory)  # a second open finds nothing to do
    assert sorted(r.issued_via for r in CertificateAuthority.open(ca.directory).records()) == ["cli", "token"]


def test_list_shows_how_each_certificate_was_issued(ca: CertificateAuthority, book: TokenBook) -> None:
    ca.issue("by-cli")
    spend(ca, book, book.create("by-token", now=NOW), "by-token", NOW)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ca.certify("by-renewal", key, ca.planned_sans("by-renewal"), lifetime=datetime.timedelta(hours=1),
               issued_via="renewal")  # fmt: skip
    result = subprocess.run(
        [str(BIN / "s2sgw"), "ca", "list", "--dir", str(ca.directory)], capture_output=True, text=True, timeout=30
    )
    rows = {line.split()[1]: line.split()[3] for line in result.stdout.splitlines()[1:]}
    assert rows == {"by-cli": "cli", "by-token": "token", "by-renewal": "renewal"}
