"""Atomic file replacement: all or nothing, and a replaced file keeps its owner, group and mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s2sgw.files import write_atomically, write_files


def test_new_files_get_the_mode_asked_for(tmp_path: Path) -> None:
    write_files([(tmp_path / "a.key", b"key", 0o600), (tmp_path / "a.pem", b"cert", 0o644)], keep_owner=True)
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o644


def test_a_replaced_file_keeps_its_mode_and_not_the_default(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    key.write_bytes(b"old")
    key.chmod(0o640)
    write_files([(key, b"new", 0o600)], keep_owner=True)
    assert key.read_bytes() == b"new"
    assert key.stat().st_mode & 0o777 == 0o640


def test_without_keep_owner_the_mode_asked_for_wins(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    key.write_bytes(b"old")
    key.chmod(0o640)
    write_atomically(key, b"new", 0o600)
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_replaced_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    key, cert = tmp_path / "a.key", tmp_path / "a.pem"
    for path in (key, cert):
        path.write_bytes(b"old")
    os.chown(key, 4321, 8765)
    os.chown(cert, 4321, 8765)
    key.chmod(0o640)
    cert.chmod(0o644)
    write_files([(key, b"new key", 0o600), (cert, b"new cert", 0o644)], keep_owner=True)
    for path, mode in ((key, 0o640), (cert, 0o644)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4321, 8765, mode)
    assert key.read_bytes() == b"new key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pem"]  # no temporaries left


def test_a_failed_write_leaves_every_file_as_it_was(tmp_path: Path) -> None:
    old = tmp_path / "a.pem"
    old.write_bytes(b"old")
    with pytest.raises(OSError) as raised:
        write_files([(old, b"new", 0o644), (tmp_path / "missing" / "b.key", b"key", 0o600)], keep_owner=True)
    assert raised.value.filename == str(tmp_path / "missing" / "b.key")
    assert old.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pem"]


def test_stale_temporaries_of_ours_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A write killed between creating its temporary and renaming it leaves ``.NAME.<hex>.tmp``
    (maybe a private key): removed once older than a write takes, others' files never touched."""
    from s2sgw.files import remove_stale_temps

    stale_key = tmp_path / ".users.key.0123456789ab.tmp"
    stale_pem = tmp_path / ".users.pem.ba9876543210.tmp"
    fresh = tmp_path / ".users.key.fedcba987654.tmp"  # a write in progress
    other_name = tmp_path / ".orders.key.0123456789ab.tmp"
    not_ours = [tmp_path / ".users.key.tmp", tmp_path / "users.key.0123456789ab.tmp", tmp_path / ".x.ZZZZZZZZZZZZ.tmp"]
    for path in (stale_key, stale_pem, fresh, other_name, *not_ours):
        path.write_bytes(b"secret")
    now = 1_000_000.0
    for path in (stale_key, stale_pem, other_name, *not_ours):
        os.utime(path, (now - 120, now - 120))
    os.utime(fresh, (now - 5, now - 5))
    assert sorted(remove_stale_temps(tmp_path, ("users.key", "users.pem"), now=now)) == sorted([stale_key, stale_pem])
    assert other_name.exists() and fresh.exists() and all(path.exists() for path in not_ours)
    assert remove_stale_temps(tmp_path, now=now) == [other_name]
    assert fresh.exists()
