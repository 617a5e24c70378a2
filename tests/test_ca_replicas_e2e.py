"""Three real status servers on one PostgreSQL store: every one answers for every certificate,
and a revocation made through one reaches all of them (OCSP and feed) within a second, by
LISTEN/NOTIFY rather than by polling (the timed poll here runs every 10 seconds)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from s2sgw.wire.feed import check_sequence
from tests.e2e import Processes, s2sgw
from tests.replicas import ReplicaSet, feed, load_cert, ocsp_status, openssl_ocsp

pytestmark = pytest.mark.e2e

DOMAIN = "example.org"


@attrs.frozen
class Setup:
    root: Path
    certs: Path
    replicas: ReplicaSet

    @property
    def issuer(self):
        return load_cert(self.replicas.source / "intermediate.pem")

    def leaf(self, name: str):
        return load_cert(self.certs / f"{name}.pem")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("replicas")
    source, certs = root / "ca", root / "certs"
    s2sgw("ca", "init", "--dir", source, "--trust-domain", DOMAIN, "--store", pg_cluster.new_database())
    for name in ("alice", "bob"):
        s2sgw("ca", "issue", "--dir", source, "--out", certs, name)
    processes = Processes(root)
    replicas = ReplicaSet(source, processes)
    try:
        replicas.start(3, "--poll-interval", "10")
        yield Setup(root, certs, replicas)
    finally:
        processes.stop_all()
    for replica in replicas.replicas:
        assert "Traceback" not in processes.log(replica.name), processes.log(replica.name)


def test_every_replica_answers_for_every_certificate_verified_by_openssl(setup: Setup) -> None:
    for replica in setup.replicas.replicas:
        out = openssl_ocsp(setup.replicas.source, setup.certs / "alice.pem", f"{replica.url}/ocsp")
        assert "Response verify OK" in out, out
        assert "alice.pem: good" in out, out


def test_a_certificate_issued_through_one_replica_is_good_on_every_replica(setup: Setup) -> None:
    second = setup.replicas.replicas[1]
    s2sgw("ca", "issue", "--dir", second.directory, "--out", setup.certs, "carol")
    for replica in setup.replicas.replicas:
        assert ocsp_status(replica.url, setup.leaf("carol"), setup.issuer) == "good"


def test_a_revocation_through_one_replica_reaches_every_replica_within_a_second(setup: Setup) -> None:
    first, second, third = setup.replicas.replicas
    issuers = [setup.issuer]
    for replica in (first, second, third):
        assert ocsp_status(replica.url, setup.leaf("bob"), setup.issuer) == "good"  # cached as good
    latest = feed(third.url, issuers, 0, wait=False).latest
    held: dict[str, object] = {}

    def long_poll() -> None:
        held["document"] = feed(third.url, issuers, latest, wait=True)
        held["at"] = time.monotonic()

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.3)  # the request is held by now

    s2sgw("ca", "revoke", "--dir", first.directory, "bob", "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    seen: dict[str, float] = {}
    while len(seen) < 3 and time.monotonic() - revoked_at < 5:
        for replica in (first, second, third):
            if replica.name not in seen:
                sent = time.monotonic() - revoked_at
                if ocsp_status(replica.url, setup.leaf("bob"), setup.issuer) == "revoked":
                    seen[replica.name] = sent
        time.sleep(0.02)
    waiter.join(timeout=10)
    assert sorted(seen) == [first.name, second.name, third.name], seen
    assert max(seen.values()) < 1.0, seen
    document = held["document"]
    assert [entry.serial for entry in document.revocations] == [setup.leaf("bob").serial_number]
    assert held["at"] - revoked_at < 1.0

    # The feed's numbers come from the database: every replica tells the same story, so a
    # subscriber moving from one to another resumes where it was.
    stories = [feed(r.url, issuers, 0, wait=False) for r in (first, second, third)]
    assert len({tuple((e.seq, e.serial) for e in story.revocations) for story in stories}) == 1
    moved = feed(second.url, issuers, latest, wait=False)
    check_sequence(moved, latest)
    assert moved.revocations[0].seq == latest + 1


def _crl_numbers(setup: Setup) -> list[int]:
    numbers = []
    for replica in setup.replicas.replicas:
        with urllib.request.urlopen(f"{replica.url}/crl", timeout=5) as answer:
            crl = x509.load_der_x509_crl(answer.read())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    return numbers


def test_every_replica_serves_the_same_highest_crl_and_they_settle(setup: Setup) -> None:
    """Each server signs a CRL after a revocation; all then serve the highest one, and stop there."""
    s2sgw("ca", "issue", "--dir", setup.replicas.source, "--out", setup.certs, "dave")
    s2sgw("ca", "revoke", "--dir", setup.replicas.replicas[2].directory, "dave")
    deadline = time.monotonic() + 5
    while len(set(numbers := _crl_numbers(setup))) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(set(numbers)) == 1, numbers
    dave = load_cert(setup.certs / "dave.pem")
    with urllib.request.urlopen(f"{setup.replicas.replicas[0].url}/crl", timeout=5) as answer:
        assert x509.load_der_x509_crl(answer.read()).get_revoked_certificate_by_serial_number(dave.serial_number)
    time.sleep(1.0)
    assert _crl_numbers(setup) == numbers  # no server keeps outbidding the others
