"""What the CA remembers about each certificate, and what one issuance hands out."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs
from cryptography import x509

from s2sgw.ca.building import cert_pem
from s2sgw.ca.store import Row
from s2sgw.serials import serial_text


@attrs.frozen
class CertRecord:
    """What the CA knows about one issued leaf certificate."""

    serial: int
    name: str
    sans: tuple[str, ...]  # "URI:spiffe://dom/name", "DNS:name", "IP:127.0.0.1"
    not_before: datetime.datetime  # aware UTC
    not_after: datetime.datetime
    pem: bytes  # the leaf certificate alone
    revoked_at: datetime.datetime | None = None
    reason: str | None = None  # an x509.ReasonFlags value, e.g. "keyCompromise"
    revocation_seq: int | None = None  # increases with every revocation, for incremental sync
    issued_via: str = "cli"  # "cli" (s2sgw ca issue), "token" (EST simpleenroll) or "renewal"

    @property
    def serial_hex(self) -> str:
        """The serial as operators see it everywhere (``openssl x509 -serial``, audit lines)."""
        return serial_text(self.serial)

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem)

    def state(self, now: datetime.datetime) -> str:
        """``revoked`` wins over ``expired``: a revocation is news even after expiry."""
        if self.revoked_at is not None:
            return "revoked"
        if now > self.not_after:
            return "expired"
        return "good"

    @classmethod
    def _from_row(cls, row: Row) -> CertRecord:
        return cls(
            serial=row.serial,
            name=row.name,
            sans=row.sans,
            not_before=row.not_before,
            not_after=row.not_after,
            pem=row.pem,
            revoked_at=row.revoked_at,
            reason=row.reason,
            revocation_seq=row.revocation_seq,
            issued_via=row.issued_via,
        )



@attrs.frozen
class IssuedIdentity:
    """A fresh leaf: its record, the chain to present (leaf, intermediate) and its key."""

    record: CertRecord
    chain_pem: bytes
    key_pem: bytes = attrs.field(repr=False)



def san_strings(sans: Sequence[x509.GeneralName]) -> tuple[str, ...]:
    prefix = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP"}
    return tuple(f"{prefix[type(san)]}:{san.value}" for san in sans)



def row_for(
    cert: x509.Certificate, kind: str, name: str, sans: tuple[str, ...], issued_via: str = "cli"
) -> Row:
    return Row(
        serial=cert.serial_number,
        kind=kind,
        name=name,
        sans=sans,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        pem=cert_pem(cert),
        revoked_at=None,
        reason=None,
        revocation_seq=None,
        issued_via=issued_via,
    )

