"""Our own rules for a certificate path: what OpenSSL lets through and a careful verifier refuses.

Each rule is a small named check of one certificate at its place in a verified path (leaf first,
trust anchor last). The names are stable: they start the detail of an audit line, ``s2sgw
explain`` lists them, and ``docs/security.rst`` explains each. A problem in the leaf is a
``bad_certificate``, one in a CA certificate of the path an ``untrusted_chain``.

The rules read certificates only; they never raise. A certificate a rule cannot read (a
malformed extension, a key type ``cryptography`` does not know) breaks that rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from s2sgw.interfaces import Reason

MIN_RSA_BITS = 2048
EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})  # P-256, P-384, P-521
MAX_SERIAL_OCTETS = 20  # RFC 5280 4.1.2.2

# Extensions a certificate may mark critical: the ones both verifiers and our checks act on.
UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
    }
)


@attrs.frozen
class Place:
    """Where a certificate sits in the path: depth 0 is the leaf, ``last`` the trust anchor."""

    depth: int
    last: int
    anchored: bool = True  # False when the top of the path is not a trust anchor (explain)
    public_key: object = None  # read once for the key rules; an exception if it cannot be read
    extensions: object = None  # {OID: Extension}, read once; an exception if they cannot be read

    @property
    def leaf(self) -> bool:
        return self.depth == 0

    @property
    def anchor(self) -> bool:
        return self.anchored and self.depth == self.last

    def extension(self, certificate: x509.Certificate, kind: type) -> x509.Extension | None:
        """The certificate's extension of ``kind`` (raises what reading the extensions raised)."""
        if isinstance(self.extensions, Exception):
            raise self.extensions
        if self.extensions is None:
            return _extension(certificate, kind)
        return self.extensions.get(kind.oid)  # type: ignore[attr-defined]

    def key(self, certificate: x509.Certificate) -> object:
        """The certificate's public key (raises what reading it raised)."""
        if isinstance(self.public_key, Exception):
            raise self.public_key
        return self.public_key if self.public_key is not None else certificate.public_key()


@attrs.frozen
class Problem:
    """One rule one certificate breaks."""

    rule: str
    depth: int
    words: str
    subject: str

    @property
    def reason(self) -> str:
        return Reason.BAD_CERTIFICATE if self.depth == 0 else Reason.UNTRUSTED_CHAIN

    @property
    def detail(self) -> str:
        return f"{self.rule}: {self.words} (depth {self.depth}: {self.subject})"


Check = Callable[[x509.Certificate, Place], "str | None"]


def _extension(certificate: x509.Certificate, kind: type) -> x509.Extension | None:
    try:
        return certificate.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _is_ca(certificate: x509.Certificate, place: Place) -> bool:
    constraints = place.extension(certificate, x509.BasicConstraints)
    return constraints is not None and constraints.value.ca


# -- the rules -----------------------------------------------------------------------------------


def leaf_key_usage(certificate: x509.Certificate, place: Place) -> str | None:
    """A leaf must not be able to sign certificates or CRLs."""
    if not place.leaf:
        return None
    usage = place.extension(certificate, x509.KeyUsage)
    if usage is None:
        return None
    asserted = [name for name, on in (("keyCertSign", usage.value.key_cert_sign), ("cRLSign", usage.value.crl_sign)) if on]
    return f"leaf keyUsage asserts {' and '.join(asserted)}" if asserted else None


def leaf_ca(certificate: x509.Certificate, place: Place) -> str | None:
    """A leaf must not claim to be a CA."""
    if place.leaf and _is_ca(certificate, place):
        return "leaf has basicConstraints CA:TRUE"
    return None


def serial_number(certificate: x509.Certificate, place: Place) -> str | None:
    """RFC 5280 4.1.2.2: a positive integer of at most 20 octets."""
    serial = certificate.serial_number
    if serial == 0:
        return "serial number is zero"
    if serial < 0:
        return "serial number is negative"
    octets = serial.bit_length() // 8 + 1  # DER: a leading zero octet keeps it positive
    if octets > MAX_SERIAL_OCTETS:
        return f"serial number is {octets} octets long (at most {MAX_SERIAL_OCTETS})"
    return None


def authority_key_id(certificate: x509.Certificate, place: Place) -> str | None:
    """Every certificate but the trust anchor names its issuer's key (RFC 5280 4.2.1.1)."""
    if place.anchor:
        return None
    aki = place.extension(certificate, x509.AuthorityKeyIdentifier)
    if aki is None:
        return "no authorityKeyIdentifier"
    if aki.value.key_identifier is None:
        return "authorityKeyIdentifier has no keyIdentifier"
    return None


