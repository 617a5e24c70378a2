"""The trust store: start-up load, all-or-nothing reloads, creators that follow reloads, CRLs."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from zope.interface.verify import verifyObject

from s2sgw import pki, tls
from s2sgw import handshake
from s2sgw.config import ConfigError, load_config
from s2sgw.interfaces import IConnectionCreators, ITrustStore, Reason
from s2sgw.truststore import TrustStore
from tests.doubles import FakeReactor, FakeThreadPool
from tests.pkifactory import Identity, TestCA, cert_pem, key_pem, new_key, now
from tests.reloadkit import Setup, make_setup
from tests.tlshelpers import connect





@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path)


def client_for(ca: TestCA, name: str = "users", trusting: TestCA | None = None) -> tls.ClientConnectionCreator:
    """A peer from ``ca`` that trusts the server's certificate from ``trusting`` (default: ``ca``)."""
    identity = ca.issue(name)
    context = tls.client_context(identity.chain, identity.key, [(trusting or ca).root])
    return tls.ClientConnectionCreator(lambda: context, "orders")


def served_serial(store: TrustStore, ca: TestCA) -> int:
    pair = connect(store.server_creator("orders"), client_for(ca))
    assert pair.client.completed, handshake.chain_error(pair.client_tls)
    return handshake.peer_chain(pair.client_tls)[0].serial_number


def test_store_provides_the_trust_store_interface(setup: Setup) -> None:
    store = setup.store()
    assert verifyObject(ITrustStore, store)
    assert verifyObject(IConnectionCreators, store)
    assert store.generation == 1
    assert store.trust_domain == "example.org"
    assert store.roots == (setup.ca.root,)
    assert pki.spiffe_id(store.leaf("orders")) == "spiffe://example.org/orders"
    assert store.route("orders-in-0").allow == ("users",)  # type: ignore[union-attr]


def test_loaded_store_serves_mutual_tls_both_ways(setup: Setup) -> None:
    """The server creator requires a client certificate; the client creator presents ours."""
    store = setup.store()
    peer = setup.ca.issue("users")
    pair = connect(
        store.server_creator("orders"),
        tls.ClientConnectionCreator(
            lambda: tls.client_context(peer.chain, peer.key, [setup.ca.root]), "orders"
        ),
    )
    assert pair.server.completed
    assert handshake.peer_chain(pair.server_tls)[0] == peer.leaf

    peer_server = tls.ServerConnectionCreator(
        lambda: tls.server_context(peer.chain, peer.key, [setup.ca.root])
    )
    pair = connect(peer_server, store.client_creator("orders", "users"))
    assert pair.server.completed and pair.client.completed
    assert handshake.peer_chain(pair.server_tls)[0] == store.leaf("orders")


def test_unknown_service_is_refused_when_asking_for_a_creator(setup: Setup) -> None:
    store = setup.store()
    with pytest.raises(KeyError):
        store.server_creator("nobody")


def test_reload_rotates_certificate_for_new_connections_only(setup: Setup) -> None:
    """After a reload new handshakes present the new certificate; an open connection carries on."""
    store = setup.store()
    old_serial = served_serial(store, setup.ca)
    live = connect(store.server_creator("orders"), client_for(setup.ca))

    rotated = setup.ca.issue("orders")
    setup.write_identity("orders", rotated)
    assert served_serial(store, setup.ca) == old_serial  # nothing changes before the reload
    generation, failure = setup.reload(store)
    assert failure is None
    assert generation == 2 == store.generation
    assert served_serial(store, setup.ca) == rotated.leaf.serial_number

    live.client_tls.write(b"after reload")
    live.flush()
    assert live.server.received == b"after reload"


def test_reload_reads_files_in_the_thread_pool_not_on_the_reactor(setup: Setup) -> None:
    """Until the pool runs the job, the store keeps serving the old material."""
    store = setup.store()
    setup.write_identity("orders", setup.ca.issue("orders"))
    fired: list[Any] = []
    store.reload().addBoth(fired.append)
    assert len(setup.pool.jobs) == 1 and not fired
    assert store.generation == 1
    setup.pool.run()
    assert fired == [2]


