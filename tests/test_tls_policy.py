"""The TLS policy is pinned in our contexts, not inherited from OpenSSL: key exchange groups,
signature algorithms, no resumption; and a TLS failure always says what failed.

Peers are bare pyOpenSSL contexts narrowed to one offer through the same OpenSSL binding our
contexts use, joined to ours in memory.
"""

from __future__ import annotations

import functools

import pytest
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as ssl_lib
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sgw import tls, tlspolicy
from s2sgw import handshake
from s2sgw.interfaces import Reason
from tests import chainkit as kit
from tests.tlshelpers import Pair, connect


@functools.cache
def identity(kind: str = "p256") -> kit.Path:
    return kit.standard(kind)


def ours_as_server(kind: str = "p256") -> tls.ServerConnectionCreator:
    path = identity(kind)
    context = tls.server_context(path.chain, path.leaf_key, [identity().root])
    return tls.ServerConnectionCreator(lambda: context)


def ours_as_client() -> tls.ClientConnectionCreator:
    path = identity()
    context = tls.client_context(path.chain, path.leaf_key, [identity().root, identity("rsa3072").root])
    return tls.ClientConnectionCreator(lambda: context, "svc")


def bare(
    *,
    groups: bytes | None = None,
    sigalgs: bytes | None = None,
    max_version: int | None = None,
    present: kit.Path | None = None,
) -> SSL.Context:
    """A peer that verifies nothing, offering only ``groups`` / ``sigalgs`` when given."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if groups is not None:
        assert ssl_lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
    if sigalgs is not None:
        assert ssl_lib.SSL_CTX_set1_sigalgs_list(context._context, sigalgs) == 1
    path = present or identity()
    context.use_certificate(crypto.X509.from_cryptography(path.chain[0]))
    for certificate in path.chain[1:]:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(certificate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(path.leaf_key))
    return context


def to_our_server(peer: SSL.Context, kind: str = "p256") -> Pair:
    return connect(ours_as_server(kind), tls.ClientConnectionCreator(lambda: peer, "svc"))


def to_our_client(peer: SSL.Context) -> Pair:
    return connect(tls.ServerConnectionCreator(lambda: peer), ours_as_client())


@pytest.mark.parametrize(
    ("offer", "group"), [(None, "x25519"), (b"X25519", "x25519"), (b"P-256", "secp256r1"), (b"P-384", "secp384r1")]
)
def test_key_exchange_uses_x25519_p256_or_p384(offer: bytes | None, group: str) -> None:
    """Whatever a peer offers of X25519, P-256 and P-384 is used, by our server and our client."""
    for pair, ours in ((to_our_server(bare(groups=offer)), "server_tls"), (to_our_client(bare(groups=offer)), "client_tls")):
        assert pair.server.completed and pair.client.completed
        assert getattr(pair, ours).getHandle().get_group_name() == group


@pytest.mark.parametrize("offer", [b"P-521", b"X448", b"ffdhe2048", b"X25519MLKEM768"])
@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
def test_key_exchange_groups_outside_the_list_are_refused(offer: bytes, version: int) -> None:
    """Neither our server nor our client agrees to a group outside the list."""
    if version == SSL.TLS1_2_VERSION and offer == b"X25519MLKEM768":
        pytest.skip("TLS 1.2 has no hybrid groups")
    served = to_our_server(bare(groups=offer, max_version=version))
    assert not served.server.completed
    assert handshake.handshake_failure(served.server_tls, served.server.lost)[0] == Reason.TLS_ERROR
    dialled = to_our_client(bare(groups=offer, max_version=version))
    assert not dialled.client.completed


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
def test_sha1_signatures_are_never_agreed(version: int) -> None:
    """A peer that can only verify SHA-1 handshake signatures gets none from us."""
    pair = to_our_server(bare(sigalgs=b"ECDSA+SHA1:RSA+SHA1", max_version=version))
    assert not pair.server.completed
    assert handshake.handshake_failure(pair.server_tls, pair.server.lost)[0] == Reason.TLS_ERROR


def test_tls13_certificate_verify_is_never_pkcs1() -> None:
    """With an RSA certificate, TLS 1.3 signs with RSA-PSS; a peer offering only PKCS#1 v1.5 fails."""
    pss = to_our_server(bare(max_version=SSL.TLS1_3_VERSION), kind="rsa3072")
    assert pss.server.completed and pss.client.completed
    pkcs1 = to_our_server(bare(sigalgs=b"rsa_pkcs1_sha256:rsa_pkcs1_sha384", max_version=SSL.TLS1_3_VERSION), kind="rsa3072")
    assert not pkcs1.server.completed


def test_the_pinned_lists_name_no_weak_algorithm() -> None:
    names = tlspolicy.SIGNATURE_ALGORITHMS.decode().split(":")
    assert not [name for name in names if "sha1" in name or "sha224" in name or name.startswith("dsa")]
    assert tlspolicy.GROUPS == b"X25519:P-256:P-384"


def _full_handshakes(version: int) -> list[int]:
    """Certificates the client saw in two connections, the second offering the first's session."""
    seen: list[int] = []
    client = bare(max_version=version)
    client.set_verify(SSL.VERIFY_PEER, lambda connection, certificate, errno, depth, ok: seen.append(depth) or True)
    first = to_our_server(client)
    assert first.server.completed
    session = first.client_tls.getHandle().get_session()
    count = len(seen)

    @implementer(IOpenSSLClientConnectionCreator)
    class Resuming:
        def clientConnectionForTLS(self, tls_protocol):
            connection = SSL.Connection(client, None)
            connection.set_app_data(tls_protocol)
            if session is not None:
                connection.set_session(session)
            connection.set_connect_state()
            return connection

    second = connect(ours_as_server(), Resuming())
    assert second.server.completed
    return [count, len(seen) - count]


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
def test_sessions_are_never_resumed(version: int) -> None:
    """Every connection proves its certificate: an offered session leads to a full handshake."""
    first, second = _full_handshakes(version)
    assert first > 0 and second == first  # the server's certificates were shown again


def _tickets_received() -> int:
    states: list[bytes] = []
    client = bare(max_version=SSL.TLS1_3_VERSION)
    client.set_info_callback(lambda connection, where, ret: states.append(connection.get_state_string()))
    pair = to_our_server(client)
    pair.client_tls.write(b"x")
    pair.flush()
    return sum(b"session ticket" in state for state in states)


def test_tls13_sends_no_session_tickets() -> None:
    """Resumption is off, so TLS 1.3 servers should not send tickets no cache will ever honour."""
    if not hasattr(SSL.Context, "set_num_tickets"):
        pytest.skip("this pyOpenSSL has no set_num_tickets: TLS 1.3 still sends two unusable tickets")
    assert _tickets_received() == 0


def test_ssl_error_words_are_never_empty() -> None:
    assert handshake.ssl_error_text(SSL.Error([("SSL routines", "", "no shared cipher")])) == "no shared cipher"
    assert handshake.ssl_error_text(SSL.Error([])) == "Error without details from OpenSSL"
    assert handshake.ssl_error_text(SSL.SysCallError(-1, "Unexpected EOF")) == "Unexpected EOF"
    assert handshake.failure_words(Failure(SSL.Error([]))) == "Error without details from OpenSSL"
    assert handshake.failure_words(None)
    reason, detail = handshake.handshake_failure(object(), Failure(SSL.Error([])))
    assert (reason, detail) == (Reason.TLS_ERROR, "Error without details from OpenSSL")
