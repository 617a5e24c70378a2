"""The key-file rule the docs and the unit state: others never, the group only when it is the gateway's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s2sgw.pki import key_file_problem, own_groups


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "orders.key"
    path.write_text("placeholder\n")
    return path


def test_a_key_readable_by_the_gateways_own_group_is_fine(key: Path) -> None:
    """root:s2sgw 0640 for a gateway running as s2sgw."""
    key.chmod(0o640)
    assert key_file_problem(key, frozenset({key.stat().st_gid})) is None


def test_a_key_only_its_owner_reads_is_fine(key: Path) -> None:
    key.chmod(0o600)
    assert key_file_problem(key, frozenset({key.stat().st_gid + 1})) is None


def test_a_key_readable_by_another_group_is_reported(key: Path) -> None:
    key.chmod(0o640)
    problem = key_file_problem(key, frozenset({key.stat().st_gid + 1}))
    assert problem is not None and "not the gateway's" in problem and "0640" in problem


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o666])
def test_a_key_others_may_read_is_reported_whatever_its_group(key: Path, mode: int) -> None:
    key.chmod(mode)
    problem = key_file_problem(key, frozenset({key.stat().st_gid}))
    assert problem is not None and "accessible by others" in problem


def test_the_gateways_groups_are_those_of_the_user_it_runs_as() -> None:
    assert os.getegid() in own_groups()
