"""The README's first command: `s2sgw demo` runs every step to the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("layout", [[], ["--one-process"]], ids=["process-per-side", "one-process"])
def test_demo_runs_every_step_and_cleans_up(tmp_path: Path, layout: list[str]) -> None:
    """Exit status 0, every step shown, and no gateway left running afterwards."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "s2sgw"), "demo", "--workdir", str(tmp_path), *layout],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for shown in (
        "GET /api/users/1 -> 200",
        "reason=identity_not_allowed",
        "reason=untrusted_chain",
        "0 failed",
        "reason=revoked",
        "All steps behaved as shown.",
    ):
        assert shown in result.stdout
    leftovers = subprocess.run(["pgrep", "-f", f"--logfile={tmp_path}"], capture_output=True, text=True)
    assert leftovers.stdout == ""
