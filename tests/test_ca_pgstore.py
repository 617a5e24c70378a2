"""The PostgreSQL store: a directory records it, later commands find it, and it belongs to one CA."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from zope.interface.verify import verifyObject

from s2sgw.ca.authority import CAError, CertificateAuthority
from s2sgw.ca.pgstore import PgStore
from s2sgw.ca.store import CAStore
from s2sgw.interfaces import ICAStore

DOMAIN = "example.internal"


def s2sgw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s2sgw.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_both_stores_provide_the_store_interface(tmp_path: Path, pg_url: str) -> None:
    sqlite = CertificateAuthority.init(tmp_path / "a", DOMAIN).store
    shared = CertificateAuthority.init(tmp_path / "b", DOMAIN, store=pg_url).store
    assert isinstance(sqlite, CAStore) and isinstance(shared, PgStore)
    assert verifyObject(ICAStore, sqlite)
    assert verifyObject(ICAStore, shared)


def test_the_directory_records_the_store_and_every_command_uses_it(tmp_path: Path, pg_url: str) -> None:
    ca_dir = tmp_path / "ca"
    created = s2sgw("ca", "init", "--dir", ca_dir, "--trust-domain", DOMAIN, "--store", pg_url)
    assert created.returncode == 0, created.stderr
    recorded = ca_dir / "store.url"
    assert recorded.read_text().strip() == pg_url
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600  # a URL may carry a password
    assert not (ca_dir / "ca.db").exists()
    issued = s2sgw("ca", "issue", "--dir", ca_dir, "orders", "--out", tmp_path / "out")
    assert issued.returncode == 0, issued.stderr
    revoked = s2sgw("ca", "revoke", "--dir", ca_dir, "orders")
    assert revoked.returncode == 0, revoked.stderr
    with psycopg.connect(pg_url) as connection:
        rows = connection.execute("SELECT name, reason, revocation_seq FROM certificates WHERE kind = 'leaf'").fetchall()
    assert rows == [("orders", "unspecified", 1)]
    listed = s2sgw("ca", "list", "--dir", ca_dir)
    assert "orders" in listed.stdout and "revoked" in listed.stdout


def test_init_refuses_a_database_that_holds_a_ca_and_leaves_no_files(tmp_path: Path, pg_url: str) -> None:
    CertificateAuthority.init(tmp_path / "first", DOMAIN, store=pg_url)
    with pytest.raises(CAError, match="already holds a CA"):
        CertificateAuthority.init(tmp_path / "second", DOMAIN, store=pg_url)
    assert not (tmp_path / "second").exists()


def test_a_directory_refuses_another_cas_database(tmp_path: Path, pg_url: str) -> None:
    CertificateAuthority.init(tmp_path / "shared", DOMAIN, store=pg_url)
    other = CertificateAuthority.init(tmp_path / "other", DOMAIN)
    with pytest.raises(CAError, match="belongs to another CA"):
        CertificateAuthority.open(other.directory, store=pg_url)


def test_an_unreachable_or_foreign_database_is_a_clear_error(tmp_path: Path, pg_cluster, pg_url: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN, store=pg_url)
    unreachable = pg_url.replace(f":{pg_cluster.port}/", ":1/")
    with pytest.raises(CAError, match="cannot open CA database postgresql://127.0.0.1:1/"):
        CertificateAuthority.open(ca.directory, store=unreachable)
    empty = pg_cluster.new_database()
    with pytest.raises(CAError, match="is not an s2sgw CA database"):
        CertificateAuthority.open(ca.directory, store=empty)
    with pytest.raises(CAError, match="must be a postgresql:// URL"):
        CertificateAuthority.open(ca.directory, store="mysql://x/y")


def test_the_listener_reconnects_and_reads_what_it_may_have_missed(tmp_path: Path, pg_url: str) -> None:
    """A change notifies the listener; a broken listening connection is reported, then replaced,
    and the listener calls back once connected again (notifications sent meanwhile are lost)."""
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN, store=pg_url)
    changes, errors = [], []
    changed = threading.Event()

    def on_change() -> None:
        changes.append(time.monotonic())
        changed.set()

    stop = ca.store.watch(on_change, errors.append)
    try:
        assert changed.wait(10)  # connected: read once
        changed.clear()
        ca.issue("orders")
        assert changed.wait(2)  # NOTIFY at commit
        changed.clear()
        with psycopg.connect(pg_url, autocommit=True) as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            )
        assert changed.wait(10)  # reconnected: read once more
        assert errors, "the broken connection was not reported"
        changed.clear()
        ca.revoke(name="orders")
        assert changed.wait(2)
    finally:
        stop()


def test_twistd_options_take_the_store_and_refuse_a_bad_one(tmp_path: Path, pg_url: str, capsys) -> None:
    from s2sgw.ca import tap

    plain = CertificateAuthority.init(tmp_path / "plain", DOMAIN)
    shared = CertificateAuthority.init(tmp_path / "shared", DOMAIN, store=pg_url)
    options = tap.Options()
    options.parseOptions(["--dir", str(shared.directory)])
    assert isinstance(options.ca.store, PgStore)  # what the directory records
    options = tap.Options()
    with pytest.raises(SystemExit):
        options.parseOptions(["--dir", str(plain.directory), "--store", pg_url])
    assert "belongs to another CA" in capsys.readouterr().err
