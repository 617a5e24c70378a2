"""From a clone to systemd: the command knows its version, and an install carries the units,
the example configuration and the docs under share/s2sgw, where the units say they are."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from s2sgw import __version__
from tests.e2e import BIN

ROOT = Path(__file__).resolve().parent.parent


def test_s2sgw_version_prints_the_version() -> None:
    result = subprocess.run([str(BIN / "s2sgw"), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"s2sgw {__version__}"


@pytest.mark.e2e
def test_the_wheel_installs_units_example_and_docs_under_share_s2sgw(tmp_path: Path) -> None:
    pytest.importorskip("wheel", reason="building a wheel needs the wheel package (a test extra)")
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "bench")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("s2sgw-*.whl")
    data = f"s2sgw-{__version__}.data/data/"
    names = {name[len(data) :] for name in zipfile.ZipFile(wheel).namelist() if name.startswith(data)}
    assert {
        "share/s2sgw/gateway.example.toml",
        "share/s2sgw/systemd/s2sgw@.service",
        "share/s2sgw/systemd/s2sgw-ca.service",
        "share/s2sgw/nginx/s2sgw-ca-cache.conf",
        "share/s2sgw/docs/replicas.rst",
        "share/s2sgw/docs/README.rst",
        "share/s2sgw/docs/operations.rst",
        "share/s2sgw/docs/configuration.rst",
    } <= names
    unit = (ROOT / "etc" / "systemd" / "s2sgw@.service").read_text()
    (documentation,) = re.findall(r"^Documentation=file:///opt/s2sgw/(\S+)$", unit, re.MULTILINE)
    assert documentation in names  # the unit's prefix is the virtualenv /opt/s2sgw
