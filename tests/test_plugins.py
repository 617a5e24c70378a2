"""The twistd plugins are installed and list their real options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("plugin", "option"),
    [("s2sgw", "--config"), ("s2sgw-ca", "--listen")],
)
def test_twistd_plugin_help_lists_options(plugin: str, option: str) -> None:
    """`twistd PLUGIN --help` is found from the installed package and names its options."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), plugin, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert option in result.stdout
