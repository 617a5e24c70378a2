"""Real OpenSSL handshakes between our connection creators, joined in memory by iosim."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from s2sgw import tls
from s2sgw import handshake
from s2sgw.interfaces import Reason
from tests.pkifactory import Identity, TestCA, new_key, now
from tests.tlshelpers import connect


def server_side(identity: Identity, ca: TestCA) -> tls.ServerConnectionCreator:
    context = tls.server_context(identity.chain, identity.key, [ca.root])
    return tls.ServerConnectionCreator(lambda: context)


def client_side(identity: Identity, ca: TestCA, hostname: str = "orders") -> tls.ClientConnectionCreator:
    context = tls.client_context(identity.chain, identity.key, [ca.root])
    return tls.ClientConnectionCreator(lambda: context, hostname)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create()


@pytest.fixture(scope="module")
def orders(ca: TestCA) -> Identity:
    return ca.issue("orders")


@pytest.fixture(scope="module")
def users(ca: TestCA) -> Identity:
    return ca.issue("users")


def test_mutual_handshake_completes_and_exposes_verified_chains(ca, orders, users) -> None:
    """Two certificates from the same bundle complete a handshake; each side sees the other's chain."""
    pair = connect(server_side(orders, ca), client_side(users, ca))
    assert pair.server.completed and pair.client.completed
    assert [c.serial_number for c in handshake.peer_chain(pair.server_tls)] == [
        users.leaf.serial_number,
        ca.intermediate.serial_number,
        ca.root.serial_number,
    ]
    assert handshake.peer_chain(pair.client_tls)[0].serial_number == orders.leaf.serial_number
    assert handshake.chain_error(pair.server_tls) is None
    version, cipher = handshake.negotiated(pair.server_tls)
    assert version == "TLSv1.3" and cipher
    pair.client_tls.write(b"hello")
    pair.flush()
    assert pair.server.received == b"hello"


def test_client_sends_sni_for_hostnames_not_for_ip_addresses(ca, orders, users) -> None:
    """SNI carries the remote's host name, and is left out for IP literals."""
    seen: list[bytes | None] = []
    context = tls.server_context(orders.chain, orders.key, [ca.root])
    context.set_tlsext_servername_callback(lambda connection: seen.append(connection.get_servername()))
    creator = tls.ServerConnectionCreator(lambda: context)
    connect(creator, client_side(users, ca, hostname="users.example.org"))
    connect(creator, client_side(users, ca, hostname="127.0.0.1"))
    assert seen == [b"users.example.org", None]