def _truncate_bundle(setup: Setup) -> None:
    data = (setup.directory / "bundle.pem").read_bytes()
    (setup.directory / "bundle.pem").write_bytes(data[: len(data) // 2])


def _mismatched_key(setup: Setup) -> None:
    (setup.directory / "orders.key").write_bytes(key_pem(new_key()))


def _expired_cert(setup: Setup) -> None:
    expired = setup.ca.issue(
        "orders",
        not_before=now() - datetime.timedelta(hours=3),
        not_after=now() - datetime.timedelta(hours=1),
    )
    setup.write_identity("orders", expired)


def _foreign_cert(setup: Setup) -> None:
    setup.write_identity("orders", TestCA.create(cn="Elsewhere").issue("orders"))


def _no_san_cert(setup: Setup) -> None:
    setup.write_identity("orders", setup.ca.issue("orders", sans=[]))


def _missing_key(setup: Setup) -> None:
    (setup.directory / "orders.key").unlink()


def _broken_config(setup: Setup) -> None:
    setup.config_path.write_text(setup.config_path.read_text().replace('trust = "bundle.pem"', "trust = 5"))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate_bundle, "truncated"),
        (_mismatched_key, "does not match"),
        (_expired_cert, "expired"),
        (_foreign_cert, "does not verify"),
        (_no_san_cert, "subjectAltName"),
        (_missing_key, "orders.key"),
        (_broken_config, "trust: expected a string"),
    ],
    ids=["truncated-bundle", "mismatched-key", "expired-cert", "foreign-cert", "no-san", "missing-key", "bad-config"],
)
def test_failed_reload_keeps_old_material_and_says_why(
    setup: Setup, damage: Callable[[Setup], None], words: str
) -> None:
    """Bad new files leave the old material serving; the failure is counted and explained."""
    store = setup.store()
    serial = served_serial(store, setup.ca)
    damage(setup)
    generation, failure = setup.reload(store)
    assert failure is not None and failure.check(ConfigError)
    assert words in str(failure.value)
    assert store.generation == 1
    assert store.reload_failures == 1
    assert store.last_error is not None and words in store.last_error
    assert store.status()["reload_failures"] == 1
    assert served_serial(store, setup.ca) == serial


def test_reload_after_a_failure_recovers(setup: Setup) -> None:
    store = setup.store()
    _mismatched_key(setup)
    assert setup.reload(store)[1] is not None
    fixed = setup.ca.issue("orders")
    setup.write_identity("orders", fixed)
    assert setup.reload(store) == (2, None)
    assert store.reload_failures == 1
    assert served_serial(store, setup.ca) == fixed.leaf.serial_number


def test_concurrent_reloads_coalesce_into_one_more_run(setup: Setup) -> None:
    """Requests during a reload share a single follow-up run, which sees files changed meanwhile."""
    store = setup.store()
    results: list[Any] = []
    store.reload().addBoth(results.append)
    rotated = setup.ca.issue("orders")
    setup.write_identity("orders", rotated)
    store.reload().addBoth(results.append)
    store.reload().addBoth(results.append)
    assert len(setup.pool.jobs) == 1
    on_result, work = setup.pool.jobs.pop(0)
    on_result(True, work())
    assert results == [2]
    assert len(setup.pool.jobs) == 1  # exactly one follow-up
    setup.pool.run()
    assert results == [2, 3, 3]
    assert served_serial(store, setup.ca) == rotated.leaf.serial_number


def test_trust_bundle_rotation_with_overlap(setup: Setup) -> None:
    """Old root -> old+new roots -> new root only; verify_chain follows the current roots."""
    store = setup.store()
    old_peer = setup.ca.issue("users")
    new_ca = TestCA.create(cn="New Root")
    new_peer = new_ca.issue("users")
    assert store.verify_chain(old_peer.chain) and not store.verify_chain(new_peer.chain)

    (setup.directory / "bundle.pem").write_bytes(cert_pem(setup.ca.root, new_ca.root))
    assert setup.reload(store) == (2, None)
    assert store.verify_chain(old_peer.chain) and store.verify_chain(new_peer.chain)
    # a peer from the new CA now completes a handshake
    pair = connect(store.server_creator("orders"), client_for(new_ca, trusting=setup.ca))
    assert pair.server.completed

    new_ca.issue("orders").write(setup.directory, "orders")
    (setup.directory / "bundle.pem").write_bytes(cert_pem(new_ca.root))
    assert setup.reload(store) == (3, None)
    assert not store.verify_chain(old_peer.chain) and store.verify_chain(new_peer.chain)
    pair = connect(store.server_creator("orders"), client_for(setup.ca, trusting=new_ca))
    assert not pair.server.completed
    assert handshake.chain_error(pair.server_tls)[0] == Reason.UNTRUSTED_CHAIN  # type: ignore[index]


