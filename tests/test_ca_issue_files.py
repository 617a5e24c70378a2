"""``s2sgw ca issue`` over files that are there already, new files' owner and mode, long names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from s2sgw import cli
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.config import ConfigError, load_config

DOMAIN = "example.internal"


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca", DOMAIN)
    return tmp_path / "ca"


def test_issuing_a_name_again_says_it_replaced_the_certificate_and_keeps_the_files_owner_and_mode(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", out) == 0
    first = capsys.readouterr().out
    assert "replaced" not in first
    key, pem = out / "web.key", out / "web.pem"
    key.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(key, 4321, 8765)
        os.chown(pem, 4321, 8765)
    old_serial = first.split("serial ")[1].split()[0]
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", out) == 0
    second = capsys.readouterr().out
    assert f"replaced web's earlier certificate(s) {old_serial}" in second
    assert f"replaced {pem} and {key}, keeping their owner, group and mode" in second
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert (key.stat().st_uid, key.stat().st_gid) == (4321, 8765)
        assert (pem.stat().st_uid, pem.stat().st_gid) == (4321, 8765)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_new_files_take_owner_group_and_mode(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", out, "--owner", "4321", "--group", "8765",
               "--mode", "0640") == 0  # fmt: skip
    key, pem = out / "web.key", out / "web.pem"
    assert (key.stat().st_uid, key.stat().st_gid, stat.S_IMODE(key.stat().st_mode)) == (4321, 8765, 0o640)
    assert (pem.stat().st_uid, pem.stat().st_gid, stat.S_IMODE(pem.stat().st_mode)) == (4321, 8765, 0o644)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--mode", "0644"), "must not be open to others"),
        (("--mode", "rw"), "not an octal mode"),
        (("--mode", "0040"), "owner must be able to read"),
        (("--owner", "no-such-user-here"), "no such user"),
        (("--group", "no-such-group-here"), "no such group"),
    ],
)
def test_bad_ownership_flags_are_refused_before_anything_is_issued(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, str], message: str
) -> None:
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out", *flags) == 1
    assert message in capsys.readouterr().err
    assert CertificateAuthority.open(ca_dir).records() == []


def test_a_name_over_63_characters_gets_its_own_message_in_the_ca_and_in_the_gateway(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    longest, too_long = "a" * 63, "a" * 64
    assert run("ca", "issue", "--dir", ca_dir, longest, "--out", tmp_path / "out") == 0
    capsys.readouterr()
    assert run("ca", "issue", "--dir", ca_dir, too_long, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "is 64 characters long; a service name has at most 63" in err and len(err.splitlines()) == 1
    for name, ok in ((longest, True), (too_long, False)):
        config = tmp_path / f"{len(name)}.toml"
        config.write_text(
            f'trust = "{ca_dir / "bundle.pem"}"\n[status]\nmode = "off"\n'
            f'[[service]]\nname = "{name}"\ncert = "{tmp_path / "out" / (longest + ".pem")}"\n'
            f'key = "{tmp_path / "out" / (longest + ".key")}"\n'
        )
        if ok:
            load_config(config)
        else:
            with pytest.raises(ConfigError, match="64 characters long; a service name has at most 63"):
                load_config(config)
