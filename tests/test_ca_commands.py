"""``s2sgw ca ...`` as a user runs it: real processes, real files, checked by the real ``openssl``."""

from __future__ import annotations

import datetime
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from s2sgw.ca.authority import CertificateAuthority

DOMAIN = "example.internal"
URL = "http://127.0.0.1:8080"
TIMEOUT = 60


def s2sgw(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "s2sgw.cli", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)


def fails_with_one_line(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """A refused command exits 1 with exactly one line on stderr, naming the problem."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("s2sgw: error: ") and fragment in lines[0], lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content: compared before and after a refused command."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """init -> issue good, bad -> revoke bad -> crl (PEM and DER), once for the module's tests."""
    base = tmp_path_factory.mktemp("walkthrough")
    ca, out = base / "ca", base / "out"
    s2sgw("ca", "init", "--dir", ca, "--trust-domain", DOMAIN, "--url", URL)
    s2sgw("ca", "issue", "--dir", ca, "good", "--out", out, "--dns", "good.local", "--ip", "127.0.0.1",
          "--ip", "::1", "--hours", "2")
    s2sgw("ca", "issue", "--dir", ca, "bad", "--out", out)
    s2sgw("ca", "revoke", "--dir", ca, "bad", "--reason", "keyCompromise")
    s2sgw("ca", "crl", "--dir", ca, "--out", base / "crl.pem", "--pem")
    s2sgw("ca", "crl", "--dir", ca, "--out", base / "crl.der")
    chain = base / "cas.pem"
    chain.write_bytes((ca / "intermediate.pem").read_bytes() + (ca / "root.pem").read_bytes())
    return {"ca": ca, "out": out, "crl_pem": base / "crl.pem", "crl_der": base / "crl.der", "cas": chain}


def verify(w: dict[str, Path], name: str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return openssl(
        "verify", "-CAfile", w["ca"] / "bundle.pem", "-untrusted", w["ca"] / "intermediate.pem", *extra,
        w["out"] / f"{name}.pem",
    )


def test_issued_certificates_verify_against_the_bundle(walkthrough: dict[str, Path]) -> None:
    for name in ("good", "bad"):
        result = verify(walkthrough, name)
        assert result.returncode == 0 and ": OK" in result.stdout, result.stderr


def test_the_crl_verifies_and_crl_check_rejects_only_the_revoked_certificate(
    walkthrough: dict[str, Path],
) -> None:
    for crl in (walkthrough["crl_pem"], walkthrough["crl_der"]):
        form = "PEM" if crl.suffix == ".pem" else "DER"
        checked = openssl("crl", "-inform", form, "-in", crl, "-CAfile", walkthrough["cas"], "-verify", "-noout")
        assert checked.returncode == 0 and "verify OK" in checked.stderr + checked.stdout, checked.stderr
    crl_file = ("-CRLfile", walkthrough["crl_pem"])
    good = verify(walkthrough, "good", "-crl_check", *crl_file)
    assert good.returncode == 0, good.stderr
    bad = verify(walkthrough, "bad", "-crl_check", *crl_file)
    assert bad.returncode != 0 and "certificate revoked" in bad.stdout + bad.stderr


def test_the_crl_is_signed_by_the_issuing_ca_with_increasing_numbers(walkthrough: dict[str, Path]) -> None:
    ca = CertificateAuthority.open(walkthrough["ca"])
    first = x509.load_pem_x509_crl(walkthrough["crl_pem"].read_bytes())
    second = x509.load_der_x509_crl(walkthrough["crl_der"].read_bytes())
    assert first.issuer == second.issuer == ca.intermediate_cert.subject
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for c in (first, second)]
    assert numbers[0] < numbers[1]
    assert first.next_update_utc - first.last_update_utc <= datetime.timedelta(hours=24)
    text = openssl("crl", "-in", walkthrough["crl_pem"], "-noout", "-text").stdout
    assert "ecdsa-with-SHA256" in text and "Key Compromise" in text


def test_openssl_shows_the_leaf_sans_ekus_and_extensions(walkthrough: dict[str, Path]) -> None:
    text = openssl("x509", "-in", walkthrough["out"] / "good.pem", "-noout", "-text").stdout
    assert "Subject: CN = good" in text
    for expected in (
        "URI:spiffe://example.internal/good",
        "DNS:good",
        "DNS:good.example.internal",
        "DNS:good.local",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "X509v3 Key Usage: critical",
        "Digital Signature",
        "X509v3 Basic Constraints: critical",
        "CA:FALSE",
        "X509v3 Subject Key Identifier",
        "X509v3 Authority Key Identifier",
        "URI:http://127.0.0.1:8080/crl",
        "OCSP - URI:http://127.0.0.1:8080/ocsp",
    ):
        assert expected in text, expected


def test_ocsp_signer_and_intermediate_carry_their_extensions(walkthrough: dict[str, Path]) -> None:
    ocsp = openssl("x509", "-in", walkthrough["ca"] / "ocsp.pem", "-noout", "-text").stdout
    assert "OCSP Signing" in ocsp and "OCSP No Check" in ocsp
    intermediate = openssl("x509", "-in", walkthrough["ca"] / "intermediate.pem", "-noout", "-text").stdout
    assert "CA:TRUE, pathlen:0" in intermediate
    signer = openssl(
        "verify", "-CAfile", walkthrough["ca"] / "bundle.pem", "-untrusted", walkthrough["ca"] / "intermediate.pem",
        "-purpose", "ocsphelper", walkthrough["ca"] / "ocsp.pem",
    )
    assert signer.returncode == 0, signer.stdout + signer.stderr


def test_key_files_are_readable_only_by_their_owner(walkthrough: dict[str, Path]) -> None:
    for key in ("root.key", "intermediate.key", "ocsp.key"):
        assert mode(walkthrough["ca"] / key) == 0o600, key
    for key in ("good.key", "bad.key"):
        assert mode(walkthrough["out"] / key) == 0o600, key
    chain = x509.load_pem_x509_certificates((walkthrough["out"] / "good.pem").read_bytes())
    assert len(chain) == 2


def test_list_shows_good_revoked_and_expired(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority.init(ca_dir, DOMAIN)
    s2sgw("ca", "issue", "--dir", ca_dir, "alive", "--out", tmp_path / "out")
    s2sgw("ca", "issue", "--dir", ca_dir, "gone", "--out", tmp_path / "out")
    s2sgw("ca", "revoke", "--dir", ca_dir, "gone", "--reason", "superseded")
    old = ca.issue("old", hours=1, now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2))
    lines = s2sgw("ca", "list", "--dir", ca_dir).stdout.splitlines()
    assert lines[0].split() == ["SERIAL", "NAME", "NOT", "AFTER", "ISSUED", "STATUS"]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert rows["alive"].endswith("good")
    assert rows["gone"].endswith("revoked (superseded)")
    assert rows["old"].endswith("expired")
    assert rows["old"].split()[0] == old.record.serial_hex
    assert rows["old"].split()[2] == old.record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_revoke_by_serial_accepts_the_hex_that_list_prints(tmp_path: Path) -> None:
    """issue, list and revoke print a serial as openssl does (and as audit lines do); revoke takes any case."""
    ca_dir = tmp_path / "ca"
    s2sgw("ca", "init", "--dir", ca_dir, "--trust-domain", DOMAIN, "--key-type", "ed25519")
    issued = s2sgw("ca", "issue", "--dir", ca_dir, "web", "--out", tmp_path / "out").stdout
    serial = s2sgw("ca", "list", "--dir", ca_dir).stdout.splitlines()[1].split()[0]
    shown = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "out" / "web.pem"), "-noout", "-serial"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert shown == f"serial={serial}" and f"serial {serial} " in issued
    revoked = s2sgw("ca", "revoke", "--dir", ca_dir, "--serial", serial.lower(), "--reason", "cessationOfOperation")
    assert serial in revoked.stdout
    fails_with_one_line(s2sgw("ca", "revoke", "--dir", ca_dir, "--serial", serial, check=False), "already revoked")
    assert "revoked (cessationOfOperation)" in s2sgw("ca", "list", "--dir", ca_dir).stdout


