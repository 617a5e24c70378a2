"""The certificate authority as a library: init, issue, revoke, CRLs, status look-ups.

The ``s2sgw ca`` commands, the status server and the demo all drive this one class. It is
synchronous (key generation, files, SQLite): on a reactor, call it through ``deferToThread``.
An instance holds only immutable material and opens a new database connection per call,
so one instance may be shared by threads.

A CA directory holds ``root.pem root.key`` (the offline root), ``intermediate.pem
intermediate.key`` (the issuing CA), ``ocsp.pem ocsp.key`` (the delegated OCSP signer),
``bundle.pem`` (the trust bundle: the root) and ``ca.db``. ``ca.db`` appears last, so a
directory with it is a complete CA.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import re
import secrets
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from s2sgw import files as files_module
from s2sgw.ca.store import LEAF, OCSP_SIGNER, CAError, CAStore, Row, SerialInUse, StoreError, serial_hex

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

KEY_TYPES = ("ecdsa-p256", "rsa3072", "ed25519")

ROOT_LIFETIME = datetime.timedelta(days=3650)
INTERMEDIATE_LIFETIME = datetime.timedelta(days=1825)
OCSP_LIFETIME = datetime.timedelta(days=365)
BACKDATE = datetime.timedelta(minutes=5)  # tolerate peers whose clocks run a little slow
MAX_CRL_HOURS = 24.0

# Final revocations only: a hold can be lifted, which this CA does not model.
REVOCATION_REASONS = tuple(
    flag.value
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.certificate_hold)
)

ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
OCSP_CERT, OCSP_KEY = "ocsp.pem", "ocsp.key"
BUNDLE, DATABASE = "bundle.pem", "ca.db"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, OCSP_CERT, OCSP_KEY, BUNDLE, DATABASE)

_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


# -- validation --------------------------------------------------------------------------


def validate_service_name(name: str) -> str:
    """A service name becomes a DNS label and a SPIFFE path segment, so both rules apply."""
    if not _SERVICE_NAME.match(name):
        raise CAError(f"invalid service name {name!r}: use a-z, 0-9 and '-', starting with a letter or digit")
    return name


def _dns_ok(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_DNS_LABEL.match(label) for label in name.split("."))


def validate_trust_domain(domain: str) -> str:
    if not _dns_ok(domain):
        raise CAError(f"invalid trust domain {domain!r}: use a lowercase DNS name such as example.internal")
    return domain


def validate_dns_name(name: str) -> str:
    """Return the lowercase form of a DNS name, or raise CAError."""
    lowered = name.lower()
    if not _dns_ok(lowered):
        raise CAError(f"invalid DNS name {name!r}")
    return lowered


def validate_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CAError(f"invalid IP address {text!r}") from None


def _validate_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise CAError(f"invalid CA URL {url!r}: bad port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise CAError(f"invalid CA URL {url!r}: use http://HOST:PORT")
    return url.rstrip("/")


def _validate_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    return key_type


def _validate_reason(reason: str) -> x509.ReasonFlags:
    if reason not in REVOCATION_REASONS:
        raise CAError(f"unknown revocation reason {reason!r}: use one of {', '.join(REVOCATION_REASONS)}")
    return x509.ReasonFlags(reason)


def validate_hours(hours: float, what: str) -> float:
    if not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise CAError(f"{what} must be a positive number of hours, not {hours!r}")
    return float(hours)


def parse_serial(text: str) -> int:
    """Read a serial written as hex, with or without ``0x`` and ``:`` separators."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned[2:] if cleaned.startswith("0x") else cleaned
    try:
        serial = int(cleaned, 16)
    except ValueError:
        raise CAError(f"invalid serial {text!r}: expected hexadecimal") from None
    if serial <= 0:
        raise CAError(f"invalid serial {text!r}: serials are positive")
    return serial


# -- values ------------------------------------------------------------------------------


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    """Certificates carry whole seconds; keep records equal to what was signed."""
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).replace(microsecond=0)


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
        return serial_hex(self.serial)

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


# -- keys and certificates ---------------------------------------------------------------


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
CertificatePublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _generate_key(key_type: str) -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ed25519.Ed25519PrivateKey.generate()


def _hash_for(key) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _random_serial() -> int:
    """Positive, below 2**159: at most 20 octets in DER, with 159 bits of randomness."""
    while True:
        serial = secrets.randbits(159)
        if serial:
            return serial


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_builder(
    subject: str,
    key: PrivateKey,
    serial: int,
    not_before: datetime.datetime,
    lifetime: datetime.timedelta,
    issuer: x509.Certificate | None,
    path_length: int,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(issuer)), critical=False
        )
    return builder


