"""Path validation of our own, for the paths cryptography's verifier cannot judge: Ed25519 ones.

cryptography's verifier implements the CA/Browser Forum's Web PKI profile, which permits RSA and
ECDSA (P-256, P-384, P-521) keys and signatures only and refuses any Ed25519 key or signature. An
s2sgw CA may be made with Ed25519 keys (``s2sgw ca init --key-type ed25519``), and those paths
must face a second verifier as well: this one. It is RFC 5280 section 6 for what s2sgw
certificates use, as strict as cryptography's profile where the two overlap, and independent of
OpenSSL: the issuer of each certificate by name and signature, validity, basicConstraints with
pathLenConstraint, keyUsage keyCertSign on CAs, the extended key usage of the direction on the
leaf and on CAs that restrict it, name constraints on DNS and IP SANs (any other name form in a
constraint is refused, as cryptography refuses it), allowed signature algorithms, the same
algorithm inside and outside the signature, X.509 v3 only.

Functions return the words of the first failure, or None; they never raise.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, PublicKeyAlgorithmOID, SignatureAlgorithmOID

from s2sgw.verify import der

_SIGNATURE_ALGORITHMS = frozenset(
    {
        SignatureAlgorithmOID.ED25519,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
    }
)
_PSS_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def needs_own_validation(path: Sequence[x509.Certificate]) -> bool:
    """Whether ``path`` holds an Ed25519 key or signature (which cryptography's profile refuses)."""
    return any(
        certificate.public_key_algorithm_oid == PublicKeyAlgorithmOID.ED25519
        or certificate.signature_algorithm_oid == SignatureAlgorithmOID.ED25519
        for certificate in path
    )


def _extension(certificate: x509.Certificate, kind: type) -> x509.Extension | None:
    try:
        return certificate.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _self_issued(certificate: x509.Certificate) -> bool:
    return certificate.subject == certificate.issuer


def _signature_problem(certificate: x509.Certificate) -> str | None:
    if certificate.signature_algorithm_oid not in _SIGNATURE_ALGORITHMS:
        return f"signature algorithm {certificate.signature_algorithm_oid.dotted_string} is not allowed"
    if certificate.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS and not isinstance(
        certificate.signature_hash_algorithm, _PSS_HASHES
    ):
        return "RSASSA-PSS signature without SHA-256, SHA-384 or SHA-512"
    inner, outer = der.signature_algorithms(certificate.public_bytes(serialization.Encoding.DER))
    if inner != outer:
        return "signature algorithm inside the certificate differs from the one outside"
    return None


def _certificate_problem(certificate: x509.Certificate, now: datetime.datetime) -> str | None:
    if certificate.version != x509.Version.v3:
        return "not an X.509 v3 certificate"
    if now < certificate.not_valid_before_utc:
        return f"not valid before {certificate.not_valid_before_utc.isoformat()}"
    if now > certificate.not_valid_after_utc:
        return f"expired at {certificate.not_valid_after_utc.isoformat()}"
    return _signature_problem(certificate)


def _ca_problem(certificate: x509.Certificate, below: int, usage: x509.ObjectIdentifier) -> str | None:
    """What a CA certificate with ``below`` non-self-issued intermediates under it must satisfy."""
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is None or not constraints.value.ca:
        return "issuer is not a CA (basicConstraints)"
    if not constraints.critical:
        return "CA basicConstraints is not critical"
    limit = constraints.value.path_length
    if limit is not None and below > limit:
        return f"pathLenConstraint {limit} exceeded ({below} intermediates below)"
    key_usage = _extension(certificate, x509.KeyUsage)
    if key_usage is None or not key_usage.value.key_cert_sign:
        return "CA keyUsage lacks keyCertSign"
    purposes = _extension(certificate, x509.ExtendedKeyUsage)
    if purposes is not None and usage not in purposes.value and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in purposes.value:
        return "CA extendedKeyUsage excludes the purpose of this connection"
    return None


def _leaf_problem(leaf: x509.Certificate, usage: x509.ObjectIdentifier) -> str | None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.value.ca:
        return "leaf is a CA"
    purposes = _extension(leaf, x509.ExtendedKeyUsage)
    if purposes is None or usage not in purposes.value:
        return "leaf extendedKeyUsage lacks the purpose of this connection"
    if _extension(leaf, x509.SubjectAlternativeName) is None:
        return "leaf has no subjectAltName"
    return None


# -- name constraints --------------------------------------------------------------------------


def _dns_within(name: str, base: str) -> bool:
    """RFC 5280 4.2.1.10: ``base`` and any name made by adding labels to its left."""
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _within(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    """Whether ``name`` lies in ``subtree`` (both DNS names, or an IP address and a network)."""
    if isinstance(subtree, x509.DNSName) and isinstance(name, x509.DNSName):
        return _dns_within(name.value, subtree.value)
    if isinstance(subtree, x509.IPAddress) and isinstance(name, x509.IPAddress):
        network, address = subtree.value, name.value
        return isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)) and (
            address.version == network.version and address in network
        )
    return False


