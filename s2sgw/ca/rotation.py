"""The work that needs the offline root: a new issuing CA, the root's CRL; and retiring the old one.

The root's key is read from a file the operator names (``--root-key``), used and dropped; it is
never written into the CA directory. A replaced issuing CA moves to ``previous/SERIAL/`` and
the online CA keeps answering for its leaves until ``s2sgw ca intermediate --retire``.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from s2sgw.ca.building import PrivateKey, cert_pem, hash_for, subject_key_id
from s2sgw.ca.cafiles import PREVIOUS, load_key, undo_on_error, write_ca_files
from s2sgw.ca.ceremony import (
    ISSUING_FILES,
    ROOT_CRL,
    inside,
    make_intermediate,
    make_ocsp_signer,
)
from s2sgw.ca.passphrase import Passphrase
from s2sgw.ca.records import row_for
from s2sgw.ca.store import INTERMEDIATE, LEAF, OCSP_SIGNER, CAError, serial_hex
from s2sgw.serials import serial_text

if TYPE_CHECKING:
    from s2sgw.ca.authority import CertificateAuthority

ROOT_CRL_HOURS = 24.0 * 30  # the root is offline: its CRL is signed at a ceremony, for weeks
MAX_ROOT_CRL_HOURS = 24.0 * 400


def load_root_key(ca: CertificateAuthority, path: Path, passphrase: Passphrase | None = None) -> PrivateKey:
    """The root's key from ``path`` (outside the CA directory), checked against ``root.pem``."""
    path = Path(path)
    if inside(path, ca.directory):
        raise CAError(f"the root key must be kept outside the CA directory, not at {path}")
    return load_key(path, ca.root_cert, "root key", passphrase)


def new_intermediate(
    ca: CertificateAuthority,
    root_key: PrivateKey,
    *,
    now: datetime.datetime,
) -> x509.Certificate:
    """Make a new issuing CA and OCSP signer; the current pair moves to ``previous/SERIAL/``.

    Both stay valid: leaves of the old one keep their status answers until it is retired.
    """
    old = ca.issuing
    key, cert = make_intermediate(ca.trust_domain, ca.root_cert, root_key, ca.key_type, now, first=False)
    ocsp_key, ocsp_cert = make_ocsp_signer(ca.trust_domain, cert, key, ca.key_type, now)
    kept = ca.directory / PREVIOUS / serial_hex(old.cert.serial_number)
    created = not kept.exists()
    try:
        kept.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise CAError(f"cannot create {kept}: {error.strerror}") from None
    with undo_on_error([kept / name for name in ISSUING_FILES], kept, created):
        copies = [(kept / name, (ca.directory / name).read_bytes(), 0o600 if name.endswith(".key") else 0o644)
                  for name in ISSUING_FILES]
        write_ca_files(copies)
    ca.store.insert(row_for(cert, INTERMEDIATE, "intermediate", ()))
    ca.store.insert(row_for(ocsp_cert, OCSP_SIGNER, "ocsp-signer", ()))
    write_ca_files(
        [
            (ca.directory / ISSUING_FILES[1], ca.key_bytes(key), 0o600),
            (ca.directory / ISSUING_FILES[3], ca.key_bytes(ocsp_key), 0o600),
            (ca.directory / ISSUING_FILES[0], cert_pem(cert), 0o644),
            (ca.directory / ISSUING_FILES[2], cert_pem(ocsp_cert), 0o644),
        ]
    )
    return cert


def live_leaves_of(ca: CertificateAuthority, issuer: x509.Certificate, now: datetime.datetime) -> int:
    """How many unexpired, unrevoked leaves ``issuer`` signed."""
    count = 0
    for row in ca.store.rows(LEAF):
        if row.revoked_at is None and row.not_after > now:
            if x509.load_pem_x509_certificate(row.pem).issuer == issuer.subject:
                count += 1
    return count


def retire_intermediate(
    ca: CertificateAuthority, serial: int, *, now: datetime.datetime, force: bool = False
) -> x509.Certificate:
    """Forget a previous issuing CA (its keys are deleted): its leaves get no more answers."""
    found = next((p for p in ca.previous if p.cert.serial_number == serial), None)
    if found is None:
        if ca.intermediate_cert.serial_number == serial:
            raise CAError(f"{serial_text(serial)} is the current issuing CA; make a new one first")
        raise CAError(f"no previous issuing CA with serial {serial_text(serial)} in {ca.directory / PREVIOUS}")
    live = live_leaves_of(ca, found.cert, now)
    if live and not force:
        raise CAError(
            f"issuing CA {serial_text(serial)} still has {live} unexpired leaves; wait until they are renewed "
            "(or give --force)"
        )
    shutil.rmtree(ca.directory / PREVIOUS / serial_hex(serial))
    return found.cert


def sign_root_crl(
    ca: CertificateAuthority,
    root_key: PrivateKey,
    *,
    revoke: Sequence[int] = (),
    reason: str = "unspecified",
    hours: float = ROOT_CRL_HOURS,
    now: datetime.datetime,
) -> x509.CertificateRevocationList:
    """Revoke the issuing CAs ``revoke`` and sign the root's CRL, written to ``root.crl``.

    Its number comes from the CA's one CRL number sequence. The current issuing CA cannot be
    revoked: make a new one first, or the online CA would go on signing with a revoked key.
    """
    if not 0 < hours <= MAX_ROOT_CRL_HOURS:
        raise CAError(f"the root CRL lifetime must be more than 0 and at most {MAX_ROOT_CRL_HOURS:g} hours")
    known = {issuing.cert.serial_number: issuing.cert for issuing in ca.issuers}
    for serial in revoke:
        if serial == ca.intermediate_cert.serial_number:
            raise CAError(
                f"{serial_text(serial)} is the current issuing CA; make a new one (s2sgw ca intermediate) "
                "before revoking it"
            )
        if ca.store.get(serial, INTERMEDIATE) is None and serial in known:
            ca.store.insert(row_for(known[serial], INTERMEDIATE, "intermediate", ()))
    for serial in revoke:
        ca.store.revoke_intermediate(serial, reason=reason, revoked_at=now)
    number, _ = ca.store.next_crl_number()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.root_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(hours=hours))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id(ca.root_cert)),
            critical=False,
        )
    )
    for row in ca.store.rows(INTERMEDIATE):
        if row.revoked_at is None:
            continue
        entry = x509.RevokedCertificateBuilder().serial_number(row.serial).revocation_date(row.revoked_at)
        if row.reason and row.reason != x509.ReasonFlags.unspecified.value:
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(row.reason)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(root_key, hash_for(root_key))
    write_ca_files([(ca.directory / ROOT_CRL, crl.public_bytes(serialization.Encoding.DER), 0o644)])
    return crl
