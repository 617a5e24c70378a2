"""Creating a CA directory: the keys and certificates of a new trust domain."""

from __future__ import annotations

import datetime
import os
import secrets
import sqlite3
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from s2sgw import files as files_module
from s2sgw.ca.building import (
    PrivateKey,
    ca_builder,
    cert_pem,
    generate_key,
    hash_for,
    key_usage,
    random_serial,
    subject_key_id,
    subject_name,
)
from s2sgw.ca.cafiles import undo_on_error, write_ca_files
from s2sgw.ca.passphrase import Passphrase, encrypted_pem
from s2sgw.ca.records import row_for
from s2sgw.ca.store import INTERMEDIATE, OCSP_SIGNER, CAError, CAStore, StoreError

ROOT_LIFETIME = datetime.timedelta(days=3650)
INTERMEDIATE_LIFETIME = datetime.timedelta(days=1825)
OCSP_LIFETIME = datetime.timedelta(days=7)  # short: it carries ocsp-nocheck and cannot be revoked
BACKDATE = datetime.timedelta(minutes=5)  # tolerate peers whose clocks run a little slow
MAX_CRL_HOURS = 24.0


ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
OCSP_CERT, OCSP_KEY = "ocsp.pem", "ocsp.key"
BUNDLE, DATABASE = "bundle.pem", "ca.db"
ISSUING_FILES = (INTERMEDIATE_CERT, INTERMEDIATE_KEY, OCSP_CERT, OCSP_KEY)
ROOT_CRL = "root.crl"  # the root's CRL as `s2sgw ca crl --root` last signed it; the server publishes it
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, OCSP_CERT, OCSP_KEY, BUNDLE, DATABASE)


def inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` would land under ``directory`` (symbolic links resolved)."""
    target, base = path.resolve(), directory.resolve()
    return target == base or base in target.parents


def make_intermediate(
    trust_domain: str,
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    key_type: str,
    now: datetime.datetime,
    *,
    first: bool = True,
) -> tuple[PrivateKey, x509.Certificate]:
    """A new issuing CA signed by the root. Later ones carry a part of their serial in their
    name: a gateway holds one CRL per issuer name, so old and new must not share one."""
    key = generate_key(key_type)
    serial = random_serial()
    name = f"{trust_domain} issuing CA" if first else f"{trust_domain} issuing CA {format(serial, 'x')[:12]}"
    cert = ca_builder(name, key, serial, now - BACKDATE, INTERMEDIATE_LIFETIME, root_cert, 0).sign(
        root_key, hash_for(root_key)
    )
    return key, cert


def make_ocsp_signer(
    trust_domain: str,
    intermediate_cert: x509.Certificate,
    intermediate_key: PrivateKey,
    key_type: str,
    now: datetime.datetime,
    lifetime: datetime.timedelta = OCSP_LIFETIME,
) -> tuple[PrivateKey, x509.Certificate]:
    """A delegated OCSP signer of ``intermediate_cert``: ``id-pkix-ocsp-nocheck``, so its
    lifetime is its only limit (RFC 6960 4.2.2.2.1)."""
    key = generate_key(key_type)
    not_before = now - min(BACKDATE, lifetime / 10)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject_name(f"{trust_domain} OCSP signer"))
        .issuer_name(intermediate_cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id(intermediate_cert)),
            critical=False,
        )
        .sign(intermediate_key, hash_for(intermediate_key))
    )
    return key, cert


def create_ca_files(
    directory: Path,
    trust_domain: str,
    key_type: str,
    url: str | None,
    now: datetime.datetime,
    *,
    root_key_out: Path | None = None,
    passphrase: Passphrase | None = None,
) -> None:
    """Make root, intermediate and OCSP signer and write them with a new store, all or nothing.

    With ``root_key_out`` the root's key is written there and nowhere under ``directory``.
    With ``passphrase`` every key is PKCS#8-encrypted with it.
    The store is renamed into place last: its presence marks a complete CA directory.
    """
    root_key = generate_key(key_type)
    root_cert = ca_builder(
        f"{trust_domain} root CA", root_key, random_serial(), now - BACKDATE, ROOT_LIFETIME, None, 1
    ).sign(root_key, hash_for(root_key))
    intermediate_key, intermediate_cert = make_intermediate(trust_domain, root_cert, root_key, key_type, now)
    ocsp_key, ocsp_cert = make_ocsp_signer(trust_domain, intermediate_cert, intermediate_key, key_type, now)

    created_directory = False
    try:
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o755)
            created_directory = True
    except OSError as error:
        raise CAError(f"cannot create {directory}: {error.strerror}") from None

    database = directory / DATABASE
    temp_db = directory / f".{DATABASE}.{secrets.token_hex(6)}.tmp"
    root_key_path = directory / ROOT_KEY if root_key_out is None else root_key_out
    written = [directory / name for name in CA_FILES if name not in (DATABASE, ROOT_KEY)] + [root_key_path]
    with undo_on_error([temp_db, *written], directory, created_directory):
        try:
            store = CAStore.create(
                temp_db, {"trust_domain": trust_domain, "url": url, "key_type": key_type}
            )
            store.insert(row_for(intermediate_cert, INTERMEDIATE, "intermediate", ()))
            store.insert(row_for(ocsp_cert, OCSP_SIGNER, "ocsp-signer", ()))
        except (OSError, sqlite3.Error, StoreError) as error:  # not writable, disk full
            raise CAError(f"cannot create the CA database in {directory}: {error}") from None
        write_ca_files(
            [
                (root_key_path, encrypted_pem(root_key, passphrase), 0o600),
                (directory / INTERMEDIATE_KEY, encrypted_pem(intermediate_key, passphrase), 0o600),
                (directory / OCSP_KEY, encrypted_pem(ocsp_key, passphrase), 0o600),
                (directory / ROOT_CERT, cert_pem(root_cert), 0o644),
                (directory / INTERMEDIATE_CERT, cert_pem(intermediate_cert), 0o644),
                (directory / OCSP_CERT, cert_pem(ocsp_cert), 0o644),
                (directory / BUNDLE, cert_pem(root_cert), 0o644),
            ]
        )
        try:
            os.chmod(temp_db, 0o600)
            os.replace(temp_db, database)  # last: its presence marks a complete CA
        except OSError as error:
            raise CAError(f"cannot write {database}: {error.strerror}") from None
        files_module.fsync_directory(directory)
