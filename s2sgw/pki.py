"""PEM files <-> ``cryptography`` objects, and the certificate facts the gateway relies on.

Pure and synchronous: callers that run on the reactor read files in a thread. Errors are
:class:`PKIError` with a message fit for the log, naming the file when there is one. The one
side effect: loading a key file that group or others may read logs a warning.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.logger import Logger

from s2sgw.errors import S2sgwError
from s2sgw.serials import serial_text
from s2sgw.verify.crlrules import crl_problem

_log = Logger(namespace="s2sgw.pki")

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class PKIError(S2sgwError):
    """A certificate, key or CRL file is missing, malformed or does not check out."""


# -- loading -------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PKIError(f"{path}: cannot read: {error.strerror or error}") from None


def parse_certificates(data: bytes, source: str = "<bytes>") -> list[x509.Certificate]:
    """Every certificate in PEM ``data``, in file order; at least one, and no truncated block."""
    if _PEM_CERT not in data:
        raise PKIError(f"{source}: no certificate found" + ("" if data.strip() else " (the file is empty)"))
    if data.count(_PEM_CERT) != data.count(b"-----END CERTIFICATE-----"):
        raise PKIError(f"{source}: truncated PEM certificate")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise PKIError(f"{source}: malformed PEM certificate: {error}") from None
    if not certificates:
        raise PKIError(f"{source}: no certificate found")
    return certificates


def load_certificates(path: Path) -> list[x509.Certificate]:
    """A PEM file's certificates: a chain (leaf first) or a trust bundle."""
    return parse_certificates(_read(path), str(path))


def parse_private_key(data: bytes, source: str = "<bytes>") -> PrivateKey:
    """An unencrypted PEM private key (RSA, EC, Ed25519 or Ed448)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"{source}: private key is encrypted; s2sgw needs an unencrypted key") from None
    except Exception as error:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise PKIError(f"{source}: malformed private key: {error}") from None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
    ):
        raise PKIError(f"{source}: unsupported private key type {type(key).__name__}")
    return key


def own_groups() -> frozenset[int]:
    """The gateway's groups: the effective group and the primary group of the effective user."""
    groups = {os.getegid()}
    try:
        import pwd

        groups.add(pwd.getpwuid(os.geteuid()).pw_gid)
    except (ImportError, KeyError):
        pass
    return frozenset(groups)


def key_file_problem(path: Path, groups: frozenset[int] | None = None) -> str | None:
    """Why a private key file's permissions are too open, if they are.

    One rule, the one the docs and the systemd unit state: others may not use the file, and its
    group may read it only when that group is the gateway's own (``root:s2sgw 0640`` is right for
    a gateway running as ``s2sgw``). ``groups`` defaults to :func:`own_groups`.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007:
        return f"{path}: private key file is accessible by others (mode {mode:04o}); chmod o= it"
    if mode & 0o070 and info.st_gid not in (own_groups() if groups is None else groups):
        return (
            f"{path}: private key file is accessible by group {_group_name(info.st_gid)}, which is not "
            f"the gateway's (mode {mode:04o}); chgrp it to the gateway's group or chmod g= it"
        )
    return None


def _group_name(gid: int) -> str:
    try:
        import grp

        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except (ImportError, KeyError):
        return str(gid)


def load_private_key(path: Path) -> PrivateKey:
    """A key file's key; logs a warning (it does not refuse) when others may read the file."""
    key = parse_private_key(_read(path), str(path))
    problem = key_file_problem(path)
    if problem is not None:
        _log.warn("{problem}", problem=problem, path=str(path))
    return key


def parse_crl(data: bytes, source: str = "<bytes>") -> x509.CertificateRevocationList:
    """Exactly one CRL in PEM or DER (e.g. one fetched from the CA). Several are refused rather
    than read in part: only the first would count."""
    count = data.count(b"-----BEGIN X509 CRL-----")
    if count > 1:
        raise PKIError(f"{source}: holds {count} CRLs; exactly one is expected here")
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as error:
        raise PKIError(f"{source}: malformed CRL: {error}") from None


def parse_crls(data: bytes, source: str = "<bytes>") -> list[x509.CertificateRevocationList]:
    """One DER CRL, or one or more concatenated PEM CRLs (say, the intermediate's and the root's).

    At most one per issuer: two CRLs of one CA would leave it open which one counts.
    """
    if b"-----BEGIN X509 CRL-----" not in data:
        return [parse_crl(data, source)]
    try:
        crls = [x509.load_pem_x509_crl(block) for block in _pem_blocks(data, b"X509 CRL")]
    except ValueError as error:
        raise PKIError(f"{source}: malformed CRL: {error}") from None
    seen: set[x509.Name] = set()
    for crl in crls:
        if crl.issuer in seen:
            raise PKIError(
                f"{source}: holds several CRLs of {crl.issuer.rfc4514_string()}; keep one CRL per issuing CA"
            )
        seen.add(crl.issuer)
    return crls


def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, at = [], data.find(begin)
    while at != -1:
        stop = data.find(end, at)
        if stop == -1:
            raise ValueError(f"unterminated {label.decode()} block")
        blocks.append(data[at : stop + len(end)] + b"\n")
        at = data.find(begin, stop)
    return blocks


def load_crl(path: Path) -> x509.CertificateRevocationList:
    return parse_crl(_read(path), str(path))


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    return parse_crls(_read(path), str(path))