def subject_key_id(certificate: x509.Certificate, place: Place) -> str | None:
    """A CA certificate names its own key (RFC 5280 4.2.1.2)."""
    if _is_ca(certificate, place) and place.extension(certificate, x509.SubjectKeyIdentifier) is None:
        return "CA certificate has no subjectKeyIdentifier"
    return None


def root_basic_constraints(certificate: x509.Certificate, place: Place) -> str | None:
    """The trust anchor says it is a CA, in a critical extension."""
    if not place.anchor:
        return None
    constraints = place.extension(certificate, x509.BasicConstraints)
    if constraints is None:
        return "root has no basicConstraints"
    if not constraints.value.ca:
        return "root has basicConstraints CA:FALSE"
    if not constraints.critical:
        return "root basicConstraints is not critical"
    return None


def _extension_name(extension: x509.Extension) -> str:
    kind = type(extension.value).__name__
    oid = extension.oid.dotted_string
    return oid if isinstance(extension.value, x509.UnrecognizedExtension) else f"{kind} ({oid})"


def critical_extension(certificate: x509.Certificate, place: Place) -> str | None:
    """A critical extension nobody here acts on must refuse the certificate (RFC 5280 4.2)."""
    if isinstance(place.extensions, Exception):
        raise place.extensions
    extensions = place.extensions.values() if place.extensions is not None else certificate.extensions
    unknown = [
        _extension_name(extension)
        for extension in extensions  # type: ignore[union-attr]
        if extension.critical and extension.oid not in UNDERSTOOD_CRITICAL
    ]
    return f"critical extension not understood: {', '.join(unknown)}" if unknown else None


def key_type(certificate: x509.Certificate, place: Place) -> str | None:
    """RSA, ECDSA and Ed25519 keys only: no DSA, no Ed448, nothing else."""
    key = place.key(certificate)
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA key"
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        return f"{type(key).__name__.removesuffix('PublicKey') or 'unknown'} key (RSA, ECDSA, Ed25519 only)"
    return None


def rsa_key(certificate: x509.Certificate, place: Place) -> str | None:
    """RSA moduli of at least 2048 bits and a whole number of octets."""
    key = place.key(certificate)
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    if key.key_size < MIN_RSA_BITS:
        return f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})"
    if key.key_size % 8:
        return f"RSA modulus of {key.key_size} bits is not a multiple of 8"
    return None


def ec_curve(certificate: x509.Certificate, place: Place) -> str | None:
    """ECDSA on P-256, P-384 or P-521 only."""
    key = place.key(certificate)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in EC_CURVES:
        return f"EC key on {key.curve.name} (P-256, P-384, P-521 only)"
    return None


RULES: tuple[tuple[str, Check], ...] = (
    ("leaf-key-usage", leaf_key_usage),
    ("leaf-ca", leaf_ca),
    ("serial-number", serial_number),
    ("authority-key-id", authority_key_id),
    ("subject-key-id", subject_key_id),
    ("root-basic-constraints", root_basic_constraints),
    ("critical-extension", critical_extension),
    ("key-type", key_type),
    ("rsa-key", rsa_key),
    ("ec-curve", ec_curve),
)


# -- applying them -------------------------------------------------------------------------------


def _subject(certificate: x509.Certificate) -> str:
    try:
        return certificate.subject.rfc4514_string() or "(empty subject)"
    except Exception:
        return "?"


def iter_problems(path: Sequence[x509.Certificate], *, anchored: bool = True) -> Iterator[Problem]:
    """Every rule each certificate of ``path`` breaks, leaf first, in the order of :data:`RULES`.

    ``anchored`` says the last certificate is a trust anchor; without it no certificate gets the
    anchor's exemptions or duties.
    """
    last = len(path) - 1
    for depth, certificate in enumerate(path):
        try:
            public_key: object = certificate.public_key()
        except Exception as error:  # the key rules report it
            public_key = error
        try:
            extensions: object = {extension.oid: extension for extension in certificate.extensions}
        except Exception as error:  # so do the extension rules
            extensions = error
        place = Place(depth, last, anchored, public_key, extensions)
        for name, check in RULES:
            try:
                words = check(certificate, place)
            except Exception as error:  # an unreadable certificate breaks the rule
                words = f"cannot be checked: {error}"
            if words is not None:
                yield Problem(name, depth, words, _subject(certificate))


def problems(path: Sequence[x509.Certificate], *, anchored: bool = True) -> list[Problem]:
    """All problems of ``path`` (what ``s2sgw explain`` lists)."""
    return list(iter_problems(path, anchored=anchored))


def first_problem(path: Sequence[x509.Certificate]) -> Problem | None:
    """The first problem of ``path``, or None (what a handshake needs: one reason)."""
    return next(iter_problems(path), None)
