"""Certificate paths built to order with ``cryptography``: sound ones, and every way to get one wrong.

A path is described top-down by one :class:`Spec` per certificate (root first, leaf last);
:func:`build` signs each with the key of the one above. Defaults give what the real CA gives
(critical basicConstraints, keyUsage, SKI everywhere, AKI below the root, a SPIFFE ID and a DNS
name on the leaf, both TLS purposes); a test changes one field to break one rule. Keys are made
once per kind and level and reused: some kinds take seconds to generate.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOMAIN = "chains.test"
BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
CA_USAGE = ("key_cert_sign", "crl_sign")
LEAF_USAGE = ("digital_signature",)
_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


@functools.cache
def key(kind: str, slot: int = 0):
    """A private key of ``kind`` (p256, p384, p521, secp224r1, secp256k1, brainpoolP256r1, ed25519,
    ed448, rsa1024, rsa2048, rsa2052, rsa3072, dsa2048); one per ``slot`` (the level in a path)."""
    curves = {
        "p256": ec.SECP256R1,
        "p384": ec.SECP384R1,
        "p521": ec.SECP521R1,
        "secp224r1": ec.SECP224R1,
        "secp256k1": ec.SECP256K1,
        "brainpoolP256r1": ec.BrainpoolP256R1,
    }
    if kind in curves:
        return ec.generate_private_key(curves[kind]())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    if kind.startswith("dsa"):
        return dsa.generate_private_key(int(kind[3:]))
    raise ValueError(kind)


def signature_hash(private_key) -> hashes.HashAlgorithm | None:
    if isinstance(private_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.key_size > 256:
        return hashes.SHA384() if private_key.curve.key_size == 384 else hashes.SHA512()
    return hashes.SHA256()


def sign_bytes(private_key, data: bytes, hash_algorithm: hashes.HashAlgorithm | None) -> bytes:
    """A signature over ``data`` as X.509 carries it, for the key's own scheme."""
    if isinstance(private_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return private_key.sign(data)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(hash_algorithm))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, padding.PKCS1v15(), hash_algorithm)
    return private_key.sign(data, hash_algorithm)


@attrs.frozen
class Spec:
    """One certificate of a path. ``ca=None`` leaves basicConstraints out; ``usage=None`` keyUsage."""

    name: str
    key: str = "p256"
    ca: bool | None = True
    ca_critical: bool = True
    path_length: int | None = None
    usage: tuple[str, ...] | None = CA_USAGE
    ski: bool = True
    ski_critical: bool = False
    aki: str = "key-id"  # "key-id", "none", "issuer-serial" (no key id), "key-id+issuer-serial"
    eku: tuple[x509.ObjectIdentifier, ...] | None = None
    sans: tuple[x509.GeneralName, ...] = ()
    name_constraints: x509.NameConstraints | None = None
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = ()  # (extension, critical)
    serial: bytes | None = None  # raw DER INTEGER contents, written in after signing


def root(name: str = "Root", **changes) -> Spec:
    return Spec(name, aki="none", **changes)


def intermediate(name: str = "Intermediate", **changes) -> Spec:
    return Spec(name, **changes)


def leaf(name: str = "svc", **changes) -> Spec:
    defaults = dict(
        ca=False,
        usage=LEAF_USAGE,
        eku=BOTH,
        sans=(x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/{name}"), x509.DNSName(f"{name}.{DOMAIN}")),
    )
    defaults.update(changes)
    return Spec(name, **defaults)


@attrs.frozen
class Path:
    """A built path: ``chain`` as a peer sends it (leaf, intermediates), its ``root`` and leaf key."""

    chain: tuple[x509.Certificate, ...]
    root: x509.Certificate
    leaf_key: object

    @property
    def full(self) -> list[x509.Certificate]:
        return [*self.chain, self.root]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(names: Sequence[str]) -> x509.KeyUsage:
    return x509.KeyUsage(**{name: name in names for name in _USAGES})


def _certificate(spec: Spec, level: int, issuer: x509.Certificate | None, issuer_key) -> x509.Certificate:
    own_key = key(spec.key, level)
    signer = issuer_key if issuer_key is not None else own_key
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(spec.name))
        .issuer_name(issuer.subject if issuer is not None else _name(spec.name))
        .public_key(own_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if spec.ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length if spec.ca else None),
            critical=spec.ca_critical,
        )
    if spec.usage is not None:
        builder = builder.add_extension(_key_usage(spec.usage), critical=True)
    if spec.ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(own_key.public_key()), critical=spec.ski_critical
        )
    if spec.aki != "none":
        assert issuer is not None or spec.aki == "key-id"
        key_id = x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
        # authorityCertIssuer + serial name the issuer's certificate: by *its* issuer and serial.
        by_name = issuer.issuer if issuer is not None else _name(spec.name)
        serial = issuer.serial_number if issuer is not None else 1
        aki = {
            "key-id": x509.AuthorityKeyIdentifier(key_id, None, None),
            "issuer-serial": x509.AuthorityKeyIdentifier(None, [x509.DirectoryName(by_name)], serial),
            "key-id+issuer-serial": x509.AuthorityKeyIdentifier(key_id, [x509.DirectoryName(by_name)], serial),
        }[spec.aki]
        builder = builder.add_extension(aki, critical=False)
    if spec.eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
    if spec.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(spec.sans)), critical=False)
    if spec.name_constraints is not None:
        builder = builder.add_extension(spec.name_constraints, critical=True)
    for extension, critical in spec.extra:
        builder = builder.add_extension(extension, critical=critical)
    certificate = builder.sign(signer, signature_hash(signer))
    if spec.serial is not None:
        certificate = with_serial(certificate, spec.serial, signer)
    return certificate


