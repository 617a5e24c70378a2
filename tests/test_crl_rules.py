"""Mode ``crl`` refuses every CRL that breaks RFC 5280's rules, wherever a CRL enters: the status
checker that judges peers, loading and reloading the material (which keeps its CRL), and a CRL
fetched from the CA."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ObjectIdentifier
from twisted.internet import task

from s2sgw import pki
from s2sgw.config import ConfigError
from s2sgw.status.crl import CRLStatusChecker
from s2sgw.verify import crlrules
from s2sgw.wire.ocsp import StatusInvalid
from tests import chainkit as kit
from tests.pkifactory import TestCA, now
from tests.reloadkit import Setup, make_setup

HOUR = datetime.timedelta(hours=1)


def crl_of(
    issuer: x509.Certificate,
    key,
    *,
    number: int | None = 6,
    number_critical: bool = False,
    this_update: datetime.datetime | None = None,
    lifetime: datetime.timedelta = HOUR,
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    entry_extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> x509.CertificateRevocationList:
    start = (this_update or now() - datetime.timedelta(minutes=1)).replace(microsecond=0)
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).next_update(start + lifetime)
    builder = builder.last_update(start)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=number_critical)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    if entry_extra:
        entry = x509.RevokedCertificateBuilder().serial_number(0x5EED).revocation_date(start)
        for extension, critical in entry_extra:
            entry = entry.add_extension(extension, critical=critical)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, kit.signature_hash(key))


INDIRECT = x509.IssuingDistributionPoint(None, None, False, False, None, True, False)
PRIVATE = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00")

# (id, make(issuer, key) -> CRL, words in the refusal)
BAD: list[tuple[str, Callable[[x509.Certificate, object], x509.CertificateRevocationList], str]] = [
    ("no-CRLNumber", lambda issuer, key: crl_of(issuer, key, number=None), "has no CRLNumber"),
    ("critical-CRLNumber", lambda issuer, key: crl_of(issuer, key, number_critical=True), "CRLNumber is marked critical"),
    ("nextUpdate-not-after-thisUpdate", lambda issuer, key: crl_of(
        issuer, key, this_update=now() + datetime.timedelta(minutes=2), lifetime=datetime.timedelta(0)),
     "is not after thisUpdate"),
    ("valid-for-a-year", lambda issuer, key: crl_of(issuer, key, lifetime=datetime.timedelta(days=365)),
     "is valid for 365 days (at most 31)"),
    ("delta-CRL", lambda issuer, key: crl_of(issuer, key, extra=((x509.DeltaCRLIndicator(5), True),)),
     "is a delta CRL"),
    ("indirect-CRL", lambda issuer, key: crl_of(issuer, key, extra=((INDIRECT, True),)), "indirect or partial"),
    ("critical-private-extension", lambda issuer, key: crl_of(issuer, key, extra=((PRIVATE, True),)),
     "critical extension not understood: 1.3.6.1.4.1.55555.2"),
    ("entry-with-certificateIssuer", lambda issuer, key: crl_of(
        issuer, key, entry_extra=((x509.CertificateIssuer([x509.DirectoryName(issuer.subject)]), True),)),
     "is an indirect CRL"),
]


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(now().timestamp())
    return clock


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create()


@pytest.mark.parametrize(("make", "words"), [(m, w) for _, m, w in BAD], ids=[i for i, _, _ in BAD])
def test_the_crl_checker_refuses_a_bad_crl(ca: TestCA, make, words: str) -> None:
    crl = make(ca.intermediate, ca.intermediate_key)
    assert crl.is_signature_valid(ca.intermediate.public_key())  # signed properly: only the rule is broken
    with pytest.raises(StatusInvalid, match=words.replace("(", r"\(").replace(")", r"\)")):
        CRLStatusChecker(crl, _clock(), issuer=ca.intermediate)
    leaf = ca.issue("users").leaf
    failure = []
    CRLStatusChecker(crl, _clock()).check(leaf, ca.intermediate).addErrback(failure.append)
    assert failure and failure[0].check(StatusInvalid) and words in failure[0].getErrorMessage()


@pytest.mark.parametrize("usage", [("key_cert_sign",), None], ids=["keyUsage-without-cRLSign", "no-keyUsage"])
def test_the_crl_checker_refuses_a_crl_from_an_issuer_not_allowed_to_sign_crls(usage) -> None:
    path = kit.build(kit.root(), kit.intermediate(usage=usage), kit.leaf())
    issuer, key = path.chain[1], kit.key("p256", 1)
    crl = crl_of(issuer, key)
    with pytest.raises(StatusInvalid, match="cRLSign"):
        CRLStatusChecker(crl, _clock(), issuer=issuer)
    assert "cRLSign" in (crlrules.crl_problem(crl, issuer) or "")


def test_a_crl_signed_with_sha1_or_unfit_for_the_issuers_key_is_refused(ca: TestCA) -> None:
    """The signature check refuses both first; the algorithm rule names the reason on its own."""
    sha1 = x509.load_der_x509_crl(
        kit.resign_crl(crl_of(ca.intermediate, ca.intermediate_key), ca.intermediate_key,
                       inner_hash=hashes.SHA1(), outer_hash=hashes.SHA1())
    )
    with pytest.raises(StatusInvalid, match="signature does not verify"):
        CRLStatusChecker(sha1, _clock(), issuer=ca.intermediate)
    with pytest.raises(pki.PKIError, match="signature does not verify"):
        pki.check_crl(sha1, [ca.intermediate], now())
    assert crlrules.crl_problem(sha1, ca.intermediate) == (
        "signature algorithm ecdsa-with-SHA1 does not fit the issuer's ECDSA key"
    )
    rsa_issuer = kit.build(kit.root(key="rsa2048"), kit.intermediate(key="rsa2048"), kit.leaf()).chain[1]
    assert "does not fit the issuer's RSA key" in crlrules.crl_problem(crl_of(ca.intermediate, ca.intermediate_key), rsa_issuer)


def test_a_crl_naming_another_algorithm_inside_cannot_even_be_read(ca: TestCA) -> None:
    """cryptography refuses such a CRL when it is parsed, so loading it names the problem."""
    der = kit.resign_crl(ca.crl(number=6), ca.intermediate_key, inner_hash=hashes.SHA384(), outer_hash=hashes.SHA256())
    with pytest.raises(pki.PKIError, match="malformed CRL: .*signature algorithms do not match"):
        pki.parse_crl(der, "ca.crl")


def test_the_real_cas_crl_follows_every_rule(ca: TestCA) -> None:
    assert crlrules.crl_problem(ca.crl(number=3), ca.intermediate) is None
    assert crlrules.crl_problem(ca.crl(root=True, number=3), ca.root) is None


@pytest.fixture
def crl_setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path, mode="crl")


@pytest.mark.parametrize(("make", "words"), [(m, w) for _, m, w in BAD], ids=[i for i, _, _ in BAD])
def test_a_bad_crl_is_refused_on_reload_and_the_old_one_kept(crl_setup: Setup, make, words: str) -> None:
    store = crl_setup.store()
    held = store.crl
    crl = make(crl_setup.ca.intermediate, crl_setup.ca.intermediate_key)
    (crl_setup.directory / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    generation, failure = crl_setup.reload(store)
    assert failure is not None and words in str(failure.value), failure
    assert store.crl is held and store.generation == 1
    with pytest.raises(ConfigError, match="fetched CRL: "):
        store.check_crl_bytes(crl.public_bytes(serialization.Encoding.DER))
