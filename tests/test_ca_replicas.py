"""Three replicas on one PostgreSQL store under concurrent load: issue, revoke, token use, CRLs.

Each replica is its own :class:`CertificateAuthority` opened from its own copy of the CA
directory, with its own connections, driven by several threads at once, as separate status
servers are.
"""

from __future__ import annotations

import datetime
import random
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.store import NotRevocable
from s2sgw.ca.tokens import TokenBook, TokenRefused

DOMAIN = "example.internal"
REPLICAS = 3
THREADS_PER_REPLICA = 4
ISSUES_PER_THREAD = 20
TOKENS = 30


def _replicas(tmp_path: Path, pg_url: str) -> list[CertificateAuthority]:
    source = CertificateAuthority.init(tmp_path / "ca", DOMAIN, store=pg_url).directory
    opened = []
    for index in range(REPLICAS):
        copy = tmp_path / f"replica-{index}"
        shutil.copytree(source, copy)
        opened.append(CertificateAuthority.open(copy))
    return opened


def _crl_number(ca: CertificateAuthority) -> int:
    return ca.make_crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_concurrent_work_through_three_replicas_keeps_every_promise(tmp_path: Path, pg_url: str) -> None:
    replicas = _replicas(tmp_path, pg_url)
    books = [TokenBook(ca.store) for ca in replicas]
    now = datetime.datetime.now(datetime.UTC)
    tokens = [books[i % REPLICAS].create(f"svc-{i}", now=now) for i in range(TOKENS)]
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    lock = threading.Lock()
    issued: list[int] = []
    revoked: list[int] = []
    spent: Counter[str] = Counter()
    crl_numbers: list[list[int]] = []
    start = threading.Barrier(REPLICAS * THREADS_PER_REPLICA)

    def work(worker: int) -> None:
        ca, book = replicas[worker % REPLICAS], books[worker % REPLICAS]
        rng = random.Random(worker)
        numbers: list[int] = []
        start.wait()
        for step in range(ISSUES_PER_THREAD):
            name = f"svc-{worker}-{step % 3}"
            record = ca.certify(name, key, ca.planned_sans(name), lifetime=datetime.timedelta(hours=1))
            with lock:
                issued.append(record.serial)
                victim = rng.choice(issued)
            try:
                for done in ca.revoke(serial=victim, reason="keyCompromise"):
                    with lock:
                        revoked.append(done.serial)
            except NotRevocable:
                pass  # another replica revoked it first
            if step % 5 == 0:
                numbers.append(_crl_number(ca))
            token_index = (worker + step) % TOKENS
            try:
                found = book.check(tokens[token_index], f"svc-{token_index}", now)
                ca.certify(
                    found.name, key, ca.planned_sans(found.name), lifetime=datetime.timedelta(hours=1),
                    issued_via="token", claim=TokenBook.claim(found, now),
                )  # fmt: skip
                with lock:
                    spent[tokens[token_index]] += 1
            except TokenRefused:
                pass
        with lock:
            crl_numbers.append(numbers)

    with ThreadPoolExecutor(REPLICAS * THREADS_PER_REPLICA) as pool:
        list(pool.map(work, range(REPLICAS * THREADS_PER_REPLICA)))

    records = replicas[0].records()
    operations = len(issued) + len(revoked) + sum(spent.values())
    assert operations >= 300
    # Distinct serials: every certificate issued is recorded once.
    assert len(set(issued)) == len(issued) == REPLICAS * THREADS_PER_REPLICA * ISSUES_PER_THREAD
    assert len({r.serial for r in records}) == len(records) == len(issued) + TOKENS
    # No lost revocation: each revoked exactly once, numbered 1..N without a gap, on every replica.
    assert len(set(revoked)) == len(revoked)
    for ca in replicas:
        feed = ca.revocations_since(0)
        assert [r.revocation_seq for r in feed] == list(range(1, len(revoked) + 1))
        assert {r.serial for r in feed} == set(revoked)
    # Each token bought exactly one certificate.
    assert sorted(spent) == sorted(tokens) and set(spent.values()) == {1}
    assert Counter(r.issued_via for r in records)["token"] == TOKENS
    # CRL numbers strictly increase, whoever takes them.
    for numbers in crl_numbers:
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    every = [n for numbers in crl_numbers for n in numbers]
    assert len(set(every)) == len(every)
    assert _crl_number(replicas[2]) > max(every)