# -- files -------------------------------------------------------------------------------


def _write_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file or none (CAError naming the file on failure)."""
    try:
        files_module.write_files(files)
    except OSError as error:
        raise CAError(f"cannot write {error.filename}: {error.strerror}") from None


def write_atomically(path: Path | str, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` in one rename (CAError on failure, no partial file)."""
    path = Path(path)
    _write_files([(path, data, mode)])
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{what} {path} is missing") from None
    except OSError as error:
        raise CAError(f"cannot read {what} {path}: {error.strerror}") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CAError(f"{what} {path} is corrupt") from None


def _load_key(path: Path, cert: x509.Certificate, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError):
        raise CAError(f"{what} {path} is corrupt") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CAError(f"{what} {path} has an unsupported key type")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CAError(f"{what} {path} does not match its certificate")
    return key


@contextlib.contextmanager
def _undo_on_error(paths: Iterable[Path], directory: Path, created_directory: bool) -> Iterator[None]:
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
    store: CAStore = attrs.field(repr=False)
    serial_source: Callable[[], int] = attrs.field(default=_random_serial, repr=False, kw_only=True)

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
    ) -> CertificateAuthority:
        """Create root, intermediate and OCSP signer in ``directory`` (new or empty of CA files)."""
        directory = Path(directory)
        validate_trust_domain(trust_domain)
        _validate_key_type(key_type)
        if url is not None:
            url = _validate_url(url)
        if directory.exists() and not directory.is_dir():
            raise CAError(f"{directory} is not a directory")
        existing = [name for name in CA_FILES if (directory / name).exists()]
        if existing:
            raise CAError(f"{directory} already holds a CA ({existing[0]} exists)")

        now = _utc(now)
        not_before = now - BACKDATE
        root_key, intermediate_key, ocsp_key = (_generate_key(key_type) for _ in range(3))
        root_cert = _ca_builder(
            f"{trust_domain} root CA", root_key, _random_serial(), not_before, ROOT_LIFETIME, None, 1
        ).sign(root_key, _hash_for(root_key))
        intermediate_cert = _ca_builder(
            f"{trust_domain} issuing CA",
            intermediate_key,
            _random_serial(),
            not_before,
            INTERMEDIATE_LIFETIME,
            root_cert,
            0,
        ).sign(root_key, _hash_for(root_key))
        ocsp_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{trust_domain} OCSP signer"))
            .issuer_name(intermediate_cert.subject)
            .public_key(ocsp_key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_before + OCSP_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .add_extension(x509.OCSPNoCheck(), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ocsp_key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(intermediate_cert)),
                critical=False,
            )
            .sign(intermediate_key, _hash_for(intermediate_key))
        )

        created_directory = False
        try:
            if not directory.exists():
                directory.mkdir(parents=True, mode=0o755)
                created_directory = True
        except OSError as error:
            raise CAError(f"cannot create {directory}: {error.strerror}") from None

        database = directory / DATABASE
        temp_db = directory / f".{DATABASE}.{secrets.token_hex(6)}.tmp"
        written = [directory / name for name in CA_FILES if name != DATABASE]
        with _undo_on_error([temp_db, *written], directory, created_directory):
            try:
                store = CAStore.create(
                    temp_db, {"trust_domain": trust_domain, "url": url, "key_type": key_type}
                )
                store.insert(_row_for(ocsp_cert, OCSP_SIGNER, "ocsp-signer", ()))
            except (OSError, sqlite3.Error, StoreError) as error:  # not writable, disk full
                raise CAError(f"cannot create the CA database in {directory}: {error}") from None
            _write_files(
                [
                    (directory / ROOT_KEY, _key_pem(root_key), 0o600),
                    (directory / INTERMEDIATE_KEY, _key_pem(intermediate_key), 0o600),
                    (directory / OCSP_KEY, _key_pem(ocsp_key), 0o600),
                    (directory / ROOT_CERT, _cert_pem(root_cert), 0o644),
                    (directory / INTERMEDIATE_CERT, _cert_pem(intermediate_cert), 0o644),
                    (directory / OCSP_CERT, _cert_pem(ocsp_cert), 0o644),
                    (directory / BUNDLE, _cert_pem(root_cert), 0o644),
                ]
            )
            try:
                os.chmod(temp_db, 0o600)
                os.replace(temp_db, database)  # last: its presence marks a complete CA
            except OSError as error:
                raise CAError(f"cannot write {database}: {error.strerror}") from None
            files_module.fsync_directory(directory)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: Path | str) -> CertificateAuthority:
        """Load a CA directory; CAError if it is not one or its material is missing or corrupt."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CAError(f"{directory} is not a directory")
        database = directory / DATABASE
        if not database.is_file():
            raise CAError(f"{directory} is not a CA directory (no {DATABASE}; run `s2sgw ca init`)")
        store = CAStore(database)
        store.migrate()
        meta = store.meta()
        root_cert = _load_cert(directory / ROOT_CERT, "root certificate")
        intermediate_cert = _load_cert(directory / INTERMEDIATE_CERT, "intermediate certificate")
        ocsp_cert = _load_cert(directory / OCSP_CERT, "OCSP signer certificate")
        intermediate_key = _load_key(directory / INTERMEDIATE_KEY, intermediate_cert, "CA key")
        ocsp_key = _load_key(directory / OCSP_KEY, ocsp_cert, "OCSP signer key")
        key_type = str(meta.get("key_type"))
        return cls(
            directory=directory,
            trust_domain=str(meta["trust_domain"]),
            url=None if meta.get("url") is None else str(meta["url"]),
            key_type=_validate_key_type(key_type),
            root_cert=root_cert,
            intermediate_cert=intermediate_cert,
            intermediate_key=intermediate_key,
            ocsp_cert=ocsp_cert,
            ocsp_key=ocsp_key,
            store=store,
        )

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """The digest to sign with these keys (``None`` for Ed25519, which has its own)."""
        return _hash_for(self.intermediate_key)

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
        key = _generate_key(self.key_type)
        record = self.certify(name, key.public_key(), sans, lifetime=lifetime, now=now)
        return IssuedIdentity(
            record=record,
            chain_pem=record.pem + _cert_pem(self.intermediate_cert),
            key_pem=_key_pem(key),
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
        claim: Callable[[sqlite3.Connection, Row], None] | None = None,
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
        if not_after > self.intermediate_cert.not_valid_after_utc:
            raise CAError(
                f"a lifetime of {lifetime.total_seconds() / 3600:g} hours would outlive the issuing CA "
                f"(valid until {self.intermediate_cert.not_valid_after_utc:%Y-%m-%d})"
            )
        for _attempt in range(8):
            cert = self._sign_leaf(name, public_key, list(sans), self.serial_source(), not_before, not_after)
            row = _row_for(cert, LEAF, name, _san_strings(sans), issued_via)
            try:
                self.store.insert(row, claim=claim)
            except SerialInUse:
                continue
            return CertRecord._from_row(row)
        raise CAError("could not find an unused serial number")

    def _sign_leaf(
        self,
        name: str,
        public_key: CertificatePublicKey,
        sans: list[x509.GeneralName],
        serial: int,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(self.intermediate_cert)),
                critical=False,
            )
        )
        if self.url is not None:
            builder = builder.add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier(f"{self.url}/crl")],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                    ]
                ),
                critical=False,
            ).add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier(f"{self.url}/ocsp"),
                        )
                    ]
                ),
                critical=False,
            )
        return builder.sign(self.intermediate_key, self.hash_algorithm)

    def write_identity(self, identity: IssuedIdentity, out_dir: Path | str) -> tuple[Path, Path]:
        """Write ``NAME.pem`` (chain) and ``NAME.key`` (0600) into ``out_dir``, both or neither."""
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CAError(f"cannot create {out_dir}: {error.strerror}") from None
        name = identity.record.name
        pem_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
        _write_files([(key_path, identity.key_pem, 0o600), (pem_path, identity.chain_pem, 0o644)])
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
        _validate_reason(reason)
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
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.intermediate_cert.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(hours=hours))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(self.intermediate_cert)),
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
        return builder.sign(self.intermediate_key, self.hash_algorithm)


def _unique(items: Iterable) -> list:
    seen: dict = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _san_strings(sans: Sequence[x509.GeneralName]) -> tuple[str, ...]:
    prefix = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP"}
    return tuple(f"{prefix[type(san)]}:{san.value}" for san in sans)


def _row_for(
    cert: x509.Certificate, kind: str, name: str, sans: tuple[str, ...], issued_via: str = "cli"
) -> Row:
    return Row(
        serial=cert.serial_number,
        kind=kind,
        name=name,
        sans=sans,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        pem=_cert_pem(cert),
        revoked_at=None,
        reason=None,
        revocation_seq=None,
        issued_via=issued_via,
    )