def _names_problem(names: Sequence[x509.GeneralName], constraints: x509.NameConstraints) -> str | None:
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    if not permitted and not excluded:
        return "nameConstraints has no subtrees"
    for subtree in permitted + excluded:
        if not isinstance(subtree, (x509.DNSName, x509.IPAddress)):
            return f"unsupported name constraint ({type(subtree).__name__})"
    for name in names:
        if not isinstance(name, (x509.DNSName, x509.IPAddress)):
            continue
        if any(_within(name, subtree) for subtree in excluded):
            return f"excluded name constraint matches {name.value}"
        forms = [subtree for subtree in permitted if type(subtree) is type(name)]
        if forms and not any(_within(name, subtree) for subtree in forms):
            return f"no permitted name constraint matches {name.value}"
    return None


def _sans(certificate: x509.Certificate) -> list[x509.GeneralName]:
    extension = _extension(certificate, x509.SubjectAlternativeName)
    return list(extension.value) if extension is not None else []


# -- the path ----------------------------------------------------------------------------------


def validate(
    path: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
    max_depth: int,
) -> str | None:
    """Why ``path`` (leaf first, a member of ``roots`` last) is not a valid path, or None."""
    try:
        return _validate(path, roots, usage, now, max_depth)
    except Exception as error:  # a certificate we cannot read is not a valid path
        return f"path cannot be checked: {error}"


def _validate(
    path: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
    max_depth: int,
) -> str | None:
    if len(path) < 2:
        return "no trust anchor above the leaf"
    if path[-1] not in roots:
        return "the path does not end in a trusted root"
    intermediates = [c for c in path[1:-1] if not _self_issued(c)]
    if len(intermediates) > max_depth:
        return f"{len(intermediates)} intermediates (at most {max_depth})"
    problem = _leaf_problem(path[0], usage)
    if problem is not None:
        return problem
    for depth, certificate in enumerate(path):
        problem = _certificate_problem(certificate, now)
        if problem is None and depth < len(path) - 1:
            issuer = path[depth + 1]
            try:
                certificate.verify_directly_issued_by(issuer)
            except Exception:
                problem = "not signed by the next certificate of the path"
        if problem is None and depth > 0:
            below = sum(1 for c in path[1:depth] if not _self_issued(c))
            problem = _ca_problem(certificate, below, usage)
        if problem is None and depth > 0:
            constraints = _extension(certificate, x509.NameConstraints)
            if constraints is not None:
                # RFC 5280 6.1.3: names of self-issued intermediates are not constrained.
                for lower in path[:depth]:
                    if lower is not path[0] and _self_issued(lower):
                        continue
                    problem = _names_problem(_sans(lower), constraints.value)
                    if problem is not None:
                        break
        if problem is not None:
            return f"{problem} (depth {depth}: {certificate.subject.rfc4514_string()})"
    return None
