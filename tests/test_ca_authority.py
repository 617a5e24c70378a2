"""The CA library: what init, issue, revoke and make_crl put on disk and in certificates."""

from __future__ import annotations

import datetime
import itertools
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from s2sgw.ca.authority import (
    CA_FILES,
    KEY_TYPES,
    CAError,
    CertificateAuthority,
    parse_serial,
)

DOMAIN = "example.internal"
NOW = datetime.datetime(2026, 1, 15, 12, 0, 0, tzinfo=datetime.timezone.utc)


@pytest.fixture
def ca(tmp_path: Path, ca_store: str | None) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", DOMAIN, url="http://127.0.0.1:8080", store=ca_store)


@pytest.fixture
def sqlite_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", DOMAIN, url="http://127.0.0.1:8080")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


# -- init ------------------------------------------------------------------------------------


def test_init_writes_every_file_with_keys_readable_only_by_the_owner(sqlite_ca: CertificateAuthority) -> None:
    """A CA directory holds root, intermediate, OCSP signer, bundle and database; keys are 0600."""
    ca = sqlite_ca
    for name in CA_FILES:
        assert (ca.directory / name).is_file(), name
    for name in ("root.key", "intermediate.key", "ocsp.key", "ca.db"):
        assert _mode(ca.directory / name) == 0o600, name
    assert (ca.directory / "bundle.pem").read_bytes() == (ca.directory / "root.pem").read_bytes()
    assert not [p for p in ca.directory.iterdir() if p.name.startswith(".")]


def test_init_builds_a_root_an_intermediate_with_pathlen_zero_and_an_ocsp_signer(
    ca: CertificateAuthority,
) -> None:
    root, intermediate, ocsp = ca.root_cert, ca.intermediate_cert, ca.ocsp_cert
    assert intermediate.issuer == root.subject
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ocsp.issuer == intermediate.subject
    assert ocsp.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    ocsp.extensions.get_extension_for_class(x509.OCSPNoCheck)
    intermediate.verify_directly_issued_by(root)
    ocsp.verify_directly_issued_by(intermediate)
    lifetimes = [(c.not_valid_after_utc - c.not_valid_before_utc).days for c in (root, intermediate, ocsp)]
    assert lifetimes == [3650, 1825, 7]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_key_type_issues_a_chain_openssl_accepts(tmp_path: Path, key_type: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN, key_type=key_type)
    pem, _key = ca.write_identity(ca.issue("web"), tmp_path / "out")
    result = _openssl(
        "verify", "-CAfile", ca.directory / "bundle.pem", "-untrusted", ca.directory / "intermediate.pem", pem
    )
    assert result.returncode == 0, result.stderr
    assert CertificateAuthority.open(ca.directory).key_type == key_type


@pytest.mark.parametrize("domain", ["", "Example.internal", "bad_domain", "-x.internal", "a..b", "x" * 64])
def test_init_refuses_an_invalid_trust_domain_and_writes_nothing(tmp_path: Path, domain: str) -> None:
    with pytest.raises(CAError, match="invalid trust domain"):
        CertificateAuthority.init(tmp_path / "ca", domain)
    assert not (tmp_path / "ca").exists()


def test_init_refuses_a_directory_that_already_holds_a_ca(ca: CertificateAuthority) -> None:
    before = (ca.directory / "root.key").read_bytes()
    with pytest.raises(CAError, match="already holds a CA"):
        CertificateAuthority.init(ca.directory, DOMAIN)
    assert (ca.directory / "root.key").read_bytes() == before


