"""The certificate authority as a library: init, issue, revoke, CRLs, status look-ups.

The ``s2sgw ca`` commands, the status server and the demo all drive this one class. It is
synchronous (key generation, files, the store): on a reactor, call it through ``deferToThread``.
An instance holds only immutable material and opens a new database connection per call,
so one instance may be shared by threads.

A CA directory holds ``root.pem`` (and ``root.key`` unless ``init`` wrote the root's key
elsewhere: it belongs offline), ``intermediate.pem intermediate.key`` (the issuing CA),
``ocsp.pem ocsp.key`` (the delegated OCSP signer), ``bundle.pem`` (the trust bundle: the root),
``ca.db``, and while an issuing CA is being replaced ``previous/SERIAL/``. ``ca.db`` appears
last, so a directory with it is a complete CA. A directory whose state is in PostgreSQL holds
``store.url`` in its place (:mod:`s2sgw.ca.stores`). Keys may be encrypted (:mod:`s2sgw.ca.passphrase`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.logger import Logger

from s2sgw.ca.building import (
    CertificatePublicKey,
    PrivateKey,
    cert_pem,
    generate_key,
    hash_for,
    key_pem,
    leaf_builder,
    random_serial,
    subject_key_id,
)
from s2sgw.ca.cafiles import (
    IssuingCA,
    load_cert,
    load_key,
    load_previous,
    write_atomically,
    write_ca_files,
)
from s2sgw.ca.ceremony import (
    BACKDATE,
    CA_FILES,
    DATABASE,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ISSUING_FILES,
    MAX_CRL_HOURS,
    OCSP_CERT,
    OCSP_KEY,
    ROOT_CERT,
    create_ca_files,
    inside,
)
from s2sgw.ca.inputs import (
    KEY_TYPES,
    REVOCATION_REASONS,
    parse_serial,
    validate_dns_name,
    validate_hours,
    validate_ip,
    validate_key_type,
    validate_reason,
    validate_service_name,
    validate_trust_domain,
    validate_url,
)
from s2sgw.ca.passphrase import Passphrase, encrypted_pem
from s2sgw.ca.records import CertRecord, IssuedIdentity, row_for, san_strings
from s2sgw.ca.store import LEAF, CAError, Row, SerialInUse
from s2sgw.ca.stores import STORE_FILE, check_store_owner, check_store_url, open_store
from s2sgw.files import remove_stale_temps
from s2sgw.interfaces import ICAStore

_log = Logger()

__all__ = [
    "KEY_TYPES",
    "REVOCATION_REASONS",
    "CAError",
    "CertRecord",
    "CertificateAuthority",
    "IssuedIdentity",
    "parse_serial",
    "write_atomically",
    "validate_dns_name",
    "validate_hours",
    "validate_ip",
    "validate_service_name",
    "validate_trust_domain",
]


# -- values ------------------------------------------------------------------------------


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    """Certificates carry whole seconds; keep records equal to what was signed."""
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).replace(microsecond=0)


# -- the authority -----------------------------------------------------------------------


@attrs.define(eq=False)
class CertificateAuthority:
    """An opened CA directory: signing material in memory, state in ``ca.db``."""

    directory: Path
    trust_domain: str
    url: str | None
    key_type: str
    root_cert: x509.Certificate
    intermediate_cert: x509.Certificate
    intermediate_key: PrivateKey = attrs.field(repr=False)
    ocsp_cert: x509.Certificate
    ocsp_key: PrivateKey = attrs.field(repr=False)
    store: ICAStore = attrs.field(repr=False)
    serial_source: Callable[[], int] = attrs.field(default=random_serial, repr=False, kw_only=True)
    # Issuing CAs replaced by ``s2sgw ca intermediate`` and not yet retired, oldest first.
    previous: tuple[IssuingCA, ...] = attrs.field(default=(), repr=False, kw_only=True)
    # Encrypts every CA key this instance writes (a new OCSP signer, a new intermediate).
    passphrase: Passphrase | None = attrs.field(default=None, repr=False, kw_only=True)

    # -- creating and opening

    @classmethod
    def init(
        cls,
        directory: Path | str,
        trust_domain: str,
        *,
        key_type: str = "ecdsa-p256",
        url: str | None = None,
        now: datetime.datetime | None = None,
        root_key_out: Path | str | None = None,
        passphrase: Passphrase | None = None,
        store: str | None = None,
    ) -> CertificateAuthority:
        """Create root, intermediate and OCSP signer in ``directory`` (new or empty of CA files).

        With ``root_key_out`` the root's key goes to that file (outside ``directory``, not there
        yet) and the directory holds only what the online CA needs. The state goes to
        ``DIR/ca.db``, or to the empty PostgreSQL database ``store`` names.
        """
        directory = Path(directory)
        validate_trust_domain(trust_domain)
        validate_key_type(key_type)
        if url is not None:
            url = validate_url(url)
        if directory.exists() and not directory.is_dir():
            raise CAError(f"{directory} is not a directory")
        if store is not None:
            store = check_store_url(store)
        existing = [name for name in (*CA_FILES, STORE_FILE) if (directory / name).exists()]
        if existing:
            raise CAError(f"{directory} already holds a CA ({existing[0]} exists)")

        if root_key_out is not None:
            root_key_out = Path(root_key_out)
            if inside(root_key_out, directory):
                raise CAError(f"the root key must be kept outside the CA directory, not at {root_key_out}")
            if root_key_out.exists() or root_key_out.is_symlink():
                raise CAError(f"{root_key_out} already exists; a root key is never overwritten")
        create_ca_files(
            directory, trust_domain, key_type, url, _utc(now), root_key_out=root_key_out, passphrase=passphrase,
            store_url=store,
        )
        return cls.open(directory, passphrase)

    @classmethod
    def open(
        cls, directory: Path | str, passphrase: Passphrase | None = None, *, store: str | None = None
    ) -> CertificateAuthority:
        """Load a CA directory; CAError if it is not one or its material is missing or corrupt,
        or a key is encrypted and ``passphrase`` does not open it. Decrypting is slow CPU work:
        a server opens its directory before its reactor runs. ``store`` (a postgresql:// URL)
        replaces the store the directory records."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CAError(f"{directory} is not a directory")
        opened = open_store(directory, directory / DATABASE, store)
        opened.migrate()
        meta = opened.meta()
        for stale in remove_stale_temps(directory):  # left by a CA command killed mid-write
            _log.warn("removed a stale temporary file {path}", path=str(stale))
        root_cert = load_cert(directory / ROOT_CERT, "root certificate")
        intermediate_cert = load_cert(directory / INTERMEDIATE_CERT, "intermediate certificate")
        check_store_owner(meta, root_cert, directory)
        ocsp_cert = load_cert(directory / OCSP_CERT, "OCSP signer certificate")
        intermediate_key = load_key(directory / INTERMEDIATE_KEY, intermediate_cert, "CA key", passphrase)
        ocsp_key = load_key(directory / OCSP_KEY, ocsp_cert, "OCSP signer key", passphrase)
        key_type = str(meta.get("key_type"))
        return cls(
            directory=directory,
            trust_domain=str(meta["trust_domain"]),
            url=None if meta.get("url") is None else str(meta["url"]),
            key_type=validate_key_type(key_type),
            root_cert=root_cert,
            intermediate_cert=intermediate_cert,
            intermediate_key=intermediate_key,
            ocsp_cert=ocsp_cert,
            ocsp_key=ocsp_key,
            store=opened,
            previous=tuple(  # a copy of the current one left by an interrupted rotation is not another CA
                p for p in load_previous(directory, ISSUING_FILES, passphrase)
                if p.cert.serial_number != intermediate_cert.serial_number
            ),
            passphrase=passphrase,
        )

    def signing_pair(self) -> tuple[x509.Certificate, PrivateKey]:
        """The issuing CA's certificate and key, read together while another thread may swap
        them (``IssuingReload`` sets the key first, then the certificate)."""
        while True:
            cert = self.intermediate_cert
            key = self.intermediate_key
            if cert is self.intermediate_cert:
                return cert, key

    def issuer_of(self, leaf: x509.Certificate) -> x509.Certificate:
        """The issuing CA (current or previous) that signed ``leaf``: what its chain carries."""
        for issuing in self.issuers:
            if issuing.cert.subject == leaf.issuer:
                return issuing.cert
        return self.intermediate_cert

    def key_bytes(self, key: PrivateKey) -> bytes:
        """A new CA key as it is written to disk: encrypted when this CA has a passphrase."""
        return encrypted_pem(key, self.passphrase)

    @property
    def issuing(self) -> IssuingCA:
        """The current issuing CA: the one that signs new leaves."""
        return IssuingCA(self.intermediate_cert, self.intermediate_key, self.ocsp_cert, self.ocsp_key)

    @property
    def issuers(self) -> tuple[IssuingCA, ...]:
        """Every issuing CA whose leaves this CA still answers for: the current one first."""
        return (self.issuing, *reversed(self.previous))

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """The digest to sign with these keys (``None`` for Ed25519, which has its own)."""
        return hash_for(self.intermediate_key)

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"

    # -- issuing

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        hours: float = 24.0,
        now: datetime.datetime | None = None,
    ) -> IssuedIdentity:
        """Sign and record a leaf for service ``name``, valid from ``now`` - 5 min to ``now`` + hours."""
        sans = self.planned_sans(name, dns=dns, ips=ips)
        hours = validate_hours(hours, "the lifetime")
        try:
            lifetime = datetime.timedelta(hours=hours)
        except OverflowError:
            raise CAError(f"the lifetime of {hours} hours is too long") from None
        key = generate_key(self.key_type)
        record = self.certify(name, key.public_key(), sans, lifetime=lifetime, now=now)
        return IssuedIdentity(
            record=record,
            chain_pem=record.pem + cert_pem(self.issuer_of(record.certificate())),
            key_pem=key_pem(key),
        )

    def planned_sans(self, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = ()) -> list[x509.GeneralName]:
        """What a certificate for ``name`` names: its SPIFFE ID, NAME, NAME.TRUSTDOMAIN, ``dns``, ``ips``."""
        validate_service_name(name)
        dns_names = _unique(
            [name, validate_dns_name(f"{name}.{self.trust_domain}")] + [validate_dns_name(d) for d in dns]
        )
        addresses = _unique([validate_ip(ip) for ip in ips])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(self.spiffe_id(name))]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(a) for a in addresses]
        return sans

    def certify(
        self,
        name: str,
        public_key: CertificatePublicKey,
        sans: Sequence[x509.GeneralName],
        *,
        lifetime: datetime.timedelta,
        now: datetime.datetime | None = None,
        issued_via: str = "cli",
        claim: Callable[[Any, Row], None] | None = None,
    ) -> CertRecord:
        """Sign and record a leaf for ``public_key`` (made elsewhere: by ``issue`` or by the service).

        Valid from ``now`` minus the backdate (5 minutes, or a tenth of ``lifetime`` when that is
        less, so a 60-second certificate does not start 5 minutes in the past) to ``now`` +
        ``lifetime``. ``claim`` runs in the transaction that records the certificate (see
        ``CAStore.insert``).
        """
        validate_service_name(name)
        if lifetime <= datetime.timedelta(0):
            raise CAError("the lifetime must be positive")
        now = _utc(now)
        not_before = now - min(BACKDATE, lifetime / 10)
        try:
            not_after = now + lifetime
        except OverflowError:
            raise CAError(f"the lifetime of {lifetime} is too long") from None
        issuer_cert, issuer_key = self.signing_pair()
        if not_after > issuer_cert.not_valid_after_utc:
            raise CAError(
                f"a lifetime of {lifetime.total_seconds() / 3600:g} hours would outlive the issuing CA "
                f"(valid until {issuer_cert.not_valid_after_utc:%Y-%m-%d})"
            )
        for _attempt in range(8):
            cert = leaf_builder(
                name, public_key, list(sans), self.serial_source(), not_before, not_after, issuer_cert, self.url
            ).sign(issuer_key, hash_for(issuer_key))
            row = row_for(cert, LEAF, name, san_strings(sans), issued_via)
            try:
                self.store.insert(row, claim=claim)
            except SerialInUse:
                continue
            return CertRecord._from_row(row)
        raise CAError("could not find an unused serial number")

    def write_identity(
        self,
        identity: IssuedIdentity,
        out_dir: Path | str,
        *,
        owner: tuple[int, int] | None = None,
        key_mode: int = 0o600,
    ) -> tuple[Path, Path]:
        """Write ``NAME.pem`` (chain) and ``NAME.key`` into ``out_dir``, both or neither.

        A file that is there already is replaced by one with its owner, group and mode; new ones
        get ``owner`` (uid, gid) and ``key_mode`` for the key (0644 for the chain).
        """
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CAError(f"cannot create {out_dir}: {error.strerror}") from None
        name = identity.record.name
        pem_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
        for stale in remove_stale_temps(out_dir, (pem_path.name, key_path.name)):
            _log.warn("removed a stale temporary file {path}", path=str(stale))
        write_ca_files(
            [(key_path, identity.key_pem, key_mode), (pem_path, identity.chain_pem, 0o644)], keep_owner=True, owner=owner
        )
        return pem_path, key_path

    # -- revocation and status

    def revoke(
        self,
        *,
        name: str | None = None,
        serial: int | None = None,
        reason: str = "unspecified",
        now: datetime.datetime | None = None,
    ) -> list[CertRecord]:
        """Revoke one serial, or every unrevoked certificate of ``name``; return what changed."""
        if (name is None) == (serial is None):
            raise CAError("revoke needs exactly one of a name or a serial")
        if name is not None:
            validate_service_name(name)
        validate_reason(reason)
        rows = self.store.revoke(name=name, serial=serial, reason=reason, revoked_at=_utc(now))
        return [CertRecord._from_row(row) for row in rows]

    def lookup(self, serial: int) -> CertRecord | None:
        row = self.store.get(serial)
        return None if row is None else CertRecord._from_row(row)

    def records(self) -> list[CertRecord]:
        """Every issued leaf, oldest first."""
        return [CertRecord._from_row(row) for row in self.store.rows()]

    def revocations_since(self, seq: int) -> list[CertRecord]:
        """Revocations with ``revocation_seq`` above ``seq``, in order."""
        return [CertRecord._from_row(row) for row in self.store.revoked_since(seq)]

    def change_marker(self) -> int:
        return self.store.change_marker()

    def make_crl(
        self,
        *,
        hours: float = 24.0,
        now: datetime.datetime | None = None,
        keep_expired: bool = False,
    ) -> x509.CertificateRevocationList:
        """A CRL with the next CRL number; expired revoked certificates are left out by default."""
        hours = validate_hours(hours, "the CRL lifetime")
        if hours > MAX_CRL_HOURS:
            raise CAError(f"the CRL lifetime must be at most {MAX_CRL_HOURS:g} hours")
        now = _utc(now)
        number, rows = self.store.next_crl_number()
        issuer_cert, issuer_key = self.signing_pair()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer_cert.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(hours=hours))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id(issuer_cert)),
                critical=False,
            )
        )
        for row in rows:
            if not keep_expired and row.not_after < now:
                continue
            entry = x509.RevokedCertificateBuilder().serial_number(row.serial).revocation_date(row.revoked_at)
            if row.reason and row.reason != x509.ReasonFlags.unspecified.value:
                entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(row.reason)), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(issuer_key, hash_for(issuer_key))


def _unique(items: Iterable) -> list:
    seen: dict = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