def test_tls12_is_negotiated_only_with_ecdhe_aead() -> None:
    """A TLS 1.2-only peer gets an ECDHE AEAD suite; a CBC-only peer is refused."""
    ca = TestCA.create()
    server_id, client_id = ca.issue("orders"), ca.issue("users")
    client_context = tls.client_context(client_id.chain, client_id.key, [ca.root])
    client_context.set_max_proto_version(SSL.TLS1_2_VERSION)
    pair = connect(server_side(server_id, ca), tls.ClientConnectionCreator(lambda: client_context, "orders"))
    version, cipher = handshake.negotiated(pair.server_tls)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)

    cbc_context = tls.client_context(client_id.chain, client_id.key, [ca.root])
    cbc_context.set_max_proto_version(SSL.TLS1_2_VERSION)
    cbc_context.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA256:AES128-SHA")
    pair = connect(server_side(server_id, ca), tls.ClientConnectionCreator(lambda: cbc_context, "orders"))
    assert not pair.server.completed
    assert handshake.handshake_failure(pair.server_tls, pair.server.lost)[0] == Reason.TLS_ERROR


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
def test_client_without_certificate_is_refused_as_no_client_cert(ca, orders, max_version: int) -> None:
    """A client that presents no certificate never completes a handshake with the server."""
    bare = SSL.Context(SSL.TLS_METHOD)
    bare.set_verify(SSL.VERIFY_NONE)
    bare.set_max_proto_version(max_version)
    pair = connect(server_side(orders, ca), tls.ClientConnectionCreator(lambda: bare, "orders"))
    assert not pair.server.completed
    assert pair.server.lost is not None
    reason, detail = handshake.handshake_failure(pair.server_tls, pair.server.lost)
    assert reason == Reason.NO_CLIENT_CERT, detail
    assert handshake.chain_error(pair.server_tls) is None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ca, other: ca.issue("users", not_after=now() - datetime.timedelta(minutes=1),
                                    not_before=now() - datetime.timedelta(hours=2)), Reason.EXPIRED),
        (lambda ca, other: ca.issue("users", not_before=now() + datetime.timedelta(hours=1)),
         Reason.NOT_YET_VALID),
        (lambda ca, other: other.issue("users"), Reason.UNTRUSTED_CHAIN),
        (lambda ca, other: ca.issue("users", sans=[]), Reason.NO_IDENTITY),
        (lambda ca, other: ca.issue("users", eku=(ExtendedKeyUsageOID.SERVER_AUTH,)), Reason.BAD_CERTIFICATE),
        (lambda ca, other: ca.issue("users", ca=True), Reason.BAD_CERTIFICATE),
        (lambda ca, other: ca.issue("users", eku=None), Reason.BAD_CERTIFICATE),
        (lambda ca, other: ca.issue("users", key=rsa.generate_private_key(65537, 1024)), Reason.BAD_CERTIFICATE),
    ],
    ids=["expired", "not-yet-valid", "foreign-ca", "no-san", "server-only-eku", "ca-leaf", "no-eku", "rsa1024"],
)
def test_server_records_why_a_client_certificate_was_refused(
    ca: TestCA, orders: Identity, make: Callable[[TestCA, TestCA], Identity], reason: str
) -> None:
    """The server refuses the handshake and records the reason code on its TLS protocol."""
    other = TestCA.create(cn="Foreign Root")
    client = make(ca, other)
    context = SSL.Context(SSL.TLS_METHOD)  # a permissive client: the server must do the refusing
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.use_certificate(client.chain[0])
    for intermediate in client.chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(client.key)
    context.set_verify(SSL.VERIFY_NONE)
    pair = connect(server_side(orders, ca), tls.ClientConnectionCreator(lambda: context, "orders"))
    assert not pair.server.completed
    assert getattr(pair.server_tls, tls.CHAIN_ERROR) == reason
    assert handshake.handshake_failure(pair.server_tls, pair.server.lost)[0] == reason
    assert pair.client.lost is not None


def test_self_signed_client_certificate_is_an_untrusted_chain(ca, orders) -> None:
    """A self-signed client certificate (even one naming our domain) is refused as untrusted_chain."""
    rogue = TestCA.create(cn="Rogue")
    # present only the leaf, without its intermediate: OpenSSL cannot build a path
    leaf = rogue.issue("users")
    context = tls.client_context([leaf.leaf], leaf.key, [ca.root])
    pair = connect(server_side(orders, ca), tls.ClientConnectionCreator(lambda: context, "orders"))
    assert getattr(pair.server_tls, tls.CHAIN_ERROR) == Reason.UNTRUSTED_CHAIN


