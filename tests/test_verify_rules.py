"""The pieces of the second verifier, one by one: rules, DER reading, our own path validation,
and the fail-closed behaviour of the strict verifier and of the verify callback."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from s2sgw import tls
from s2sgw.interfaces import Reason
from s2sgw.verify import der, paths, rules
from s2sgw.verify.strict import StrictVerifier
from tests import chainkit as kit

CLIENT_AUTH, SERVER_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


def test_every_rule_a_path_breaks_is_listed_leaf_first() -> None:
    path = kit.build(
        kit.root(ski=False),
        kit.intermediate(key="secp256k1"),
        kit.leaf(usage=("digital_signature", "key_cert_sign"), aki="none", serial=b"\x00"),
    )
    found = [(p.rule, p.depth, p.reason) for p in rules.problems(path.full)]
    assert found == [
        ("leaf-key-usage", 0, Reason.BAD_CERTIFICATE),
        ("serial-number", 0, Reason.BAD_CERTIFICATE),
        ("authority-key-id", 0, Reason.BAD_CERTIFICATE),
        ("ec-curve", 1, Reason.UNTRUSTED_CHAIN),
        ("subject-key-id", 2, Reason.UNTRUSTED_CHAIN),
    ]
    assert rules.first_problem(path.full) == rules.problems(path.full)[0]
    assert rules.problems(path.full)[0].detail == "leaf-key-usage: leaf keyUsage asserts keyCertSign (depth 0: CN=svc)"


def test_a_sound_path_breaks_no_rule() -> None:
    for kind in ("p256", "p384", "p521", "ed25519", "rsa3072"):
        assert rules.problems(kit.standard(kind).full) == [], kind


def test_without_a_trust_anchor_the_top_gets_no_exemption() -> None:
    """``explain`` on a chain that does not verify: the last certificate is not treated as a root."""
    path = kit.standard()
    assert rules.problems([*path.chain, path.root], anchored=False)[0].rule == "authority-key-id"


def test_a_certificate_a_rule_cannot_read_breaks_that_rule() -> None:
    class Unreadable:
        subject = x509.Name([])

        @property
        def extensions(self):
            raise ValueError("duplicate extension")

        serial_number = 1

        def public_key(self):
            raise ValueError("unsupported key")

    found = rules.problems([Unreadable()])  # type: ignore[list-item]
    assert {p.rule for p in found} >= {"leaf-key-usage", "critical-extension", "key-type"}
    assert all("cannot be checked" in p.words for p in found)


def test_der_reads_the_algorithm_inside_and_outside_the_signature() -> None:
    path = kit.standard()
    inner, outer = der.signature_algorithms(path.chain[0].public_bytes(serialization.Encoding.DER))
    assert inner == outer and inner.startswith(b"\x30")
    key = kit.key("p256", 1)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(path.chain[1].subject)
        .last_update(datetime.datetime.now(datetime.UTC))
        .next_update(datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    inner, outer = der.signature_algorithms(crl.public_bytes(serialization.Encoding.DER))
    assert inner == outer
    odd = kit.resign_crl(crl, key, inner_hash=hashes.SHA384(), outer_hash=hashes.SHA256())
    inner, outer = der.signature_algorithms(odd)
    assert inner != outer
    with pytest.raises(der.DERError):
        der.signature_algorithms(b"\x30\x05\x02\x01")


@pytest.mark.parametrize(
    ("name", "base", "within"),
    [
        ("a.example.org", "example.org", True),
        ("example.org", "example.org", True),
        ("EXAMPLE.org.", "example.ORG", True),
        ("badexample.org", "example.org", False),
        ("example.org", ".example.org", False),
        ("a.example.org", ".example.org", True),
        ("anything", "", True),
    ],
)
def test_dns_name_constraints_add_labels_on_the_left_only(name: str, base: str, within: bool) -> None:
    assert paths._dns_within(name, base) is within


def test_ip_name_constraints_compare_within_one_address_family() -> None:
    network = x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))
    assert paths._within(x509.IPAddress(ipaddress.ip_address("10.1.2.3")), network)
    assert not paths._within(x509.IPAddress(ipaddress.ip_address("::ffff:10.1.2.3")), network)
    assert not paths._within(x509.DNSName("10.1.2.3"), network)


def test_own_validation_runs_only_for_paths_cryptography_refuses() -> None:
    assert paths.needs_own_validation(kit.standard("ed25519").full)
    assert paths.needs_own_validation(kit.build(kit.root(), kit.intermediate(), kit.leaf(key="ed25519")).full)
    assert not paths.needs_own_validation(kit.standard("p384").full)


def test_own_validation_checks_time_anchor_signatures_and_purpose() -> None:
    path = kit.standard("ed25519")
    now = datetime.datetime.now(datetime.UTC)
    roots = [path.root]
    assert paths.validate(path.full, roots, CLIENT_AUTH, now, 6) is None
    later = now + datetime.timedelta(days=30)
    assert "expired at" in paths.validate(path.full, roots, CLIENT_AUTH, later, 6)
    other = kit.build(kit.root("Other", key="ed25519"), kit.intermediate(key="ed25519"), kit.leaf(key="ed25519"))
    assert paths.validate(path.full, [other.root], CLIENT_AUTH, now, 6) == "the path does not end in a trusted root"
    spliced = [path.chain[0], other.chain[1], path.root]
    assert "not signed by the next certificate" in paths.validate(spliced, [path.root], CLIENT_AUTH, now, 6)
    server_only = kit.build(kit.root(key="ed25519"), kit.intermediate(key="ed25519"), kit.leaf(key="ed25519", eku=(SERVER_AUTH,)))
    assert "lacks the purpose" in paths.validate(server_only.full, [server_only.root], CLIENT_AUTH, now, 6)
    assert paths.validate(path.full, roots, CLIENT_AUTH, now, 0) == "1 intermediates (at most 0)"
    assert paths.validate([path.chain[0]], roots, CLIENT_AUTH, now, 6) == "no trust anchor above the leaf"


def test_the_strict_verifier_fails_closed() -> None:
    path = kit.standard()
    verifier = StrictVerifier([path.root], CLIENT_AUTH, 6)
    assert verifier.check(path.full) is None
    assert verifier.check([]) == (Reason.UNTRUSTED_CHAIN, "second-verifier: empty path")
    odd = StrictVerifier([path.root], ExtendedKeyUsageOID.CODE_SIGNING, 6)
    reason, detail = odd.check(path.full)
    assert reason == Reason.UNTRUSTED_CHAIN and "no verifier profile" in detail
    with pytest.raises(ValueError):
        StrictVerifier([], CLIENT_AUTH, 6)


def test_the_second_verifier_refuses_a_remote_without_server_auth() -> None:
    path = kit.build(kit.root(), kit.intermediate(), kit.leaf(eku=(CLIENT_AUTH,)))
    assert StrictVerifier([path.root], CLIENT_AUTH, 6).second_opinion(path.full) is None
    refusal = StrictVerifier([path.root], SERVER_AUTH, 6).second_opinion(path.full)
    assert refusal is not None and "leaf extendedKeyUsage lacks serverAuth" in refusal
    restricted = kit.build(kit.root(), kit.intermediate(eku=(CLIENT_AUTH,)), kit.leaf())
    refusal = StrictVerifier([restricted.root], SERVER_AUTH, 6).second_opinion(restricted.full)
    assert refusal is not None and "CA extendedKeyUsage excludes serverAuth" in refusal


def test_the_second_verifier_judges_at_the_clock_and_rebuilds_once_a_second() -> None:
    path = kit.standard()
    now = [float(int(datetime.datetime.now(datetime.UTC).timestamp())) + 0.1]
    verifier = StrictVerifier([path.root], CLIENT_AUTH, 6, clock=lambda: now[0])
    assert verifier.second_opinion(path.full) is None
    built = verifier._verifier
    now[0] += 0.5
    assert verifier.second_opinion(path.full) is None and verifier._verifier is built
    now[0] += 10 * 86400
    assert verifier.second_opinion(path.full) is not None  # the certificates have expired by then
    assert verifier._verifier is not built


class _Connection:
    def __init__(self) -> None:
        self.target = type("Target", (), {})()

    def get_app_data(self):
        return self.target


class _Certificate:
    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate = certificate

    def to_cryptography(self) -> x509.Certificate:
        return self.certificate


def test_the_verify_callback_refuses_a_path_with_a_gap() -> None:
    path = kit.standard()
    verifier = tls._Verifier(CLIENT_AUTH, StrictVerifier([path.root], CLIENT_AUTH, 6))
    connection = _Connection()
    assert verifier(connection, _Certificate(path.root), 0, 2, 1)  # type: ignore[arg-type]
    assert not verifier(connection, _Certificate(path.chain[0]), 0, 0, 1)  # type: ignore[arg-type]
    assert getattr(connection.target, tls.CHAIN_ERROR) == Reason.UNTRUSTED_CHAIN
    assert "incomplete path from OpenSSL (depths [0, 2])" in getattr(connection.target, tls.CHAIN_ERROR_DETAIL)


def test_the_verify_callback_accepts_the_whole_path_and_forgets_it() -> None:
    path = kit.standard()
    verifier = tls._Verifier(CLIENT_AUTH, StrictVerifier([path.root], CLIENT_AUTH, 6))
    connection = _Connection()
    for depth, certificate in ((2, path.root), (1, path.chain[1]), (0, path.chain[0])):
        assert verifier(connection, _Certificate(certificate), 0, depth, 1)  # type: ignore[arg-type]
    assert getattr(connection.target, tls.CHAIN_ERROR, None) is None
    assert connection not in verifier._paths


def test_an_accepted_path_is_remembered_while_every_certificate_is_valid(monkeypatch) -> None:
    path = kit.standard()
    now = [datetime.datetime.now(datetime.UTC).timestamp()]
    verifier = StrictVerifier([path.root], CLIENT_AUTH, 6, clock=lambda: now[0])
    asked: list[int] = []
    real = StrictVerifier.second_opinion
    monkeypatch.setattr(StrictVerifier, "second_opinion", lambda self, p: asked.append(1) or real(self, p))
    assert verifier.check(path.full) is None and verifier.check(path.full) is None
    assert len(asked) == 1  # the second time, the remembered verdict answered
    fresh = [x509.load_der_x509_certificate(c.public_bytes(serialization.Encoding.DER)) for c in path.full]
    assert verifier.check(fresh) is None and len(asked) == 1  # the same bytes, other objects
    assert verifier.check(path.full[:1] + path.full[1:]) is None
    now[0] = min(c.not_valid_after_utc for c in path.full).timestamp() + 1
    assert verifier.check(path.full) is not None and len(asked) == 2  # past a notAfter: judged again


def test_refusals_are_never_remembered_and_memory_is_bounded(monkeypatch) -> None:
    from s2sgw.verify import strict

    bad = kit.build(kit.root(), kit.intermediate(usage=None), kit.leaf())
    verifier = StrictVerifier([bad.root], CLIENT_AUTH, 6)
    assert verifier.check(bad.full) is not None and verifier.check(bad.full) is not None
    assert verifier._accepted == {}
    monkeypatch.setattr(strict, "REMEMBERED", 2)
    root = kit.build(kit.root(), kit.intermediate(), kit.leaf())
    verifier = StrictVerifier([root.root], CLIENT_AUTH, 6)
    keys = []
    for n in range(3):  # chainkit reuses keys per level: these leaves chain to ``root`` too
        same_root = [kit.build(kit.root(), kit.intermediate(), kit.leaf(f"svc{n}")).chain[0], root.chain[1], root.root]
        assert verifier.check(same_root) is None
        keys.append(strict._path_key(same_root))
    assert list(verifier._accepted) == keys[1:]  # the oldest was forgotten


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa3072", "ed25519"])
def test_what_the_real_ca_issues_passes_every_rule_and_both_verifiers(tmp_path, key_type: str) -> None:
    """Gateways refuse nothing our own CA makes, whatever its key type."""
    from s2sgw import pki
    from s2sgw.ca.authority import CertificateAuthority

    ca = CertificateAuthority.init(tmp_path / key_type, "example.test", key_type=key_type)
    path = [*pki.parse_certificates(ca.issue("orders").chain_pem), ca.root_cert]
    for usage in (CLIENT_AUTH, SERVER_AUTH):
        assert StrictVerifier([ca.root_cert], usage, 6).problems(path) == []
