"""Hostile certificate paths against the product's own TLS contexts, in real in-memory handshakes.

Each case breaks one rule (our rules, the second verifier's, or OpenSSL's own) and must be
refused in both directions: a caller presenting the path to ``tls.server_context`` (inbound) and
a remote presenting it to ``tls.client_context`` (outbound), with the expected reason and a
detail naming the rule. The peer is a bare pyOpenSSL context that presents the path and verifies
nothing. Sound paths of every accepted key type are admitted with their verified chain.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

import attrs
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from OpenSSL import SSL, crypto

from s2sgw import pki, tls
from s2sgw import handshake as facts
from s2sgw.interfaces import Reason
from tests import chainkit as kit
from tests.chainkit import intermediate as inter
from tests.chainkit import leaf, root
from tests.tlshelpers import Pair, connect

UNTRUSTED, BAD = Reason.UNTRUSTED_CHAIN, Reason.BAD_CERTIFICATE
NC, DNS, URI, IP = x509.NameConstraints, x509.DNSName, x509.UniformResourceIdentifier, x509.IPAddress
SPIFFE = URI(f"spiffe://{kit.DOMAIN}/svc")
ANY_POLICY = x509.CertificatePolicies([x509.PolicyInformation(ObjectIdentifier("2.5.29.32.0"), None)])
PRIVATE_OID = ObjectIdentifier("1.3.6.1.4.1.55555.1")
CRYPTOGRAPHY = "second-verifier: validation failed: candidates exhausted: "  # cryptography's words follow
NOT_PERMITTED = CRYPTOGRAPHY + "no permitted name constraints matched SAN"
EXCLUDED = CRYPTOGRAPHY + "excluded name constraint matched SAN"
UNSUPPORTED = CRYPTOGRAPHY + "unsupported name constraint"


def net(text: str) -> IP:
    return IP(ipaddress.ip_network(text))


def address(text: str) -> IP:
    return IP(ipaddress.ip_address(text))


@attrs.frozen
class Case:
    id: str
    make: Callable[[], kit.Path]
    reason: str
    detail: str  # a fragment of the recorded detail
    openssl_accepts: bool = True  # OpenSSL's own verification lets the path through


def bad_leaf(**changes) -> kit.Path:
    return kit.build(root(), inter(), leaf(**changes))


def bad_intermediate(**changes) -> kit.Path:
    return kit.build(root(), inter(**changes), leaf())


def bad_root(**changes) -> kit.Path:
    return kit.build(root(**changes), inter(), leaf())


def constrained(constraints: x509.NameConstraints, *sans: x509.GeneralName, on_root: bool = False,
                ed25519: bool = False) -> kit.Path:
    """A CA (the intermediate, or the root) with ``constraints`` above a leaf with ``sans``."""
    leaf_changes = {"sans": sans} if sans else {}
    specs = (
        root(name_constraints=constraints) if on_root else root(),
        inter() if on_root else inter(name_constraints=constraints),
        leaf(**leaf_changes),
    )
    return ed(*specs) if ed25519 else kit.build(*specs)


def ed(*specs: kit.Spec) -> kit.Path:
    """The same path with Ed25519 keys everywhere: judged by our own validation, not cryptography's."""
    return kit.build(*(attrs.evolve(spec, key="ed25519") for spec in specs))


