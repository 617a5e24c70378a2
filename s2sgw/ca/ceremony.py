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
    ca_builder,
    cert_pem,
    generate_key,
    hash_for,
    key_pem,
    key_usage,
    random_serial,
    subject_key_id,
    subject_name,
)
from s2sgw.ca.cafiles import undo_on_error, write_ca_files
from s2sgw.ca.records import row_for
from s2sgw.ca.store import OCSP_SIGNER, CAError, CAStore, StoreError
from s2sgw.ca.stores import STORE_FILE, create_pg_store

ROOT_LIFETIME = datetime.timedelta(days=3650)
INTERMEDIATE_LIFETIME = datetime.timedelta(days=1825)
OCSP_LIFETIME = datetime.timedelta(days=365)
BACKDATE = datetime.timedelta(minutes=5)  # tolerate peers whose clocks run a little slow
MAX_CRL_HOURS = 24.0


ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
OCSP_CERT, OCSP_KEY = "ocsp.pem", "ocsp.key"
BUNDLE, DATABASE = "bundle.pem", "ca.db"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, OCSP_CERT, OCSP_KEY, BUNDLE, DATABASE)


def create_ca_files(
    directory: Path, trust_domain: str, key_type: str, url: str | None, now: datetime.datetime,
    *, store_url: str | None = None,
) -> None:
    """Make root, intermediate and OCSP signer and write them with a new store, all or nothing.

    The store is renamed into place last: its presence marks a complete CA directory. With
    ``store_url`` the state goes to that (empty) PostgreSQL database and ``store.url`` comes last.
    """
    not_before = now - BACKDATE
    root_key, intermediate_key, ocsp_key = (generate_key(key_type) for _ in range(3))
    root_cert = ca_builder(
        f"{trust_domain} root CA", root_key, random_serial(), not_before, ROOT_LIFETIME, None, 1
    ).sign(root_key, hash_for(root_key))
    intermediate_cert = ca_builder(
        f"{trust_domain} issuing CA",
        intermediate_key,
        random_serial(),
        not_before,
        INTERMEDIATE_LIFETIME,
        root_cert,
        0,
    ).sign(root_key, hash_for(root_key))
    ocsp_cert = (
        x509.CertificateBuilder()
        .subject_name(subject_name(f"{trust_domain} OCSP signer"))
        .issuer_name(intermediate_cert.subject)
        .public_key(ocsp_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + OCSP_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ocsp_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id(intermediate_cert)),
            critical=False,
        )
        .sign(intermediate_key, hash_for(intermediate_key))
    )

    created_directory = False
    try:
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o755)
            created_directory = True
    except OSError as error:
        raise CAError(f"cannot create {directory}: {error.strerror}") from None

    material = [
        (directory / ROOT_KEY, key_pem(root_key), 0o600),
        (directory / INTERMEDIATE_KEY, key_pem(intermediate_key), 0o600),
        (directory / OCSP_KEY, key_pem(ocsp_key), 0o600),
        (directory / ROOT_CERT, cert_pem(root_cert), 0o644),
        (directory / INTERMEDIATE_CERT, cert_pem(intermediate_cert), 0o644),
        (directory / OCSP_CERT, cert_pem(ocsp_cert), 0o644),
        (directory / BUNDLE, cert_pem(root_cert), 0o644),
    ]
    meta = {"trust_domain": trust_domain, "url": url, "key_type": key_type}
    signer_row = row_for(ocsp_cert, OCSP_SIGNER, "ocsp-signer", ())
    written = [path for path, _, _ in material]
    if store_url is not None:
        with undo_on_error(written, directory, created_directory):
            write_ca_files(material)
            create_pg_store(store_url, meta, intermediate_cert, [signer_row])
            write_ca_files([(directory / STORE_FILE, store_url.encode("utf-8") + b"\n", 0o600)])  # last
        return
    database = directory / DATABASE
    temp_db = directory / f".{DATABASE}.{secrets.token_hex(6)}.tmp"
    with undo_on_error([temp_db, *written], directory, created_directory):
        try:
            store = CAStore.create(temp_db, meta)
            store.insert(signer_row)
        except (OSError, sqlite3.Error, StoreError) as error:  # not writable, disk full
            raise CAError(f"cannot create the CA database in {directory}: {error}") from None
        write_ca_files(material)
        try:
            os.chmod(temp_db, 0o600)
            os.replace(temp_db, database)  # last: its presence marks a complete CA
        except OSError as error:
            raise CAError(f"cannot write {database}: {error.strerror}") from None
        files_module.fsync_directory(directory)
