"""Group commit: concurrent certificate writes share a transaction, each keeping its own outcome."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.batching import GroupCommit
from s2sgw.ca.store import SerialInUse

NOW = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def run_threads(count: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)


def test_writers_arriving_during_a_commit_share_the_next_one() -> None:
    """20 threads, each commit taking 20 ms: far fewer commits than writes, none returns early."""
    group = GroupCommit()
    batches: list[list[int]] = []
    committed: set[int] = set()
    returned_before_commit: list[int] = []

    def batch(items: Sequence[int]) -> list[BaseException | None]:
        time.sleep(0.02)  # the fsync
        batches.append(list(items))
        committed.update(items)
        return [None] * len(items)

    def write(i: int) -> None:
        group.submit(i, batch)
        if i not in committed:
            returned_before_commit.append(i)

    run_threads(20, write)

    assert sorted(i for b in batches for i in b) == list(range(20))
    assert len(batches) < 10
    assert returned_before_commit == []


def test_each_writer_gets_its_own_outcome_and_a_failed_batch_fails_only_its_writers() -> None:
    group = GroupCommit()
    calls = [0]

    def batch(items: Sequence[int]) -> list[BaseException | None]:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("disk full")
        return [ValueError(f"odd {i}") if i % 2 else None for i in items]

    with pytest.raises(OSError, match="disk full"):
        group.submit(1, batch)
    group.submit(2, batch)
    with pytest.raises(ValueError, match="odd 3"):
        group.submit(3, batch)


def test_many_threads_many_writes_never_hang() -> None:
    group = GroupCommit()
    done: list[int] = []
    lock = threading.Lock()

    def batch(items: Sequence[int]) -> list[BaseException | None]:
        return [None] * len(items)

    def write(i: int) -> None:
        for j in range(50):
            group.submit((i, j), batch)
        with lock:
            done.append(i)

    run_threads(16, write)
    assert sorted(done) == list(range(16))


def test_a_batch_records_what_it_may_and_refuses_the_rest(tmp_path: Path) -> None:
    """In one transaction: a taken serial and a refused claim leave the other rows recorded."""
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
    taken = ca.issue("first").record

    def row(name: str, serial: int) -> Any:
        from s2sgw.ca.authority import _row_for

        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        cert = ca._sign_leaf(name, key, ca.planned_sans(name), serial, NOW, NOW + datetime.timedelta(hours=1))
        return _row_for(cert, "leaf", name, ())

    def refuse(connection: Any, _: Any) -> None:
        connection.execute("UPDATE meta SET value = 999 WHERE key = 'crl_number'")
        raise PermissionError("token already used")

    outcomes = ca.store._insert_batch(
        [(row("a", 0xA1), None), (row("b", taken.serial), None), (row("c", 0xC1), refuse), (row("d", 0xD1), None)]
    )

    assert [type(o).__name__ if o else None for o in outcomes] == [None, "SerialInUse", "PermissionError", None]
    assert isinstance(outcomes[1], SerialInUse)
    assert sorted(r.name for r in ca.records()) == ["a", "d", "first"]
    assert ca.store.meta()["crl_number"] == 0  # the refused claim's write was rolled back
