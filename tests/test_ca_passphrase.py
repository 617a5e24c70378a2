"""CA keys encrypted at rest: the passphrase from a file or a systemd credential, never argv."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from s2sgw import cli
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.passphrase import CREDENTIAL, read_passphrase
from tests.e2e import BIN, Processes, free_port

DOMAIN = "example.internal"
SECRET = b"correct horse battery staple"


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture
def encrypted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, Path]:
    """An encrypted CA with an offline root: (CA directory, root key, passphrase file)."""
    secret = tmp_path / "passphrase"
    secret.write_bytes(SECRET + b"\n")
    ca_dir, root_key = tmp_path / "ca", tmp_path / "root.key"
    assert run("ca", "init", "--dir", ca_dir, "--trust-domain", DOMAIN, "--root-key-out", root_key,
               "--passphrase-file", secret) == 0  # fmt: skip
    assert f"keys are encrypted with the passphrase from {secret}" in capsys.readouterr().out
    return ca_dir, root_key, secret


def _key_files(ca_dir: Path, root_key: Path) -> list[Path]:
    return [root_key, *(p for p in ca_dir.rglob("*.key"))]


def test_no_key_file_parses_without_the_passphrase(encrypted: tuple[Path, Path, Path]) -> None:
    ca_dir, root_key, secret = encrypted
    assert run("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key, "--passphrase-file", secret) == 0
    keys = _key_files(ca_dir, root_key)
    assert len(keys) == 5  # root, intermediate and OCSP signer, and the previous pair
    for path in keys:
        data = path.read_bytes()
        assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"), path
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(data, password=None)
        with pytest.raises(ValueError):
            serialization.load_pem_private_key(data, password=b"wrong")
        serialization.load_pem_private_key(data, password=SECRET)  # the trailing newline is not part of it


def test_commands_need_the_passphrase_and_say_so_in_one_line(
    encrypted: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, _, secret = encrypted
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is encrypted; give its passphrase" in err
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out", "--passphrase-file", wrong) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "wrong passphrase" in err and "nope" not in err
    for args in (("issue", "web", "--out", tmp_path / "out"), ("revoke", "web"), ("crl", "--out", tmp_path / "c")):
        assert run("ca", *args, "--dir", ca_dir, "--passphrase-file", secret) == 0, args


def test_the_systemd_credential_is_read_from_credentials_directory(
    encrypted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ca_dir, _, secret = encrypted
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_bytes(secret.read_bytes())
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    result = subprocess.run(
        [sys.executable, "-m", "s2sgw.cli", "ca", "issue", "--dir", str(ca_dir), "web", "--out", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_passphrase(None, {"CREDENTIALS_DIRECTORY": str(credentials)}).value == SECRET


def test_init_without_a_passphrase_says_the_keys_are_not_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("ca", "init", "--dir", tmp_path / "ca", "--trust-domain", DOMAIN) == 0
    assert "keys are NOT encrypted" in capsys.readouterr().out
    serialization.load_pem_private_key((tmp_path / "ca" / "intermediate.key").read_bytes(), None)


def test_an_empty_passphrase_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert run("ca", "init", "--dir", tmp_path / "ca", "--trust-domain", DOMAIN, "--passphrase-file", empty) == 1
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


# -- the server ------------------------------------------------------------------------------


def _start(processes: Processes, name: str, ca_dir: Path, *extra: str, env: dict[str, str] | None = None) -> int:
    port = free_port()
    argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={processes.directory / (name + '.log')}",
            "s2sgw-ca", "--dir", str(ca_dir), "--listen", f"tcp:{port}:interface=127.0.0.1", *extra]  # fmt: skip
    out = open(processes.directory / f"{name}.out", "wb")
    processes.running[name] = subprocess.Popen(
        argv, cwd=processes.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
    )
    return port


def _healthy(port: int) -> bool:
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                             f"http://127.0.0.1:{port}/healthz"], capture_output=True, text=True)  # fmt: skip
    return result.stdout == "200"


def _wait_healthy(processes: Processes, name: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _healthy(port):
            return
        assert processes.running[name].poll() is None, processes.output(name)
        time.sleep(0.1)
    raise AssertionError(processes.output(name))


def test_server_starts_with_the_passphrase_from_a_file_and_from_the_credential(
    encrypted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ca_dir, _, secret = encrypted
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_bytes(secret.read_bytes())
    processes = Processes(tmp_path)
    try:
        by_file = _start(processes, "by-file", ca_dir, "--passphrase-file", str(secret))
        by_credential = _start(
            processes, "by-credential", ca_dir, env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
        )
        _wait_healthy(processes, "by-file", by_file)
        _wait_healthy(processes, "by-credential", by_credential)
    finally:
        processes.stop_all()
    for name in ("by-file", "by-credential"):
        assert "Traceback" not in processes.output(name)


def test_server_refuses_a_wrong_passphrase_with_one_line(encrypted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ca_dir, _, _ = encrypted
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    for extra in (("--passphrase-file", str(wrong)), ()):
        result = subprocess.run(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "s2sgw-ca", "--dir", str(ca_dir), *extra],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
        )  # fmt: skip
        assert result.returncode == 1, result
        lines = (result.stdout + result.stderr).splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("s2sgw-ca: cannot start:")
        assert ("wrong passphrase" if extra else "is encrypted") in lines[0]
        assert "not it" not in lines[0]


def test_an_encrypted_ca_writes_its_new_keys_encrypted(encrypted: tuple[Path, Path, Path]) -> None:
    ca_dir, _, secret = encrypted
    ca = CertificateAuthority.open(ca_dir, read_passphrase(secret))
    assert ca.key_bytes(ca.ocsp_key).startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