HOSTILE = [
    # leaf-key-usage
    Case("leaf-keyCertSign", lambda: bad_leaf(usage=("digital_signature", "key_cert_sign")),
         BAD, "leaf-key-usage: leaf keyUsage asserts keyCertSign"),
    Case("leaf-cRLSign", lambda: bad_leaf(usage=("digital_signature", "crl_sign")),
         BAD, "leaf-key-usage: leaf keyUsage asserts cRLSign"),
    Case("leaf-keyCertSign-and-cRLSign", lambda: bad_leaf(usage=("key_cert_sign", "crl_sign", "digital_signature")),
         BAD, "leaf-key-usage: leaf keyUsage asserts keyCertSign and cRLSign"),
    # leaf-ca (the verify callback's leaf check speaks first, with the code it always had)
    Case("leaf-CA-true", lambda: bad_leaf(ca=True),
         BAD, "leaf certificate is a CA (basicConstraints CA:TRUE)"),
    Case("leaf-CA-true-pathlen", lambda: bad_leaf(ca=True, path_length=0, usage=("digital_signature", "key_cert_sign")),
         BAD, "leaf certificate is a CA"),
    # serial-number
    Case("leaf-serial-zero", lambda: bad_leaf(serial=b"\x00"),
         BAD, "serial-number: serial number is zero (depth 0"),
    Case("leaf-serial-negative", lambda: bad_leaf(serial=b"\xff\x01"),
         BAD, "serial-number: serial number is negative (depth 0"),
    Case("leaf-serial-21-octets", lambda: bad_leaf(serial=b"\x01" * 21),
         BAD, "serial-number: serial number is 21 octets long (at most 20)"),
    Case("intermediate-serial-zero", lambda: bad_intermediate(serial=b"\x00"),
         UNTRUSTED, "serial-number: serial number is zero (depth 1"),
    Case("intermediate-serial-21-octets", lambda: bad_intermediate(serial=b"\x7f" * 21),
         UNTRUSTED, "serial-number: serial number is 21 octets long (at most 20) (depth 1"),
    Case("root-serial-negative", lambda: bad_root(serial=b"\x80"),
         UNTRUSTED, "serial-number: serial number is negative (depth 2"),
    # authority-key-id
    Case("leaf-without-AKI", lambda: bad_leaf(aki="none"),
         BAD, "authority-key-id: no authorityKeyIdentifier (depth 0"),
    Case("intermediate-without-AKI", lambda: bad_intermediate(aki="none"),
         UNTRUSTED, "authority-key-id: no authorityKeyIdentifier (depth 1"),
    Case("leaf-AKI-by-issuer-and-serial-only", lambda: bad_leaf(aki="issuer-serial"),
         BAD, "authority-key-id: authorityKeyIdentifier has no keyIdentifier"),
    # subject-key-id
    Case("intermediate-without-SKI", lambda: bad_intermediate(ski=False),
         UNTRUSTED, "subject-key-id: CA certificate has no subjectKeyIdentifier (depth 1"),
    Case("root-without-SKI", lambda: bad_root(ski=False),
         UNTRUSTED, "subject-key-id: CA certificate has no subjectKeyIdentifier (depth 2"),
    # root-basic-constraints
    Case("root-basicConstraints-not-critical", lambda: bad_root(ca_critical=False),
         UNTRUSTED, "root-basic-constraints: root basicConstraints is not critical"),
    Case("root-without-basicConstraints", lambda: bad_root(ca=None),
         UNTRUSTED, "root-basic-constraints: root has no basicConstraints"),
    # critical-extension
    Case("intermediate-critical-certificatePolicies", lambda: bad_intermediate(extra=((ANY_POLICY, True),)),
         UNTRUSTED, "critical-extension: critical extension not understood: CertificatePolicies (2.5.29.32)"),
    Case("leaf-critical-certificatePolicies", lambda: bad_leaf(extra=((ANY_POLICY, True),)),
         BAD, "critical-extension: critical extension not understood: CertificatePolicies"),
    Case("intermediate-critical-policyConstraints", lambda: bad_intermediate(extra=((x509.PolicyConstraints(0, None), True),)),
         UNTRUSTED, "critical-extension: critical extension not understood: PolicyConstraints (2.5.29.36)"),
    Case("intermediate-critical-inhibitAnyPolicy", lambda: bad_intermediate(extra=((x509.InhibitAnyPolicy(0), True),)),
         UNTRUSTED, "critical-extension: critical extension not understood: InhibitAnyPolicy (2.5.29.54)"),
    Case("leaf-critical-private-extension", lambda: bad_leaf(extra=((x509.UnrecognizedExtension(PRIVATE_OID, b"\x05\x00"), True),)),
         BAD, "unhandled critical extension", openssl_accepts=False),
    Case("leaf-critical-subjectKeyIdentifier", lambda: bad_leaf(ski_critical=True),
         BAD, "unhandled critical extension", openssl_accepts=False),
    # key-type
    Case("intermediate-DSA", lambda: bad_intermediate(key="dsa2048"),
         UNTRUSTED, "key-type: DSA key (depth 1"),
    Case("root-DSA", lambda: bad_root(key="dsa2048"),
         UNTRUSTED, "key-type: DSA key (depth 2"),
    Case("intermediate-Ed448", lambda: bad_intermediate(key="ed448"),
         UNTRUSTED, "key-type: Ed448 key (RSA, ECDSA, Ed25519 only)"),
    # rsa-key
    Case("intermediate-RSA-2052", lambda: bad_intermediate(key="rsa2052"),
         UNTRUSTED, "rsa-key: RSA modulus of 2052 bits is not a multiple of 8 (depth 1"),
    Case("root-RSA-2052", lambda: bad_root(key="rsa2052"),
         UNTRUSTED, "rsa-key: RSA modulus of 2052 bits is not a multiple of 8 (depth 2"),
    Case("leaf-RSA-2052", lambda: bad_leaf(key="rsa2052"),
         BAD, "rsa-key: RSA modulus of 2052 bits is not a multiple of 8 (depth 0"),
    Case("intermediate-RSA-1024", lambda: bad_intermediate(key="rsa1024"),
         UNTRUSTED, "CA certificate key too weak", openssl_accepts=False),
    # ec-curve
    Case("intermediate-secp256k1", lambda: bad_intermediate(key="secp256k1"),
         UNTRUSTED, "ec-curve: EC key on secp256k1 (P-256, P-384, P-521 only) (depth 1"),
    Case("intermediate-brainpoolP256r1", lambda: bad_intermediate(key="brainpoolP256r1"),
         UNTRUSTED, "ec-curve: EC key on brainpoolP256r1"),
    Case("intermediate-P-224", lambda: bad_intermediate(key="secp224r1"),
         UNTRUSTED, "ec-curve: EC key on secp224r1"),
    Case("root-secp256k1", lambda: bad_root(key="secp256k1"),
         UNTRUSTED, "ec-curve: EC key on secp256k1 (P-256, P-384, P-521 only) (depth 2"),
    # name constraints: OpenSSL refuses violations too, but only after the verify callback's last
    # call, where the second verifier (cryptography) has already refused; a URI constraint is
    # refused even when the leaf keeps it, since cryptography does not evaluate URI constraints
    Case("name-constraint-DNS-permitted", lambda: constrained(NC([DNS("example.org")], None), DNS("svc.evil.org")),
         UNTRUSTED, NOT_PERMITTED, openssl_accepts=False),
    Case("name-constraint-DNS-excluded", lambda: constrained(NC(None, [DNS("evil.org")]), DNS("a.evil.org")),
         UNTRUSTED, EXCLUDED, openssl_accepts=False),
    Case("name-constraint-DNS-on-the-root", lambda: constrained(NC([DNS("example.org")], None), DNS("svc.chains.test"), on_root=True),
         UNTRUSTED, NOT_PERMITTED, openssl_accepts=False),
    Case("name-constraint-URI-permitted", lambda: constrained(NC([URI("chains.test")], None), URI("spiffe://evil.test/svc")),
         UNTRUSTED, UNSUPPORTED, openssl_accepts=False),
    Case("name-constraint-URI-excluded", lambda: constrained(NC(None, [URI("evil.test")]), URI("spiffe://evil.test/svc")),
         UNTRUSTED, UNSUPPORTED, openssl_accepts=False),
    Case("name-constraint-URI-kept", lambda: constrained(NC([URI("chains.test")], None)),
         UNTRUSTED, UNSUPPORTED),
    Case("name-constraint-IPv4-permitted", lambda: constrained(NC([net("10.0.0.0/8")], None), SPIFFE, address("192.0.2.1")),
         UNTRUSTED, NOT_PERMITTED, openssl_accepts=False),
    Case("name-constraint-IPv4-excluded", lambda: constrained(NC(None, [net("192.0.2.0/24")]), SPIFFE, address("192.0.2.1")),
         UNTRUSTED, EXCLUDED, openssl_accepts=False),
    Case("name-constraint-IPv6-permitted", lambda: constrained(NC([net("fd00::/8")], None), SPIFFE, address("2001:db8::1")),
         UNTRUSTED, NOT_PERMITTED, openssl_accepts=False),
    # what else the second verifier refuses and OpenSSL lets through
    Case("intermediate-without-keyUsage", lambda: bad_intermediate(usage=None),
         UNTRUSTED, f"{CRYPTOGRAPHY}invalid extension: 2.5.29.15: Certificate is missing required extension"),
    Case("intermediate-basicConstraints-not-critical", lambda: bad_intermediate(ca_critical=False),
         UNTRUSTED, f"{CRYPTOGRAPHY}invalid extension: 2.5.29.19: Certificate extension has incorrect criticality"),
    # what OpenSSL refuses first
    Case("intermediate-pathLen-exceeded", lambda: kit.build(root(), inter("I1", path_length=0), inter("I2"), leaf()),
         UNTRUSTED, "path length constraint exceeded (depth 2: CN=I1)", openssl_accepts=False),
    Case("intermediate-keyUsage-without-keyCertSign", lambda: bad_intermediate(usage=("digital_signature",)),
         UNTRUSTED, "invalid CA certificate (error 79) (depth 1", openssl_accepts=False),
    Case("intermediate-CA-false", lambda: bad_intermediate(ca=False),
         UNTRUSTED, "invalid CA certificate (error 79) (depth 1", openssl_accepts=False),
    Case("intermediate-EKU-emailProtection-only", lambda: bad_intermediate(eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,)),
         BAD, "unsuitable certificate purpose (depth 1", openssl_accepts=False),
    # Ed25519 paths: our own validation stands in for cryptography's, which refuses Ed25519
    Case("ed25519-name-constraint-DNS", lambda: constrained(NC([DNS("example.org")], None), DNS("svc.evil.org"), ed25519=True),
         UNTRUSTED, "second-verifier: no permitted name constraint matches svc.evil.org (depth 1: CN=Intermediate)",
         openssl_accepts=False),
    Case("ed25519-name-constraint-DNS-excluded", lambda: constrained(NC(None, [DNS("chains.test")]), ed25519=True),
         UNTRUSTED, "second-verifier: excluded name constraint matches svc.chains.test", openssl_accepts=False),
    Case("ed25519-name-constraint-URI", lambda: constrained(NC([URI("chains.test")], None), ed25519=True),
         UNTRUSTED, "second-verifier: unsupported name constraint (UniformResourceIdentifier)"),
    Case("ed25519-name-constraint-IP", lambda: constrained(NC([net("10.0.0.0/8")], None), SPIFFE, address("192.0.2.1"), ed25519=True),
         UNTRUSTED, "second-verifier: no permitted name constraint matches 192.0.2.1", openssl_accepts=False),
    Case("ed25519-intermediate-without-keyUsage", lambda: ed(root(), inter(usage=None), leaf()),
         UNTRUSTED, "second-verifier: CA keyUsage lacks keyCertSign (depth 1"),
    Case("ed25519-intermediate-basicConstraints-not-critical", lambda: ed(root(), inter(ca_critical=False), leaf()),
         UNTRUSTED, "second-verifier: CA basicConstraints is not critical (depth 1"),
    Case("ed25519-leaf-without-AKI", lambda: ed(root(), inter(), leaf(aki="none")),
         BAD, "authority-key-id: no authorityKeyIdentifier (depth 0"),
]