def primary_crl(
    crls: Sequence[x509.CertificateRevocationList], roots: Iterable[x509.Certificate] = ()
) -> x509.CertificateRevocationList:
    """The CRL of the CA issuing the peers' leaves: the first not issued by a root (a self-issued
    certificate among ``roots``), else the first."""
    root_names = {root.subject for root in roots if root.subject == root.issuer}
    return next((crl for crl in crls if crl.issuer not in root_names), crls[0])


# -- facts about certificates --------------------------------------------------------------------


def key_matches_certificate(key: PrivateKey, certificate: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``certificate``'s public key."""
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ours == theirs


def _san(certificate: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def has_san(certificate: x509.Certificate) -> bool:
    """Whether the certificate carries a non-empty subjectAltName (we never read the CN)."""
    san = _san(certificate)
    return san is not None and len(san) > 0


def spiffe_ids(certificate: x509.Certificate) -> list[str]:
    """The certificate's ``spiffe://`` URI SANs, exactly as written."""
    san = _san(certificate)
    if san is None:
        return []
    return [
        uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")
    ]


def spiffe_id(certificate: x509.Certificate) -> str | None:
    """The certificate's one SPIFFE ID; None when it has none or (invalid per SPIFFE) several."""
    ids = spiffe_ids(certificate)
    return ids[0] if len(ids) == 1 else None


def dns_names(certificate: x509.Certificate) -> list[str]:
    san = _san(certificate)
    return [] if san is None else list(san.get_values_for_type(x509.DNSName))


def identity(certificate: x509.Certificate) -> str | None:
    """The name logs show for a peer: its SPIFFE ID, else its first DNS SAN."""
    names = spiffe_ids(certificate) or dns_names(certificate)
    return names[0] if names else None


def trust_domain(spiffe: str) -> str:
    """``spiffe://DOMAIN/path`` -> ``DOMAIN``."""
    if not spiffe.startswith("spiffe://"):
        raise ValueError(f"not a SPIFFE ID: {spiffe!r}")
    return spiffe[len("spiffe://") :].split("/", 1)[0]


def extended_key_usages(certificate: x509.Certificate) -> set[x509.ObjectIdentifier] | None:
    """The EKU OIDs, or None when the extension is absent (which OpenSSL treats as any use)."""
    try:
        return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def allows_usage(certificate: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    """Whether the EKU permits ``usage`` (absent EKU or anyExtendedKeyUsage permits all)."""
    usages = extended_key_usages(certificate)
    return usages is None or usage in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def serial_hex(certificate: x509.Certificate) -> str:
    return serial_text(certificate.serial_number)


def validity_problem(certificate: x509.Certificate, now: datetime.datetime) -> str | None:
    """"expired" / "not yet valid" / None at ``now`` (aware UTC)."""
    if now > certificate.not_valid_after_utc:
        return f"expired at {certificate.not_valid_after_utc.isoformat()}"
    if now < certificate.not_valid_before_utc:
        return f"not valid before {certificate.not_valid_before_utc.isoformat()}"
    return None


def describe(certificate: x509.Certificate) -> str:
    """One line for logs: identity, serial and expiry."""
    return (
        f"{identity(certificate) or certificate.subject.rfc4514_string()} "
        f"serial {serial_hex(certificate)} "
        f"expires {certificate.not_valid_after_utc.isoformat()}"
    )


# -- chains and CRLs -----------------------------------------------------------------------------


def verify_chain(
    chain: Sequence[x509.Certificate],
    roots: Iterable[x509.Certificate],
    now: datetime.datetime | None = None,
) -> None:
    """Check ``chain`` (leaf first) against ``roots`` with OpenSSL's path building.

    Raises :class:`PKIError` naming OpenSSL's verdict. ``now`` pins the verification time; by
    default OpenSSL uses the system clock.
    """
    from OpenSSL import crypto

    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    if now is not None:
        store.set_time(now.astimezone(datetime.UTC).replace(tzinfo=None))
    leaf, *rest = chain
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in rest],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        subject = error.certificate.to_cryptography().subject.rfc4514_string() if error.certificate else "?"
        raise PKIError(f"certificate chain does not verify: {error} (at {subject})") from None


def issuer_of(certificate: x509.Certificate, candidates: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The candidate whose key signed ``certificate``, if any."""
    for candidate in candidates:
        if candidate.subject != certificate.issuer:
            continue
        try:
            certificate.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def check_crl(
    crl: x509.CertificateRevocationList,
    issuers: Iterable[x509.Certificate],
    now: datetime.datetime,
    source: str = "CRL",
) -> x509.Certificate:
    """Check the CRL's signature against one of ``issuers``, that it is current and that it follows
    the rules of :mod:`s2sgw.verify.crlrules`; return its issuer."""
    for issuer in issuers:
        if issuer.subject != crl.issuer:
            continue
        if crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            break
    else:
        raise PKIError(f"{source}: signature does not verify against any trusted CA certificate")
    if crl.last_update_utc > now + datetime.timedelta(minutes=5):
        raise PKIError(f"{source}: issued in the future ({crl.last_update_utc.isoformat()})")
    if crl.next_update_utc is None:
        raise PKIError(f"{source}: has no nextUpdate; cannot judge freshness")
    if crl.next_update_utc < now:
        raise PKIError(f"{source}: stale since {crl.next_update_utc.isoformat()}")
    problem = crl_problem(crl, issuer)
    if problem is not None:
        raise PKIError(f"{source}: {problem}")
    return issuer


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def is_revoked(crl: x509.CertificateRevocationList, certificate: x509.Certificate) -> bool:
    return crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None