def test_new_bundle_that_no_longer_covers_our_certificate_is_refused(setup: Setup) -> None:
    """Switching to a root that did not issue our own certificate would strand us: keep the old."""
    store = setup.store()
    (setup.directory / "bundle.pem").write_bytes(TestCA.create(cn="Other").bundle_pem())
    generation, failure = setup.reload(store)
    assert failure is not None and "does not verify" in str(failure.value)
    assert store.generation == 1


def test_reload_applies_allow_list_changes_and_flags_listener_changes(setup: Setup, logged_errors) -> None:
    """Allow-lists apply at once; a changed listen endpoint stays as running, with a warning."""
    store = setup.store()
    text = setup.config_path.read_text()
    text = text.replace('allow = ["users"]', 'allow = ["users", "billing"]')
    text = text.replace('listen = "tcp:0:interface=127.0.0.1"\n  backend', 'listen = "tcp:9999"\n  backend', 1)
    setup.config_path.write_text(text)
    warnings: list[str] = []
    from twisted.logger import globalLogPublisher

    def observe(event: dict) -> None:
        if "note" in event:
            warnings.append(event["note"])

    globalLogPublisher.addObserver(observe)
    try:
        assert setup.reload(store) == (2, None)
    finally:
        globalLogPublisher.removeObserver(observe)
    route = store.route("orders-in-0")
    assert route is not None and route.allow == ("users", "billing")
    assert route.listen == "tcp:0:interface=127.0.0.1"  # type: ignore[union-attr]
    assert any("restart" in note for note in warnings)


def test_load_failure_names_the_file(setup: Setup) -> None:
    _mismatched_key(setup)
    with pytest.raises(ConfigError, match=r"orders\.key: key does not match the certificate"):
        setup.store()


def test_status_summary_has_no_secrets(setup: Setup) -> None:
    store = setup.store()
    summary = store.status()
    assert summary["services"]["orders"]["identity"] == "spiffe://example.org/orders"
    assert "PRIVATE" not in repr(summary) and "PRIVATE" not in repr(store.material)


# -- mode crl ------------------------------------------------------------------------------------


@pytest.fixture
def crl_setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path, mode="crl")


def _write_crl(setup: Setup, crl) -> None:
    (setup.directory / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_crl_is_loaded_checked_and_consulted(crl_setup: Setup) -> None:
    store = crl_setup.store()
    assert store.material.crl_number == 5
    revoked_peer = crl_setup.ca.issue("users")
    good_peer = crl_setup.ca.issue("billing")
    assert store.crl_revoked(revoked_peer.leaf) is False
    _write_crl(crl_setup, crl_setup.ca.crl([revoked_peer.leaf], number=6))
    assert crl_setup.reload(store) == (2, None)
    assert store.crl_revoked(revoked_peer.leaf) is True
    assert store.crl_revoked(good_peer.leaf) is False


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda ca: ca.crl(number=4), "lower than the current 5"),
        (lambda ca: ca.crl(number=9, last_update=now() - datetime.timedelta(hours=3),
                           next_update=now() - datetime.timedelta(hours=1)), "stale"),
        (lambda ca: ca.crl(number=9, signer_key=new_key()), "signature does not verify"),
    ],
    ids=["replayed", "stale", "forged"],
)
def test_bad_crl_is_refused_on_reload(crl_setup: Setup, make, words: str) -> None:
    store = crl_setup.store()
    _write_crl(crl_setup, make(crl_setup.ca))
    generation, failure = crl_setup.reload(store)
    assert failure is not None and words in str(failure.value)
    assert store.material.crl_number == 5


def test_fetched_crl_is_checked_before_use(crl_setup: Setup) -> None:
    store = crl_setup.store()
    good = crl_setup.ca.crl(number=7).public_bytes(serialization.Encoding.DER)
    assert pki.crl_number(store.check_crl_bytes(good)) == 7
    with pytest.raises(ConfigError, match="lower than"):
        store.check_crl_bytes(crl_setup.ca.crl(number=2).public_bytes(serialization.Encoding.DER))
    with pytest.raises(ConfigError, match="malformed CRL"):
        store.check_crl_bytes(b"not a crl")



def _write_crls(setup: Setup, *crls) -> None:
    (setup.directory / "ca.crl").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))


