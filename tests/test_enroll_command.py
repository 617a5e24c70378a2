"""`s2sgw enroll` arguments: each mistake is one line on stderr and exit 1, before anything is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from s2sgw.cli import main

FINGERPRINT = ":".join(["AB"] * 32)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["enroll", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--ca": "http://127.0.0.1:8443"}, "--ca 'http://127.0.0.1:8443': expected https://HOST:PORT"),
        ({"--fingerprint": "AB:CD"}, "--fingerprint: a SHA-256 fingerprint is 64 hex digits"),
        ({"--name": "../etc/passwd"}, "--name '../etc/passwd': expected letters"),
        ({"--token": "  "}, "the token is empty"),
        ({"--timeout": "0"}, "--timeout must be a positive number of seconds"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_1(capsys, tmp_path: Path, change: dict[str, str], expected: str) -> None:
    options = {"--ca": "https://127.0.0.1:8443", "--fingerprint": FINGERPRINT, "--token": "t", "--name": "orders",
               "--out": str(tmp_path / "out"), **change}
    code, err = run(capsys, *[item for pair in options.items() for item in pair])
    assert code == 1
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_token_file_is_named(capsys, tmp_path: Path) -> None:
    code, err = run(capsys, "--ca", "https://127.0.0.1:8443", "--fingerprint", FINGERPRINT, "--token-file",
                    str(tmp_path / "missing"), "--name", "orders", "--out", str(tmp_path / "out"))
    assert code == 1 and f"--token-file {tmp_path / 'missing'}" in err