def build(*specs: Spec) -> Path:
    """Root first, leaf last; the root self-signed, each other certificate signed by the one above."""
    certificates: list[x509.Certificate] = []
    issuer, issuer_key = None, None
    for level, spec in enumerate(specs):
        certificate = _certificate(spec, level, issuer, issuer_key)
        certificates.append(certificate)
        issuer, issuer_key = certificate, key(spec.key, level)
    return Path(tuple(reversed(certificates[1:])), certificates[0], key(specs[-1].key, len(specs) - 1))


def standard(leaf_kind: str = "p256", ca_kind: str | None = None, **leaf_changes) -> Path:
    """Root -> intermediate -> leaf, all of one key kind unless told otherwise."""
    ca_kind = ca_kind or leaf_kind
    return build(root(key=ca_kind), intermediate(key=ca_kind), leaf(key=leaf_kind, **leaf_changes))


# -- DER surgery for what CertificateBuilder refuses to write ------------------------------------


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    first = data[at + 1]
    start = at + 2
    length = first
    if first & 0x80:
        count = first & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return data[at], start, start + length


def _encode(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _assemble(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    return _encode(0x30, tbs + algorithm + _encode(0x03, b"\x00" + signature))


def with_serial(certificate: x509.Certificate, serial: bytes, signer) -> x509.Certificate:
    """``certificate`` with the serial number's DER contents replaced by ``serial``, signed again."""
    data = certificate.public_bytes(serialization.Encoding.DER)
    _, start, _ = _element(data, 0)
    _, tbs_start, tbs_end = _element(data, start)
    _, _, version_end = _element(data, tbs_start)  # [0] version
    _, _, serial_end = _element(data, version_end)
    body = data[tbs_start:version_end] + _encode(0x02, serial) + data[serial_end:tbs_end]
    tbs = _encode(0x30, body)
    _, _, algorithm_end = _element(data, tbs_end)
    signature = sign_bytes(signer, tbs, certificate.signature_hash_algorithm)
    return x509.load_der_x509_certificate(_assemble(tbs, data[tbs_end:algorithm_end], signature))


def resign_crl(
    crl: x509.CertificateRevocationList,
    signer,
    *,
    inner_hash: hashes.HashAlgorithm,
    outer_hash: hashes.HashAlgorithm,
) -> bytes:
    """``crl`` (DER) signed again with ``outer_hash`` (named outside), ``inner_hash`` named inside.

    With two different hashes the CRL says one algorithm in its signed part and another outside
    (cryptography refuses to load that); with SHA-1 for both it is a CRL cryptography would not sign.
    """
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    oids = {"sha1": "2a8648ce3d0401", "sha256": "2a8648ce3d040302", "sha384": "2a8648ce3d040303", "sha512": "2a8648ce3d040304"}

    def algorithm(hash_algorithm: hashes.HashAlgorithm) -> bytes:
        return _encode(0x30, _encode(0x06, bytes.fromhex(oids[hash_algorithm.name])))

    data = crl.public_bytes(serialization.Encoding.DER)
    _, start, _ = _element(data, 0)
    _, tbs_start, tbs_end = _element(data, start)
    at = tbs_start
    tag, _, after = _element(data, at)
    if tag == 0x02:  # version
        at = after
    _, _, algorithm_end = _element(data, at)
    tbs = _encode(0x30, data[tbs_start:at] + algorithm(inner_hash) + data[algorithm_end:tbs_end])
    signature = signer.sign(tbs, ec.ECDSA(outer_hash))
    return _assemble(tbs, algorithm(outer_hash), signature)