def test_init_into_an_unwritable_place_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CAError):
        CertificateAuthority.init(blocker / "ca", DOMAIN)
    with pytest.raises(CAError, match="not a directory"):
        CertificateAuthority.init(blocker, DOMAIN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- open ------------------------------------------------------------------------------------


def test_open_refuses_a_directory_that_is_not_a_ca(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="not a CA directory"):
        CertificateAuthority.open(tmp_path)
    with pytest.raises(CAError, match="not a directory"):
        CertificateAuthority.open(tmp_path / "missing")


def test_open_refuses_a_missing_ca_key(ca: CertificateAuthority) -> None:
    (ca.directory / "intermediate.key").unlink()
    with pytest.raises(CAError, match="CA key .* is missing"):
        CertificateAuthority.open(ca.directory)


def test_open_refuses_a_corrupted_ca_key(ca: CertificateAuthority) -> None:
    (ca.directory / "intermediate.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(CAError, match="CA key .* is corrupt"):
        CertificateAuthority.open(ca.directory)


def test_open_refuses_a_key_that_does_not_match_its_certificate(ca: CertificateAuthority) -> None:
    (ca.directory / "intermediate.key").write_bytes((ca.directory / "ocsp.key").read_bytes())
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.open(ca.directory)


def test_open_refuses_a_corrupted_database(sqlite_ca: CertificateAuthority) -> None:
    ca = sqlite_ca
    (ca.directory / "ca.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CAError):
        CertificateAuthority.open(ca.directory)


def test_open_reads_back_trust_domain_and_url(ca: CertificateAuthority) -> None:
    again = CertificateAuthority.open(ca.directory)
    assert (again.trust_domain, again.url, again.key_type) == (DOMAIN, "http://127.0.0.1:8080", "ecdsa-p256")


# -- issue -----------------------------------------------------------------------------------


def test_issue_makes_a_leaf_with_the_service_identity(ca: CertificateAuthority) -> None:
    identity = ca.issue("web", dns=["Web.Local"], ips=["127.0.0.1", "::1"], hours=2, now=NOW)
    leaf = x509.load_pem_x509_certificate(identity.chain_pem)
    assert leaf.subject.rfc4514_string() == "CN=web"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.internal/web"]
    assert san.get_values_for_type(x509.DNSName) == ["web", "web.example.internal", "web.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert leaf.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(hours=2)
    leaf.verify_directly_issued_by(ca.intermediate_cert)
    assert 0 < leaf.serial_number < 2**159
    record = identity.record
    assert record.serial == leaf.serial_number and record.name == "web"
    assert record.sans == (
        "URI:spiffe://example.internal/web",
        "DNS:web",
        "DNS:web.example.internal",
        "DNS:web.local",
        "IP:127.0.0.1",
        "IP:::1",
    )
    assert record.state(NOW) == "good"
    assert record.state(NOW + datetime.timedelta(hours=3)) == "expired"
    key = serialization.load_pem_private_key(identity.key_pem, None)
    assert key.public_key() == leaf.public_key()


def test_issue_points_leaves_at_the_configured_url(ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = ca.issue("web").record.certificate()
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in points[0].full_name] == ["http://127.0.0.1:8080/crl"]
    access = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location.value for d in access] == ["http://127.0.0.1:8080/ocsp"]
    plain = CertificateAuthority.init(tmp_path / "plain", DOMAIN)
    plain_leaf = plain.issue("web").record.certificate()
    with pytest.raises(x509.ExtensionNotFound):
        plain_leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Web"}, "invalid service name"),
        ({"name": "-web"}, "invalid service name"),
        ({"name": "we b"}, "invalid service name"),
        ({"name": "web", "dns": ["bad_name"]}, "invalid DNS name"),
        ({"name": "web", "dns": ["a..b"]}, "invalid DNS name"),
        ({"name": "web", "ips": ["300.1.1.1"]}, "invalid IP address"),
        ({"name": "web", "hours": 0}, "positive number of hours"),
        ({"name": "web", "hours": 24 * 365 * 6}, "outlive the issuing CA"),
    ],
)
def test_issue_refuses_bad_input_and_records_nothing(ca: CertificateAuthority, kwargs, message) -> None:
    with pytest.raises(CAError, match=message):
        ca.issue(**kwargs)
    assert ca.records() == []


def test_a_serial_collision_signs_again_with_a_fresh_serial(ca: CertificateAuthority) -> None:
    first = ca.issue("web")
    serials = itertools.chain([first.record.serial, first.record.serial], itertools.count(1000))
    colliding = CertificateAuthority.open(ca.directory)
    colliding.serial_source = lambda: next(serials)
    second = colliding.issue("web")
    assert second.record.serial == 1000
    assert second.record.certificate().serial_number == 1000
    assert {r.serial for r in ca.records()} == {first.record.serial, 1000}


def test_write_identity_writes_the_chain_and_a_private_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    identity = ca.issue("web")
    pem, key = ca.write_identity(identity, tmp_path / "out" / "deeper")
    assert (pem.name, key.name) == ("web.pem", "web.key")
    assert _mode(key) == 0o600
    chain = x509.load_pem_x509_certificates(pem.read_bytes())
    assert [c.subject for c in chain] == [identity.record.certificate().subject, ca.intermediate_cert.subject]
    assert sorted(p.name for p in pem.parent.iterdir()) == ["web.key", "web.pem"]


def test_write_identity_to_an_unwritable_place_raises_ca_error(ca: CertificateAuthority, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CAError, match="cannot"):
        ca.write_identity(ca.issue("web"), blocker)


# -- revoke, records, CRL --------------------------------------------------------------------


def test_revoke_by_name_revokes_every_current_certificate_once(ca: CertificateAuthority) -> None:
    a, b = ca.issue("web"), ca.issue("web")
    other = ca.issue("db")
    marker = ca.change_marker()
    revoked = ca.revoke(name="web", reason="keyCompromise", now=NOW)
    assert {r.serial for r in revoked} == {a.record.serial, b.record.serial}
    assert all(r.reason == "keyCompromise" and r.revoked_at == NOW for r in revoked)
    assert [r.revocation_seq for r in revoked] == [1, 2]
    assert ca.change_marker() != marker
    assert ca.lookup(other.record.serial).state(NOW) == "good"
    assert ca.lookup(a.record.serial).state(NOW) == "revoked"
    with pytest.raises(CAError, match="already revoked"):
        ca.revoke(name="web")
    c = ca.issue("web")
    assert [r.serial for r in ca.revoke(name="web")] == [c.record.serial]
    assert [r.serial for r in ca.revocations_since(2)] == [c.record.serial]


def test_revoke_by_serial_and_its_errors(ca: CertificateAuthority) -> None:
    a = ca.issue("web")
    assert [r.serial for r in ca.revoke(serial=a.record.serial, reason="superseded")] == [a.record.serial]
    with pytest.raises(CAError, match="already revoked"):
        ca.revoke(serial=a.record.serial)
    with pytest.raises(CAError, match="no certificate with serial"):
        ca.revoke(serial=12345)
    with pytest.raises(CAError, match="no certificate was issued to"):
        ca.revoke(name="nobody")
    with pytest.raises(CAError, match="unknown revocation reason"):
        ca.revoke(name="web", reason="bored")
    with pytest.raises(CAError, match="exactly one"):
        ca.revoke()
    with pytest.raises(CAError, match="no certificate with serial"):
        ca.revoke(serial=ca.ocsp_cert.serial_number)


def test_change_marker_moves_on_issue_revoke_and_crl_only(ca: CertificateAuthority) -> None:
    start = ca.change_marker()
    ca.records()
    ca.lookup(1)
    assert ca.change_marker() == start
    ca.issue("web")
    issued = ca.change_marker()
    assert issued != start
    ca.revoke(name="web")
    revoked = ca.change_marker()
    assert revoked not in (start, issued)
    ca.make_crl()  # a CRL number taken: a running server must publish above it
    assert ca.change_marker() not in (start, issued, revoked)
    assert ca.store.crl_number() == 1


def test_crl_numbers_strictly_increase_and_entries_carry_reasons(ca: CertificateAuthority) -> None:
    good = ca.issue("good", now=NOW)
    bad = ca.issue("bad", now=NOW)
    plain = ca.issue("plain", now=NOW)
    ca.revoke(name="bad", reason="keyCompromise", now=NOW)
    ca.revoke(name="plain", now=NOW)
    first = ca.make_crl(now=NOW)
    second = CertificateAuthority.open(ca.directory).make_crl(now=NOW, hours=1)
    numbers = [crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in (first, second)]
    assert numbers[1] > numbers[0] >= 1
    assert first.is_signature_valid(ca.intermediate_cert.public_key())
    assert first.issuer == ca.intermediate_cert.subject
    assert first.last_update_utc == NOW and first.next_update_utc == NOW + datetime.timedelta(hours=24)
    assert second.next_update_utc == NOW + datetime.timedelta(hours=1)
    assert first.get_revoked_certificate_by_serial_number(good.record.serial) is None
    entry = first.get_revoked_certificate_by_serial_number(bad.record.serial)
    assert entry.revocation_date_utc == NOW
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    unspecified = first.get_revoked_certificate_by_serial_number(plain.record.serial)
    assert len(unspecified.extensions) == 0
    with pytest.raises(CAError, match="at most 24"):
        ca.make_crl(hours=25)


def test_crl_leaves_out_revoked_certificates_that_have_expired(ca: CertificateAuthority) -> None:
    old = ca.issue("old", hours=1, now=NOW)
    ca.revoke(name="old", now=NOW)
    later = NOW + datetime.timedelta(hours=2)
    assert ca.make_crl(now=NOW).get_revoked_certificate_by_serial_number(old.record.serial) is not None
    assert ca.make_crl(now=later).get_revoked_certificate_by_serial_number(old.record.serial) is None
    assert ca.make_crl(now=later, keep_expired=True).get_revoked_certificate_by_serial_number(old.record.serial)
    assert ca.lookup(old.record.serial).state(later) == "revoked"


def test_threads_sharing_one_authority_issue_distinct_serials(ca: CertificateAuthority) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        issued = list(pool.map(lambda i: ca.issue(f"svc{i}").record.serial, range(32)))
    assert len(set(issued)) == 32
    assert sorted(r.serial for r in ca.records()) == sorted(issued)


def test_parse_serial_accepts_common_hex_spellings() -> None:
    assert parse_serial("0x1F") == parse_serial("1f") == parse_serial("1F") == 31
    assert parse_serial("0a:ff") == 0xAFF
    for bad in ("zz", "", "0"):
        with pytest.raises(CAError):
            parse_serial(bad)


def test_the_ca_removes_stale_temporaries_of_its_own_writes(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A CA command killed mid-write (``kill -9`` of ``s2sgw ca issue``) may leave a key in a
    temporary: opening the CA removes those in its directory, issuing into a directory removes
    those of the files it writes there."""
    old = 1_000_000
    in_ca = ca.directory / ".intermediate.key.0123456789ab.tmp"
    out = tmp_path / "out"
    out.mkdir()
    in_out = out / ".users.key.0123456789ab.tmp"
    unrelated = out / ".orders.key.0123456789ab.tmp"
    for path in (in_ca, in_out, unrelated):
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----")
        os.utime(path, (old, old))
    reopened = CertificateAuthority.open(ca.directory)
    assert not in_ca.exists()
    reopened.write_identity(reopened.issue("users"), out)
    assert not in_out.exists() and unrelated.exists()
    assert (out / "users.key").exists()