def test_a_crl_file_with_the_intermediates_and_the_roots_crl_loads_and_reloads(crl_setup: Setup) -> None:
    ca = crl_setup.ca
    _write_crls(crl_setup, ca.crl(root=True, number=3), ca.crl(number=5))  # root's first: order is free
    store = crl_setup.store()
    assert store.crl is not None and store.crl.issuer == ca.intermediate.subject  # the leaves' CRL
    assert store.material.crl_number == 5
    assert [crl.issuer for crl in store.material.other_crls] == [ca.root.subject]
    _write_crls(crl_setup, ca.crl(number=6), ca.crl([ca.intermediate], root=True, number=4))
    assert crl_setup.reload(store) == (2, None)
    (root_crl,) = store.material.other_crls
    assert pki.is_revoked(root_crl, ca.intermediate) and store.material.crl_number == 6
    # a fetched intermediate CRL is numbered against the intermediate's, not the root's
    assert pki.crl_number(store.check_crl_bytes(ca.crl(number=7).public_bytes(serialization.Encoding.DER))) == 7


@pytest.mark.parametrize(
    ("crls", "words"),
    [
        (lambda ca: (ca.crl(number=6), ca.crl(number=7)), "several CRLs of CN=Test Root Intermediate"),
        (lambda ca: (ca.crl(number=6), ca.crl(root=True, number=2), ca.crl(root=True, number=3)),
         "several CRLs of CN=Test Root"),
        (lambda ca: (ca.crl(number=6), ca.crl(root=True, signer_key=new_key())), "signature does not verify"),
    ],
    ids=["two-of-the-intermediate", "two-of-the-root", "forged-root-crl"],
)  # fmt: skip
def test_a_crl_file_with_two_crls_of_one_ca_or_a_forged_one_is_refused(crl_setup: Setup, crls, words: str) -> None:
    store = crl_setup.store()
    _write_crls(crl_setup, *crls(crl_setup.ca))
    generation, failure = crl_setup.reload(store)
    assert failure is not None and words in str(failure.value) and "ca.crl" in str(failure.value)
    assert store.material.crl_number == 5 and store.material.other_crls == ()
    with pytest.raises(ConfigError, match=words):
        crl_setup.store()


def test_a_roots_crl_going_backwards_is_refused_on_reload(crl_setup: Setup) -> None:
    ca = crl_setup.ca
    _write_crls(crl_setup, ca.crl(number=5), ca.crl(root=True, number=3))
    store = crl_setup.store()
    _write_crls(crl_setup, ca.crl(number=6), ca.crl(root=True, number=2))
    generation, failure = crl_setup.reload(store)
    assert failure is not None and "CRL of CN=Test Root)" in str(failure.value) and "lower than the current 3" in str(
        failure.value
    )


def test_store_loads_identities_from_the_real_ca(tmp_path: Path) -> None:
    """Files written by the CA library load as they are, and the served chain verifies."""
    authority_module = pytest.importorskip("s2sgw.ca.authority")
    authority = authority_module.CertificateAuthority.init(tmp_path / "ca", "corp.test")
    cert_path, key_path = authority.write_identity(authority.issue("orders"), tmp_path)
    config_path = tmp_path / "gw.toml"
    config_path.write_text(
        f'trust = "{tmp_path / "ca" / "bundle.pem"}"\n[status]\nmode = "off"\n'
        f'[[service]]\nname = "orders"\ncert = "{cert_path}"\nkey = "{key_path}"\n'
        '[[service.inbound]]\nlisten = "tcp:0"\nbackend = "tcp:127.0.0.1:1"\nallow = ["users"]\n'
    )
    store = TrustStore.load(load_config(config_path), FakeReactor(), threadpool=FakeThreadPool())
    assert store.trust_domain == "corp.test"
    users = authority.issue("users")
    peer = Identity(
        pki.parse_certificates(users.chain_pem), pki.parse_private_key(users.key_pem)  # type: ignore[arg-type]
    )
    context = tls.client_context(peer.chain, peer.key, [authority.root_cert])
    pair = connect(store.server_creator("orders"), tls.ClientConnectionCreator(lambda: context, "orders"))
    assert pair.server.completed and pair.client.completed


def test_start_up_load_needs_no_reactor(setup: Setup) -> None:
    """twistd's option parsing loads the store before a reactor is chosen."""
    store = TrustStore.load(load_config(setup.config_path))
    assert store.generation == 1
    assert store.verify_chain(setup.ca.issue("users").chain)


def test_the_fake_trust_store_provides_what_routes_use() -> None:
    """Routes ask a trust store for connection creators only; the fake in their tests provides that."""
    from tests.tlshelpers import FakeTrustStore

    assert verifyObject(IConnectionCreators, FakeTrustStore())