SOUND = {
    "P-256": lambda: kit.standard("p256"),
    "P-384": lambda: kit.standard("p384"),
    "P-521": lambda: kit.standard("p521"),
    "Ed25519": lambda: kit.standard("ed25519"),
    "RSA-3072": lambda: kit.standard("rsa3072"),
    "two-intermediates": lambda: kit.build(root(), inter("I1"), inter("I2"), leaf()),
    "RSA-root-P-384-intermediate-P-256-leaf": lambda: kit.build(root(key="rsa3072"), inter(key="p384"), leaf()),
    "DNS-name-constraint-kept": lambda: bad_intermediate(name_constraints=NC([DNS(kit.DOMAIN)], None)),
    "Ed25519-DNS-name-constraint-kept": lambda: ed(root(), inter(name_constraints=NC([DNS(kit.DOMAIN)], None)), leaf()),
}


@functools.cache
def path_of(case_id: str) -> kit.Path:
    for case in HOSTILE:
        if case.id == case_id:
            return case.make()
    return SOUND[case_id]()


@functools.cache
def own() -> kit.Path:
    """Our side's identity: what it presents does not matter to the peer, which verifies nothing."""
    return kit.standard("p256")


def bare_peer(path: kit.Path) -> SSL.Context:
    """A peer that presents ``path`` and nothing else: it verifies nothing and allows any key size."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.use_certificate(crypto.X509.from_cryptography(path.chain[0]))
    for certificate in path.chain[1:]:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(certificate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(path.leaf_key))
    return context


def handshake(path: kit.Path, direction: str) -> tuple[Pair, object]:
    """(pair, our TLS protocol): ``path`` presented to our server (inbound) or our client (outbound)."""
    ours = own()
    if direction == "inbound":
        server = tls.server_context(ours.chain, ours.leaf_key, [path.root])
        pair = connect(
            tls.ServerConnectionCreator(lambda: server),
            tls.ClientConnectionCreator(lambda: bare_peer(path), "svc"),
        )
        return pair, pair.server_tls
    client = tls.client_context(ours.chain, ours.leaf_key, [path.root])
    pair = connect(
        tls.ServerConnectionCreator(lambda: bare_peer(path)),
        tls.ClientConnectionCreator(lambda: client, "svc"),
    )
    return pair, pair.client_tls


def test_the_table_holds_at_least_forty_hostile_paths_and_each_rule() -> None:
    assert len(HOSTILE) >= 40
    assert len({case.id for case in HOSTILE}) == len(HOSTILE)
    named = {case.detail.split(":")[0] for case in HOSTILE}
    for rule in ("leaf-key-usage", "serial-number", "authority-key-id", "subject-key-id", "root-basic-constraints",
                 "critical-extension", "key-type", "rsa-key", "ec-curve", "second-verifier"):
        assert rule in named, rule


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.id)
def test_a_hostile_path_is_refused_in_the_handshake_with_its_rule(case: Case, direction: str) -> None:
    """The handshake never completes on our side, and the recorded reason names the rule."""
    pair, ours = handshake(path_of(case.id), direction)
    recorder = pair.server if direction == "inbound" else pair.client
    assert not recorder.completed
    reason, detail = facts.handshake_failure(ours, recorder.lost)
    assert reason == case.reason and case.detail in detail, (reason, detail)


@pytest.mark.parametrize("case", [c for c in HOSTILE if c.openssl_accepts], ids=lambda case: case.id)
def test_openssl_alone_would_have_accepted_the_paths_our_checks_refuse(case: Case) -> None:
    """Why the rules exist: OpenSSL's own path validation lets each of these through."""
    path = path_of(case.id)
    pki.verify_chain(list(path.chain), [path.root])


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("name", sorted(SOUND))
def test_a_sound_path_is_admitted_with_its_verified_chain(name: str, direction: str) -> None:
    path = path_of(name)
    pair, ours = handshake(path, direction)
    assert pair.server.completed and pair.client.completed, facts.chain_error(ours)
    assert facts.chain_error(ours) is None
    assert facts.peer_chain(ours) == path.full


def test_an_outbound_refusal_comes_before_our_certificate_is_sent() -> None:
    """The remote asks for our certificate, yet never receives it: we refuse its chain first."""
    path = path_of("leaf-keyCertSign")
    remote = bare_peer(path)
    received: list[int] = []
    remote.set_verify(SSL.VERIFY_PEER, lambda connection, certificate, errno, depth, ok: received.append(depth) or True)
    ours = own()
    client = tls.client_context(ours.chain, ours.leaf_key, [path.root])
    pair = connect(tls.ServerConnectionCreator(lambda: remote), tls.ClientConnectionCreator(lambda: client, "svc"))
    assert not pair.client.completed and not pair.server.completed
    assert facts.chain_error(pair.client_tls)[0] == BAD  # type: ignore[index]
    assert received == []  # the remote's verify callback never saw a certificate of ours
