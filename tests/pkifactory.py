"""Throwaway PKIs for TLS tests, including certificates the real CA would never issue.

Keys are generated at run time (P-256: fast). A ``TestCA`` is root -> intermediate -> leaves,
shaped like the CA's own output (SPIFFE URI SAN, DNS SANs, serverAuth+clientAuth) unless a
test asks for a broken one.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = datetime.UTC
BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(
    cn: str, key, issuer_name: x509.Name, issuer_key, path_length: int | None
) -> x509.Certificate:
    start = now() - datetime.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_key is not key:  # like the real CA: every certificate below the root names its issuer's key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@attrs.define(eq=False)
class Identity:
    chain: list[x509.Certificate]
    key: ec.EllipticCurvePrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert_pem(*self.chain))
        key_path.write_bytes(key_pem(self.key))
        key_path.chmod(0o600)
        return cert_path, key_path


@attrs.define(eq=False)
class TestCA:
    __test__ = False  # not a pytest class

    domain: str
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, domain: str = "example.org", cn: str = "Test Root") -> TestCA:
        root_key, intermediate_key = new_key(), new_key()
        root = _ca_cert(cn, root_key, _name(cn), root_key, None)
        intermediate = _ca_cert(f"{cn} Intermediate", intermediate_key, root.subject, root_key, 0)
        return cls(domain, root, root_key, intermediate, intermediate_key)

    def bundle_pem(self) -> bytes:
        return cert_pem(self.root)

    def issue(
        self,
        name: str,
        *,
        sans: list[x509.GeneralName] | None = None,
        eku: tuple[x509.ObjectIdentifier, ...] | None = BOTH,
        ca: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Identity:
        """A leaf signed by the intermediate; ``sans=[]`` gives a certificate with no SAN."""
        key = key or new_key()
        if sans is None:
            sans = [
                x509.UniformResourceIdentifier(f"spiffe://{self.domain}/{name}"),
                x509.DNSName(name),
                x509.DNSName(f"{name}.{self.domain}"),
            ]
        start = not_before or now() - datetime.timedelta(minutes=5)
        end = not_after or now() + datetime.timedelta(hours=24)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.intermediate_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        leaf = builder.sign(self.intermediate_key, hashes.SHA256())
        return Identity([leaf, self.intermediate], key)

    def crl(
        self,
        revoked: list[x509.Certificate] = (),  # type: ignore[assignment]
        *,
        number: int = 1,
        last_update: datetime.datetime | None = None,
        next_update: datetime.datetime | None = None,
        signer_key=None,
        root: bool = False,
        reason: x509.ReasonFlags | None = None,
    ) -> x509.CertificateRevocationList:
        """The intermediate's CRL; with ``root=True`` the root's (listing revoked intermediates)."""
        last = last_update or now() - datetime.timedelta(minutes=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name((self.root if root else self.intermediate).subject)
            .last_update(last)
            .next_update(next_update or last + datetime.timedelta(hours=1))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for certificate in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(certificate.serial_number).revocation_date(last)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        default_key = self.root_key if root else self.intermediate_key
        return builder.sign(signer_key or default_key, hashes.SHA256())


def make_ca(cn: str = "Test CA", kind: str = "ec") -> Issued:
    key = _key(kind)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + 24 * HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash(key))
    )
    return Issued(cert, key)


NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


HOUR = datetime.timedelta(hours=1)


def _key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash(key):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@attrs.frozen
class Issued:
    cert: x509.Certificate
    key: object
