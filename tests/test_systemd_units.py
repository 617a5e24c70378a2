"""The shipped systemd units pass `systemd-analyze verify` and reload with SIGHUP."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "etc" / "systemd"


@pytest.mark.parametrize(("unit", "name"), [("s2sgw@.service", "s2sgw@orders.service"), ("s2sgw-ca.service", "s2sgw-ca.service")])
def test_unit_verifies(tmp_path: Path, unit: str, name: str) -> None:
    """With the install prefix pointed at this virtualenv, systemd finds nothing to complain about."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (UNITS / unit).read_text().replace("/opt/s2sgw/bin", str(Path(sys.executable).parent))
    (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if name.split("@")[0] in line or "s2sgw" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_gateway_unit_reloads_with_sighup_and_has_no_capabilities() -> None:
    text = (UNITS / "s2sgw@.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "twistd --nodaemon --pidfile= s2sgw --config /etc/s2sgw/%i.toml" in text
    assert "\nCapabilityBoundingSet=\n" in text
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert hardening in text


def test_gateway_unit_waits_for_the_gateways_own_readiness_notification() -> None:
    """Type=notify: systemd counts the gateway started only after READY=1 (listeners bound)."""
    text = (UNITS / "s2sgw@.service").read_text()
    assert "\nType=notify\n" in text
    assert "\nNotifyAccess=main\n" in text
    assert "--nodaemon" in text  # twistd itself is the main process that notifies


def test_ca_unit_takes_the_key_passphrase_as_a_systemd_credential() -> None:
    """The passphrase comes from LoadCredential= (the name the server reads), never the command line."""
    from s2sgw.ca.passphrase import CREDENTIAL

    text = (UNITS / "s2sgw-ca.service").read_text()
    assert f"\nLoadCredential={CREDENTIAL}:/etc/s2sgw/ca-passphrase\n" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert "passphrase" not in exec_start


@pytest.mark.parametrize("unit", ["s2sgw@.service", "s2sgw-ca.service"])
def test_units_give_room_for_many_connections(unit: str) -> None:
    """Not systemd's default soft limit of 1,024 descriptors: the gateway raises its soft limit to this."""
    assert "\nLimitNOFILE=65536\n" in (UNITS / unit).read_text()