# -- bad input: one line, exit 1, nothing written ------------------------------------------------


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A CA (made by the library: fast) with one leaf ``web`` written to ``tmp_path/out``."""
    ca = CertificateAuthority.init(tmp_path / "ca", DOMAIN)
    ca.write_identity(ca.issue("web"), tmp_path / "out")
    return ca.directory


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the refusal cases, which must leave it unchanged."""
    base = tmp_path_factory.mktemp("refusals")
    ca = CertificateAuthority.init(base / "ca", DOMAIN)
    ca.write_identity(ca.issue("web"), base / "out")
    return ca.directory


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["revoke", "nobody"], "no certificate was issued to 'nobody'"),
        (["revoke", "--serial", "abcdef"], "no certificate with serial ABCDEF"),
        (["revoke", "--serial", "xyz"], "invalid serial"),
        (["revoke"], "exactly one of NAME or --serial"),
        (["revoke", "web", "--serial", "01"], "exactly one of NAME or --serial"),
        (["issue", "Web", "--out", "{tmp}/new"], "invalid service name"),
        (["issue", "web", "--out", "{tmp}/new", "--dns", "bad_name"], "invalid DNS name"),
        (["issue", "web", "--out", "{tmp}/new", "--ip", "1.2.3"], "invalid IP address"),
        (["issue", "web", "--out", "{tmp}/new", "--hours", "-1"], "positive number of hours"),
        (["issue", "web", "--out", "{tmp}/out/web.pem"], "cannot write to"),
        (["crl", "--out", "{tmp}/out/web.pem/crl.der"], "cannot write"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(
    shared_ca: Path, args: list[str], fragment: str
) -> None:
    base = shared_ca.parent
    before = tree(base)
    argv = [a.replace("{tmp}", str(base)) for a in args]
    fails_with_one_line(s2sgw("ca", argv[0], "--dir", shared_ca, *argv[1:], check=False), fragment)
    after = tree(base)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"ca/ca.db", "ca/ca.db-wal", "ca/ca.db-shm"}  # a CRL number may be spent
    assert not (base / "new").exists()
    assert len(CertificateAuthority.open(shared_ca).records()) == 1