def test_client_refuses_server_without_server_auth_usage(ca, users) -> None:
    """The outbound side checks the server's chain against the bundle and its serverAuth EKU."""
    server = ca.issue("orders", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    pair = connect(server_side(server, ca), client_side(users, ca))
    assert not pair.client.completed
    assert getattr(pair.client_tls, tls.CHAIN_ERROR) == Reason.BAD_CERTIFICATE


def test_client_refuses_server_from_foreign_ca(ca, users) -> None:
    """A server whose chain ends in another root is refused by the client before any byte flows."""
    other = TestCA.create(cn="Other Root")
    server = other.issue("orders")
    server_context = tls.server_context(server.chain, server.key, [ca.root])
    pair = connect(tls.ServerConnectionCreator(lambda: server_context), client_side(users, ca))
    assert not pair.client.completed
    assert getattr(pair.client_tls, tls.CHAIN_ERROR) == Reason.UNTRUSTED_CHAIN


def test_client_refuses_server_without_san(ca, users) -> None:
    """A server certificate without SANs cannot pass a hostname check by accident: it is refused."""
    server = ca.issue("orders", sans=[])
    pair = connect(server_side(server, ca), client_side(users, ca))
    assert not pair.client.completed
    assert getattr(pair.client_tls, tls.CHAIN_ERROR) == Reason.NO_IDENTITY


def test_verify_callback_fails_closed_on_exceptions(ca, orders) -> None:
    """A certificate whose extensions cannot be parsed makes the callback refuse, not crash."""
    verifier = tls._Verifier(ExtendedKeyUsageOID.CLIENT_AUTH)

    class Exploding:
        def to_cryptography(self):
            raise RuntimeError("boom")

    class Connection:
        def __init__(self) -> None:
            self.target = type("Target", (), {})()

        def get_app_data(self):
            return self.target

    connection = Connection()
    assert verifier(connection, Exploding(), 0, 0, 1) is False  # type: ignore[arg-type]
    assert getattr(connection.target, tls.CHAIN_ERROR) == Reason.BAD_CERTIFICATE


def test_only_first_chain_error_is_recorded() -> None:
    """Later callback invocations do not overwrite the first recorded reason."""
    verifier = tls._Verifier(ExtendedKeyUsageOID.CLIENT_AUTH)
    target = type("Target", (), {})()
    connection = type("C", (), {"get_app_data": lambda self: target})()
    assert verifier(connection, object(), 10, 0, 0) is False
    assert verifier(connection, object(), 20, 1, 0) is False
    assert getattr(target, tls.CHAIN_ERROR) == Reason.EXPIRED


def test_creators_use_the_current_context_for_each_new_connection(ca, users) -> None:
    """Swapping the context behind a creator changes the certificate new handshakes present."""
    first, second = ca.issue("orders"), ca.issue("orders")
    contexts = [tls.server_context(first.chain, first.key, [ca.root])]
    creator = tls.ServerConnectionCreator(lambda: contexts[-1])
    before = connect(creator, client_side(users, ca))
    contexts.append(tls.server_context(second.chain, second.key, [ca.root]))
    after = connect(creator, client_side(users, ca))
    assert handshake.peer_chain(before.client_tls)[0].serial_number == first.leaf.serial_number
    assert handshake.peer_chain(after.client_tls)[0].serial_number == second.leaf.serial_number
    # the live connection made with the old context still works
    before.client_tls.write(b"still here")
    before.flush()
    assert before.server.received == b"still here"


def test_context_rejects_key_that_does_not_match(ca) -> None:
    """Building a context with someone else's key fails at once, not at the first handshake."""
    identity = ca.issue("orders")
    with pytest.raises(SSL.Error):
        tls.server_context(identity.chain, new_key(), [ca.root])


def test_tls11_client_is_refused(ca, orders) -> None:
    """Protocol versions below TLS 1.2 never complete a handshake."""
    old = SSL.Context(SSL.TLS_METHOD)
    old.set_verify(SSL.VERIFY_NONE)
    old.set_min_proto_version(SSL.TLS1_VERSION)
    old.set_max_proto_version(SSL.TLS1_1_VERSION)
    old.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    pair = connect(server_side(orders, ca), tls.ClientConnectionCreator(lambda: old, "orders"))
    assert not pair.server.completed
    assert handshake.handshake_failure(pair.server_tls, pair.server.lost)[0] == Reason.TLS_ERROR


def test_sni_name_rules() -> None:
    assert tls.sni_name("users.example.org") == b"users.example.org"
    assert tls.sni_name("::1") is None
    assert tls.sni_name("10.0.0.1") is None
    assert tls.sni_name("") is None


def test_reason_for_unknown_verify_error_is_untrusted_chain() -> None:
    assert tls.reason_for_verify_error(9999)[0] == Reason.UNTRUSTED_CHAIN
    assert tls.reason_for_verify_error(10)[0] == Reason.EXPIRED




def test_peer_chain_is_the_verified_chain_or_nothing(ca, orders, users) -> None:
    """A client that verifies nothing completes its handshake, yet peer_chain never answers with
    the chain the server merely sent."""
    careless = SSL.Context(SSL.TLS_METHOD)
    careless.set_verify(SSL.VERIFY_NONE)
    careless.use_certificate(users.chain[0])
    careless.add_extra_chain_cert(users.chain[1])
    careless.use_privatekey(users.key)
    pair = connect(server_side(orders, ca), tls.ClientConnectionCreator(lambda: careless, "orders"))
    assert pair.server.completed and pair.client.completed
    assert len(pair.client_tls.getHandle().get_peer_cert_chain()) == 2  # sent, never verified
    with pytest.raises(handshake.NoVerifiedChain, match="did not verify: unable to get local issuer certificate"):
        handshake.peer_chain(pair.client_tls)
    assert [c.serial_number for c in handshake.peer_chain(pair.server_tls)][0] == users.leaf.serial_number
