"""The offline root: ``ca init --root-key-out``, ``ca intermediate`` and ``ca crl --root``."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from s2sgw import cli
from s2sgw.ca import tap
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.store import CAError
from tests.doubles import make_harness

DOMAIN = "example.internal"


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, Path]:
    """A CA directory made with --root-key-out, and where its root key went."""
    ca_dir, root_key = tmp_path / "ca", tmp_path / "offline" / "root.key"
    root_key.parent.mkdir()
    assert run("ca", "init", "--dir", ca_dir, "--trust-domain", DOMAIN, "--root-key-out", root_key) == 0
    return ca_dir, root_key


def _secrets_of(key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    """Byte strings any copy of the key would contain, whatever its encoding."""
    scalar = key.private_numbers().private_value
    raw = scalar.to_bytes((key.curve.key_size + 7) // 8, "big")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    traditional = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    pem_body = b"".join(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .splitlines()[1:-1]
    )
    return [raw, der, traditional, pem_body, raw.hex().encode(), raw.hex().upper().encode()]


def test_no_file_under_the_ca_directory_holds_the_root_key(offline: tuple[Path, Path], tmp_path: Path) -> None:
    """Compared by key material (the private scalar in every common encoding), not by file name."""
    ca_dir, root_key_path = offline
    root_key = serialization.load_pem_private_key(root_key_path.read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    root_cert = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
    assert root_key.public_key() == root_cert.public_key()
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out") == 0
    assert run("ca", "revoke", "--dir", ca_dir, "web") == 0
    assert run("ca", "crl", "--dir", ca_dir, "--out", tmp_path / "crl.der") == 0
    secrets = _secrets_of(root_key)
    files = [p for p in ca_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"intermediate.key", "ocsp.key", "ca.db", "bundle.pem"}
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{path} holds the root key"
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, None)
            assert key.public_key() != root_cert.public_key(), f"{path} is the root key"


def test_server_issue_revoke_and_crl_work_without_the_root_key(offline: tuple[Path, Path], tmp_path: Path) -> None:
    ca_dir, _ = offline
    options = tap.Options()
    options.parseOptions(["--dir", str(ca_dir)])  # the server opens the directory
    assert run("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out") == 0
    ca = CertificateAuthority.open(ca_dir)
    leaf = x509.load_pem_x509_certificate((tmp_path / "out" / "web.pem").read_bytes())
    h = make_harness(ca)
    try:
        _, answer = h.post(h.request(leaf))
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert run("ca", "revoke", "--dir", ca_dir, "web") == 0
        h.clock.advance(0.25)
        _, answer = h.post(h.request(leaf))
        assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
        crl = x509.load_der_x509_crl(h.fetch("GET", "/crl")[1])
        assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    finally:
        h.watcher.stopService()


def test_root_key_out_inside_the_directory_or_over_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="outside the CA directory"):
        CertificateAuthority.init(tmp_path / "ca", DOMAIN, root_key_out=tmp_path / "ca" / "keys" / "root.key")
    existing = tmp_path / "root.key"
    existing.write_bytes(b"precious")
    with pytest.raises(CAError, match="never overwritten"):
        CertificateAuthority.init(tmp_path / "ca2", DOMAIN, root_key_out=existing)
    assert existing.read_bytes() == b"precious"
    assert not (tmp_path / "ca2").exists()


def test_new_intermediate_signs_new_leaves_and_the_old_one_still_answers(
    offline: tuple[Path, Path], tmp_path: Path
) -> None:
    ca_dir, root_key = offline
    ca = CertificateAuthority.open(ca_dir)
    old_leaf = ca.issue("old").record.certificate()
    old_intermediate = ca.intermediate_cert
    assert run("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key) == 0

    ca = CertificateAuthority.open(ca_dir)
    assert ca.intermediate_cert != old_intermediate
    assert ca.intermediate_cert.subject != old_intermediate.subject  # one CRL per issuer name
    ca.intermediate_cert.verify_directly_issued_by(ca.root_cert)
    assert [p.cert for p in ca.previous] == [old_intermediate]
    new_leaf = ca.issue("new").record.certificate()
    new_leaf.verify_directly_issued_by(ca.intermediate_cert)
    ca.ocsp_cert.verify_directly_issued_by(ca.intermediate_cert)

    h = make_harness(ca)
    try:
        for leaf, issuer in ((old_leaf, old_intermediate), (new_leaf, ca.intermediate_cert)):
            _, answer = h.post(_request(leaf, issuer))
            assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
            signer = answer.certificates[0]
            signer.verify_directly_issued_by(issuer)  # each answered by its own issuer's signer
    finally:
        h.watcher.stopService()


def _request(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import hashes

    return ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER
    )


def test_retire_refuses_while_leaves_live_then_forgets_the_old_intermediate(
    offline: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, root_key = offline
    ca = CertificateAuthority.open(ca_dir)
    ca.issue("old")
    old = ca.intermediate_cert.serial_number
    assert run("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key) == 0
    assert run("ca", "intermediate", "--dir", ca_dir, "--retire", format(old, "x")) == 1
    assert "1 unexpired leaves" in capsys.readouterr().err
    ca.revoke(name="old")
    assert run("ca", "intermediate", "--dir", ca_dir, "--retire", format(old, "x")) == 0
    assert CertificateAuthority.open(ca_dir).previous == ()
    assert not any((ca_dir / "previous").iterdir())


def test_root_crl_revokes_an_intermediate_and_the_server_publishes_it(
    offline: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, root_key = offline
    ca = CertificateAuthority.open(ca_dir)
    old = ca.intermediate_cert
    h = make_harness(ca)
    try:
        assert h.fetch("GET", "/root.crl")[0].code == 404  # none made yet
        served = x509.load_der_x509_crl(h.fetch("GET", "/crl")[1])
        hex_serial = format(old.serial_number, "x")
        # The current issuing CA cannot be revoked: the online CA would go on signing with it.
        assert run("ca", "crl", "--dir", ca_dir, "--root", root_key, "--revoke-intermediate", hex_serial) == 1
        assert "current issuing CA" in capsys.readouterr().err
        assert run("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key) == 0
        assert run("ca", "crl", "--dir", ca_dir, "--root", root_key, "--revoke-intermediate", hex_serial,
                   "--reason", "keyCompromise", "--out", tmp_path / "root.crl") == 0
        crl = x509.load_der_x509_crl((tmp_path / "root.crl").read_bytes())
        assert crl.issuer == ca.root_cert.subject and crl.is_signature_valid(ca.root_cert.public_key())
        entry = crl.get_revoked_certificate_by_serial_number(old.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert number > served.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # one sequence
        assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=30)

        h.clock.advance(1.0)  # the refresh loop notices the file
        response, der = h.fetch("GET", "/root.crl")
        assert response.code == 200 and der == (ca_dir / "root.crl").read_bytes() == (tmp_path / "root.crl").read_bytes()
    finally:
        h.watcher.stopService()


def test_root_crl_needs_the_matching_root_key(offline: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    ca_dir, _ = offline
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert run("ca", "crl", "--dir", ca_dir, "--root", other) == 1
    assert "does not match its certificate" in capsys.readouterr().err
    assert not (ca_dir / "root.crl").exists()


def test_running_server_takes_in_a_new_intermediate_without_a_restart(offline: tuple[Path, Path]) -> None:
    """After ``ca intermediate`` the running server's CA signs under the new issuing CA, answers
    for leaves of both, and the feed speaks for the new one."""
    from s2sgw.ca.issuing_reload import IssuingReload, issuing_stamp
    from s2sgw.wire.feed import open_document
    from tests.doubles import BASE, result_of

    ca_dir, root_key = offline
    ca = CertificateAuthority.open(ca_dir)
    old_intermediate = ca.intermediate_cert
    old_leaf = ca.issue("old").record.certificate()
    h = make_harness(ca)
    h.publisher.issuing_reload = IssuingReload(h.publisher, issuing_stamp(ca_dir))
    try:
        h.clock.advance(1.0)
        assert h.publisher.issuing_reload.reloads == 0  # nothing changed yet
        assert run("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key) == 0
        h.clock.advance(1.0)
        assert h.publisher.issuing_reload.reloads == 1
        assert ca.intermediate_cert != old_intermediate
        issued = ca.issue("new")
        new_leaf = issued.record.certificate()
        new_leaf.verify_directly_issued_by(ca.intermediate_cert)
        assert issued.chain_pem.endswith(ca.intermediate_cert.public_bytes(serialization.Encoding.PEM))
        for leaf, issuer in ((old_leaf, old_intermediate), (new_leaf, ca.intermediate_cert)):
            _, answer = h.post(_request(leaf, issuer))
            assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        ca.revoke(name="old")
        h.clock.advance(0.25)
        d = h.stub.get(f"{BASE}/revocations?since=0")
        h.stub.flush()
        now = datetime.datetime.fromtimestamp(h.clock.seconds(), datetime.timezone.utc)
        document = open_document(result_of(h.stub.content(result_of(d))), [ca.intermediate_cert], now=now)
        assert [entry.serial for entry in document.revocations] == [old_leaf.serial_number]
        crl = x509.load_der_x509_crl(h.fetch("GET", "/crl")[1])
        assert crl.issuer == ca.intermediate_cert.subject
    finally:
        h.watcher.stopService()