def test_revoking_twice_is_refused(ca_dir: Path) -> None:
    s2sgw("ca", "revoke", "--dir", ca_dir, "web")
    fails_with_one_line(s2sgw("ca", "revoke", "--dir", ca_dir, "web", check=False), "already revoked")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupted_ca_key_is_refused(ca_dir: Path, tmp_path: Path, damage: str) -> None:
    key = ca_dir / "intermediate.key"
    if damage == "missing":
        key.unlink()
    else:
        key.write_bytes(key.read_bytes()[:60])
    fails_with_one_line(
        s2sgw("ca", "issue", "--dir", ca_dir, "db", "--out", tmp_path / "new", check=False), f"is {damage}"
    )
    fails_with_one_line(s2sgw("ca", "crl", "--dir", ca_dir, "--out", tmp_path / "c.der", check=False), damage)
    assert not (tmp_path / "new").exists() and not (tmp_path / "c.der").exists()


def test_a_directory_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    for command in (["list"], ["crl", "--out", tmp_path / "crl.der"], ["revoke", "web"]):
        fails_with_one_line(s2sgw("ca", command[0], "--dir", tmp_path, *command[1:], check=False), "not a CA")
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("domain", ["Example.internal", "bad_domain", "a..b", "-lead.internal"])
def test_init_refuses_an_invalid_trust_domain(tmp_path: Path, domain: str) -> None:
    result = s2sgw("ca", "init", "--dir", tmp_path / "ca", f"--trust-domain={domain}", check=False)
    fails_with_one_line(result, "invalid trust domain")
    assert not (tmp_path / "ca").exists()


def test_init_refuses_an_unwritable_directory_and_an_existing_ca(ca_dir: Path, tmp_path: Path) -> None:
    before = tree(tmp_path)
    blocker = tmp_path / "out" / "web.pem"
    fails_with_one_line(
        s2sgw("ca", "init", "--dir", blocker / "ca", "--trust-domain", DOMAIN, check=False), "cannot create"
    )
    fails_with_one_line(
        s2sgw("ca", "init", "--dir", ca_dir, "--trust-domain", DOMAIN, check=False), "already holds a CA"
    )
    fails_with_one_line(
        s2sgw("ca", "init", "--dir", tmp_path, "--trust-domain", DOMAIN, "--url", "ftp://x", check=False),
        "invalid CA URL",
    )
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_init_into_a_read_only_directory_leaves_nothing(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        fails_with_one_line(s2sgw("ca", "init", "--dir", locked, "--trust-domain", DOMAIN, check=False), "cannot")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# -- concurrency ---------------------------------------------------------------------------------


def test_concurrent_issue_and_revoke_processes_keep_the_store_intact(ca_dir: Path, tmp_path: Path) -> None:
    """Several processes at once: all succeed, no serial repeats, the database stays consistent."""
    for name in ("a0", "a1", "a2"):
        s2sgw("ca", "issue", "--dir", ca_dir, name, "--out", tmp_path / "first")

    def start(*args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "s2sgw.cli", "ca", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    processes = [start("issue", "--dir", ca_dir, f"svc{i % 3}", "--out", tmp_path / f"out{i}") for i in range(8)]
    processes += [start("revoke", "--dir", ca_dir, name) for name in ("a0", "a1", "a2")]
    processes.append(start("crl", "--dir", ca_dir, "--out", tmp_path / "crl.der"))
    for process in processes:
        _out, err = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, err

    ca = CertificateAuthority.open(ca_dir)
    records = ca.records()
    assert len(records) == 1 + 3 + 8
    assert len({r.serial for r in records}) == len(records)
    revoked = ca.revocations_since(0)
    assert sorted(r.name for r in revoked) == ["a0", "a1", "a2"]
    assert sorted(r.revocation_seq for r in revoked) == [1, 2, 3]
    with sqlite3.connect(ca_dir / "ca.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for i in range(8):
        issued = x509.load_pem_x509_certificate((tmp_path / f"out{i}" / f"svc{i % 3}.pem").read_bytes())
        assert ca.lookup(issued.serial_number) is not None
