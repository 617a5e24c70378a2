"""The passphrase of the CA's keys at rest: read from a file or a systemd credential, never argv.

Keys are PKCS#8 encrypted with ``BestAvailableEncryption`` when a passphrase is given. It comes
from ``--passphrase-file FILE`` or, when that is not given, from the systemd credential
``s2sgw-ca-passphrase`` (``LoadCredential=s2sgw-ca-passphrase:/etc/s2sgw/ca-passphrase`` in the
unit; systemd exposes it as ``$CREDENTIALS_DIRECTORY/s2sgw-ca-passphrase``). Without either the
keys are written in the clear (tests, the demo) and ``s2sgw ca init`` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization

from s2sgw.ca.building import PrivateKey
from s2sgw.ca.store import CAError

CREDENTIAL = "s2sgw-ca-passphrase"
MAX_PASSPHRASE = 1024


@attrs.frozen
class Passphrase:
    value: bytes = attrs.field(repr=False)
    source: str  # where it came from, for messages: a path, never the passphrase

    def __str__(self) -> str:
        return self.source


def read_passphrase(path: Path | str | None, environ: dict[str, str] | None = None) -> Passphrase | None:
    """The passphrase from ``path``, else from ``$CREDENTIALS_DIRECTORY/s2sgw-ca-passphrase``,
    else None. One trailing newline is not part of it; an empty one is refused."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if path is None:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory or not (Path(directory) / CREDENTIAL).is_file():
            return None
        path = Path(directory) / CREDENTIAL
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CAError(f"cannot read the passphrase file {path}: {error.strerror}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise CAError(f"the passphrase file {path} is empty")
    if len(data) > MAX_PASSPHRASE:
        raise CAError(f"the passphrase in {path} is longer than {MAX_PASSPHRASE} bytes")
    return Passphrase(data, str(path))


def encrypted_pem(key: PrivateKey, passphrase: Passphrase | None) -> bytes:
    """PKCS#8 PEM, encrypted when there is a passphrase."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption() if passphrase is None else serialization.BestAvailableEncryption(passphrase.value)
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def is_encrypted(pem: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem


def parse_key(pem: bytes, path: Path, what: str, passphrase: Passphrase | None) -> object:
    """Load a PEM key, decrypting it when it is encrypted; CAError with one clear reason."""
    if not is_encrypted(pem):
        return serialization.load_pem_private_key(pem, password=None)
    if passphrase is None:
        raise CAError(
            f"{what} {path} is encrypted; give its passphrase with --passphrase-file FILE "
            f"or the systemd credential {CREDENTIAL}"
        )
    try:
        return serialization.load_pem_private_key(pem, password=passphrase.value)
    except (ValueError, TypeError):
        raise CAError(f"{what} {path} does not open with the passphrase from {passphrase.source} (wrong passphrase?)") from None
