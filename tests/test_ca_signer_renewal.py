"""The short-lived OCSP signer: re-issued by the status server, taken by gateways without a restart."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.ceremony import OCSP_LIFETIME
from s2sgw.ca.passphrase import Passphrase
from s2sgw.ca.signer_renewal import SignerRenewal, renewal_due
from s2sgw.ca.store import OCSP_SIGNER
from s2sgw.wire.feed import open_document
from s2sgw.wire.ocsp import build_request, verify_response
from tests.doubles import BASE, make_harness, result_of

LIFETIME = datetime.timedelta(minutes=2)


def test_init_makes_a_signer_for_seven_days(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
    life = ca.ocsp_cert.not_valid_after_utc - ca.ocsp_cert.not_valid_before_utc
    assert OCSP_LIFETIME == datetime.timedelta(days=7)
    assert datetime.timedelta(days=7) <= life <= datetime.timedelta(days=7, minutes=5)


def test_renewal_is_due_with_a_third_left_or_when_it_lives_too_long() -> None:
    class Cert:
        not_valid_after_utc = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)

    end = Cert.not_valid_after_utc
    assert not renewal_due(Cert, end - datetime.timedelta(seconds=41), LIFETIME)  # type: ignore[arg-type]
    assert renewal_due(Cert, end - datetime.timedelta(seconds=39), LIFETIME)  # type: ignore[arg-type]
    assert renewal_due(Cert, end - datetime.timedelta(days=7), LIFETIME)  # type: ignore[arg-type]


@pytest.mark.parametrize("encrypted", [False, True])
def test_answers_and_the_feed_verify_across_three_rotations(tmp_path: Path, encrypted: bool) -> None:
    """Every second for 5 minutes of a 2-minute signer a gateway asks for a leaf's status and
    reads the feed, verifying both as a gateway does (the signer each carries, against the
    issuer); the signer changes at least three times and nothing fails to verify."""
    passphrase = Passphrase(b"renewal test", "test") if encrypted else None
    ca = CertificateAuthority.init(tmp_path / "ca", "example.org", passphrase=passphrase)
    leaf = ca.issue("web").record.certificate()
    ca.revoke(serial=ca.issue("gone").record.serial)
    h = make_harness(ca)
    h.publisher.signer_renewal = SignerRenewal(h.publisher, LIFETIME)
    try:
        signers = [ca.ocsp_cert.serial_number]  # init's, living 7 days: replaced at once
        for _ in range(300):
            h.clock.advance(1.0)
            now = datetime.datetime.fromtimestamp(h.clock.seconds(), datetime.timezone.utc)
            query = build_request(leaf, ca.intermediate_cert, nonce=None)
            _, der = h.fetch("POST", "/ocsp", data=query.der, headers={"Content-Type": "application/ocsp-request"})
            assert verify_response(der, query, ca.intermediate_cert, now=now).state == "good"
            d = h.stub.get(f"{BASE}/revocations?since=0")
            h.stub.flush()
            body = result_of(h.stub.content(result_of(d)))
            document = open_document(body, [ca.intermediate_cert], now=now)
            assert len(document.revocations) == 1
            signer = ca.ocsp_cert.serial_number
            if not signers or signers[-1] != signer:
                signers.append(signer)
        assert len(signers) >= 5, "the seven-day signer replaced, then at least three rotations"
        assert h.publisher.signer_renewal.renewals == len(signers) - 1
    finally:
        h.watcher.stopService()

    on_disk = x509.load_pem_x509_certificate((ca.directory / "ocsp.pem").read_bytes())
    assert on_disk.serial_number == signers[-1]
    key_pem = (ca.directory / "ocsp.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") == encrypted
    reopened = CertificateAuthority.open(ca.directory, passphrase)  # a restart picks up the newest
    assert reopened.ocsp_cert == on_disk
    assert {row.serial for row in ca.store.rows(OCSP_SIGNER)} >= set(signers)
    life = on_disk.not_valid_after_utc - on_disk.not_valid_before_utc
    assert life <= LIFETIME + datetime.timedelta(seconds=13)
