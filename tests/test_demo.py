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
        "enrolled spiffe://demo.s2sgw.test/users",
        "enrolled spiffe://demo.s2sgw.test/orders",
        " renewals; ",
        "All steps behaved as shown.",
    ):
        assert shown in result.stdout
    leftovers = subprocess.run(["pgrep", "-f", f"--logfile={tmp_path}"], capture_output=True, text=True)
    assert leftovers.stdout == ""


def test_demo_interrupted_with_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    """SIGINT in the middle of the demo: non-zero exit and no twistd process left behind."""
    import signal
    import time

    demo = subprocess.Popen(
        [str(Path(sys.executable).parent / "s2sgw"), "demo", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a test run started in the background inherits SIGINT ignored,
        # and Twisted then leaves Ctrl-C alone.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in demo.stdout:
            if "gateways running" in line:
                break
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftovers = subprocess.run(["pgrep", "-f", f"--logfile={tmp_path}"], capture_output=True, text=True)
        if leftovers.stdout == "":
            break
        time.sleep(0.1)
    assert leftovers.stdout == ""
