"""The CA directory's files: read them with errors that name the file, write them all or none."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from s2sgw import files as files_module
from s2sgw.ca.building import PrivateKey
from s2sgw.ca.passphrase import Passphrase, parse_key
from s2sgw.ca.store import CAError


def write_ca_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file or none (CAError naming the file on failure)."""
    try:
        files_module.write_files(files)
    except OSError as error:
        raise CAError(f"cannot write {error.filename}: {error.strerror}") from None



def write_atomically(path: Path | str, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` in one rename (CAError on failure, no partial file)."""
    path = Path(path)
    write_ca_files([(path, data, mode)])
    return path



def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{what} {path} is missing") from None
    except OSError as error:
        raise CAError(f"cannot read {what} {path}: {error.strerror}") from None



def load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_file(path, what))
    except ValueError:
        raise CAError(f"{what} {path} is corrupt") from None



def load_key(path: Path, cert: x509.Certificate, what: str, passphrase: Passphrase | None = None) -> PrivateKey:
    """The key at ``path`` (decrypted with ``passphrase`` when it is encrypted), checked against ``cert``."""
    try:
        key = parse_key(read_file(path, what), path, what, passphrase)
    except (ValueError, TypeError):
        raise CAError(f"{what} {path} is corrupt") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CAError(f"{what} {path} has an unsupported key type")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CAError(f"{what} {path} does not match its certificate")
    return key



@contextlib.contextmanager
def undo_on_error(paths: Iterable[Path], directory: Path, created_directory: bool) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()
        if created_directory:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise



PREVIOUS = "previous"  # previous/SERIAL/: an issuing CA replaced by a newer one, kept for its leaves


@attrs.frozen
class IssuingCA:
    """An intermediate and its delegated OCSP signer, with their keys."""

    cert: x509.Certificate
    key: PrivateKey = attrs.field(repr=False)
    ocsp_cert: x509.Certificate
    ocsp_key: PrivateKey = attrs.field(repr=False)


def load_issuing_ca(
    directory: Path, names: tuple[str, str, str, str], passphrase: Passphrase | None = None
) -> IssuingCA:
    """Load ``(cert, key, ocsp cert, ocsp key)`` file names from ``directory``."""
    cert = load_cert(directory / names[0], "intermediate certificate")
    ocsp_cert = load_cert(directory / names[2], "OCSP signer certificate")
    return IssuingCA(
        cert=cert,
        key=load_key(directory / names[1], cert, "CA key", passphrase),
        ocsp_cert=ocsp_cert,
        ocsp_key=load_key(directory / names[3], ocsp_cert, "OCSP signer key", passphrase),
    )


def load_previous(
    directory: Path, names: tuple[str, str, str, str], passphrase: Passphrase | None = None
) -> tuple[IssuingCA, ...]:
    """The replaced issuing CAs still kept under ``directory/previous``, oldest first."""
    base = directory / PREVIOUS
    if not base.is_dir():
        return ()
    found = [load_issuing_ca(entry, names, passphrase) for entry in sorted(base.iterdir()) if entry.is_dir()]
    return tuple(sorted(found, key=lambda issuing: issuing.cert.not_valid_before_utc))
