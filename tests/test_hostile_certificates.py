"""Hostile certificates against a real gateway: every one is refused with its reason, no byte of
the peer reaches the backend (or, outbound, the remote), and allowed clients are still served.

One ``twistd s2sgw`` runs two services: ``users`` (inbound ``users-in`` -> an echo backend that
records every byte, allowing orders and reports) and ``orders`` (outbound ``orders-to-users`` to
``users-in`` on the same gateway, and ``orders-to-hostile`` to a TLS server in this process that
presents whatever certificate a test hands it). Status is OCSP against a real ``twistd s2sgw-ca``.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.hostile import (
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    assert_refused,
    ca_builder,
    client_context,
    free_port,
    gateway_toml,
    inbound_toml,
    keyless_exchange,
    leaf_builder,
    marker,
    metric,
    new_ec_key,
    new_rsa_key,
    now,
    outbound_toml,
    plain_exchange,
    resign_sha1,
    root_key,
    roundtrip,
    service_toml,
    sha256,
    spiffe,
    tls_exchange,
    write_identity,
)
from tests.pkifactory import TestCA

pytestmark = pytest.mark.e2e

SERVER_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH,)
CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)


class HostileServer:
    """A TLS server in a thread presenting a chosen certificate; records decrypted bytes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.accepted = 0
        self.context: ssl.SSLContext | None = None
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def present(self, pem: Path, weak: bool = False) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if weak:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.load_cert_chain(pem, pem.with_suffix(".key"))
        self.context = context

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(5)
        try:
            if self.context is None:
                return
            with self.context.wrap_socket(sock, server_side=True) as tls:
                while data := tls.recv(65536):
                    self.received += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


@attrs.define
class World:
    pki: Pki
    procs: Processes
    gateway: Gateway
    backend: RecordingBackend
    hostile: HostileServer
    users_port: int
    orders_port: int
    hostile_route_port: int
    odd: Path  # where tests write odd identities
    admin_port: int

    def refusals(self, route: str, reason: str) -> float:
        """The gateway's s2sgw_connections counter of refusals on ``route`` for ``reason``."""
        value = metric(self.admin_port, "s2sgw_connections_total", route=route, outcome="refused", reason=reason)
        assert value is not None, "the admin endpoint does not answer"
        return value

    @property
    def allowed(self) -> ssl.SSLContext:
        certs = self.pki.certs
        return client_context(certs / "orders.pem", certs / "orders.key", self.pki.bundle)

    def assert_still_serving(self) -> None:
        """An allowed client, straight and through the outbound route, still gets its answer."""
        roundtrip(self.users_port, self.allowed)
        payload = b"via outbound route\n"
        exchange = plain_exchange(self.orders_port, payload, expect=len(payload) + 5)
        assert exchange.received == b"echo:" + payload, exchange

    def refuse_inbound(self, attempt: Callable[[bytes], object], reason: str | tuple[str, ...], case: str) -> str:
        """``attempt`` is refused on users-in with ``reason`` (or one of them), audited and counted
        once, and the backend never hears of it."""
        reasons = (reason,) if isinstance(reason, str) else reason
        mark = self.gateway.mark()
        before = self.backend.snapshot()
        counted = sum(self.refusals("users-in", each) for each in reasons)
        exchange = attempt(marker(case))
        assert_refused(exchange)  # type: ignore[arg-type]
        line = self.gateway.wait_audit(mark, "users-in", "outcome=refused ")
        assert any(f"reason={each} " in line for each in reasons), line
        assert sum(self.refusals("users-in", each) for each in reasons) == counted + 1
        assert len([x for x in self.gateway.audits_since(mark, "users-in") if "outcome=refused" in x]) == 1
        self.backend.assert_untouched_since(before)
        self.assert_still_serving()
        return line

    def refuse_with(self, pem: Path | None, reason: str, case: str, *, weak: bool = False) -> str:
        key = pem.with_suffix(".key") if pem is not None else None
        context = client_context(pem, key, None, weak=weak)
        return self.refuse_inbound(lambda payload: tls_exchange(self.users_port, context, payload), reason, case)

    def refuse_server(self, pem: Path, reason: str, case: str, *, weak: bool = False) -> str:
        """orders dials a remote presenting ``pem``: refused, and the local client's bytes never leave."""
        self.hostile.present(pem, weak)
        self.hostile.received.clear()
        mark = self.gateway.mark()
        counted = self.refusals("orders-to-hostile", reason)
        exchange = plain_exchange(self.hostile_route_port, marker(case))
        assert_refused(exchange)
        line = self.gateway.wait_audit(mark, "orders-to-hostile", "outcome=refused ", f"reason={reason} ")
        assert self.refusals("orders-to-hostile", reason) == counted + 1
        assert bytes(self.hostile.received) == b""
        self.assert_still_serving()
        return line

    def issue(self, name: str, **kwargs) -> Path:
        out = self.odd / f"issued-{name}-{len(list(self.odd.glob('*')))}"
        self.pki.ca.write_identity(self.pki.ca.issue(name, **kwargs), out)
        return out / f"{name}.pem"

    def odd_leaf(self, case: str, name: str = "orders", *, key=None, sign: Callable | None = None, **kwargs) -> Path:
        """A leaf signed by the real intermediate, shaped by ``kwargs`` (see hostile.leaf_builder)."""
        ca = self.pki.ca
        key = key or new_ec_key()
        builder = leaf_builder(name, key.public_key(), ca.intermediate_cert, ca.intermediate_key, **kwargs)
        leaf = builder.sign(ca.intermediate_key, sha256())
        if sign is not None:
            leaf = sign(leaf)
        return write_identity(self.odd / case, name, [leaf, ca.intermediate_cert], key)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-certificates")
    ports = {name: free_port() for name in ("ca", "users", "orders", "hostile_route", "admin")}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "billing", "reports"))
    procs = Processes(root)
    backend = RecordingBackend(root / "backend.bytes")
    hostile = HostileServer()
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")
        procs.wait_port(ports["ca"])
        certs = pki.certs
        services = service_toml(
            "users", certs / "users.pem", certs / "users.key",
            inbound_toml("users-in", ports["users"], backend.port, ["orders", "reports"]),
        ) + service_toml(
            "orders", certs / "orders.pem", certs / "orders.key",
            outbound_toml("orders-to-users", ports["orders"], ports["users"], "users")
            + outbound_toml("orders-to-hostile", ports["hostile_route"], hostile.port, "users"),
        )  # fmt: skip
        status = f'mode = "ocsp"\nurl = "http://127.0.0.1:{ports["ca"]}/ocsp"\nfail = "closed"\nmax_cache_age = 1.0'
        admin = f'[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"'
        gateway = Gateway.start(
            procs, "gateway", gateway_toml(pki.bundle, services, status=status, extra=admin),
            [ports["users"], ports["orders"], ports["hostile_route"], ports["admin"]],
        )  # fmt: skip
        world = World(
            pki, procs, gateway, backend, hostile, ports["users"], ports["orders"], ports["hostile_route"],
            root / "odd", ports["admin"],
        )  # fmt: skip
        world.assert_still_serving()
        yield world
    finally:
        procs.stop_all()
        backend.stop()
        hostile.stop()


# ---------------------------------------------------------------------------------------------
# Inbound: what a client presents


def test_a_client_without_a_certificate_is_refused(world: World) -> None:
    world.refuse_with(None, "no_client_cert", "no-cert")


def test_openssl_s_client_without_a_certificate_is_refused(world: World) -> None:
    from tests.hostile import s_client

    mark = world.gateway.mark()
    before = world.backend.snapshot()
    result = s_client(world.users_port, "-CAfile", str(world.pki.bundle), "-ign_eof", stdin=marker("s_client-no-cert"))
    assert b"echo:" not in result.stdout
    world.gateway.wait_audit(mark, "users-in", "reason=no_client_cert ")
    world.backend.assert_untouched_since(before)
    world.assert_still_serving()


def test_a_self_signed_certificate_is_an_untrusted_chain(world: World) -> None:
    key = new_ec_key()
    cert = ca_builder("orders", key.public_key(), None, key).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe("orders"))]), critical=False
    ).sign(key, sha256())
    pem = write_identity(world.odd / "self-signed", "orders", [cert], key)
    world.refuse_with(pem, "untrusted_chain", "self-signed")


def test_a_certificate_from_a_foreign_ca_is_an_untrusted_chain(world: World) -> None:
    """Same trust domain, same name, another CA: the chain does not reach our root."""
    foreign = TestCA.create(domain="e2e.s2sgw.test", cn=world.pki.ca.root_cert.subject.rfc4514_string()[3:])
    pem = write_identity(world.odd / "foreign", "orders", *_chain_and_key(foreign.issue("orders")))
    world.refuse_with(pem, "untrusted_chain", "foreign-ca")


def _chain_and_key(identity) -> tuple[list[x509.Certificate], object]:
    return list(identity.chain), identity.key


def test_a_leaf_without_its_intermediate_is_an_untrusted_chain(world: World) -> None:
    issued = world.issue("orders")
    leaf_only = issued.parent / "leaf-only.pem"
    leaf_only.write_bytes(x509.load_pem_x509_certificates(issued.read_bytes())[0].public_bytes(_pem()))
    issued.with_suffix(".key").rename(leaf_only.with_suffix(".key"))
    world.refuse_with(leaf_only, "untrusted_chain", "missing-intermediate")


def _pem():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM


def test_a_leaf_with_a_foreign_intermediate_is_an_untrusted_chain(world: World) -> None:
    issued = world.issue("orders")
    foreign = TestCA.create(domain="e2e.s2sgw.test")
    leaf = x509.load_pem_x509_certificates(issued.read_bytes())[0]
    wrong = issued.parent / "wrong-intermediate.pem"
    wrong.write_bytes(leaf.public_bytes(_pem()) + foreign.intermediate.public_bytes(_pem()))
    issued.with_suffix(".key").rename(wrong.with_suffix(".key"))
    world.refuse_with(wrong, "untrusted_chain", "foreign-intermediate")


def test_an_impostor_intermediate_with_our_intermediates_name_is_an_untrusted_chain(world: World) -> None:
    """An intermediate named like ours but with another key (its signature by our root fails)."""
    ca = world.pki.ca
    impostor_key = new_ec_key()
    impostor = (
        ca_builder(ca.intermediate_cert.subject, impostor_key.public_key(), ca.root_cert, impostor_key)
        .sign(impostor_key, sha256())
    )
    key = new_ec_key()
    leaf = leaf_builder("orders", key.public_key(), impostor, impostor_key).sign(impostor_key, sha256())
    pem = write_identity(world.odd / "impostor", "orders", [leaf, impostor], key)
    world.refuse_with(pem, "untrusted_chain", "impostor-intermediate")


def test_an_expired_leaf_is_refused_as_expired(world: World) -> None:
    out = world.odd / "expired"
    world.pki.issue_expired("orders", out)
    world.refuse_with(out / "orders.pem", "expired", "expired-leaf")


def test_a_leaf_not_yet_valid_is_refused_as_not_yet_valid(world: World) -> None:
    pem = world.odd_leaf("future", not_before=now() + datetime.timedelta(hours=1))
    world.refuse_with(pem, "not_yet_valid", "future-leaf")


def test_a_leaf_under_an_expired_intermediate_is_refused_as_expired(world: World) -> None:
    ca = world.pki.ca
    signing_root = root_key(world.pki)
    old_key = new_ec_key()
    past = now() - datetime.timedelta(days=10)
    intermediate = ca_builder(
        "e2e old intermediate", old_key.public_key(), ca.root_cert, signing_root,
        not_before=past, not_after=past + datetime.timedelta(days=1),
    ).sign(signing_root, sha256())  # fmt: skip
    key = new_ec_key()
    leaf = leaf_builder(
        "orders", key.public_key(), intermediate, old_key,
        not_before=past + datetime.timedelta(hours=1), not_after=now() + datetime.timedelta(days=1),
    ).sign(old_key, sha256())  # fmt: skip
    pem = write_identity(world.odd / "expired-intermediate", "orders", [leaf, intermediate], key)
    world.refuse_with(pem, "expired", "expired-intermediate")


def test_a_ca_leaf_is_a_bad_certificate(world: World) -> None:
    world.refuse_with(world.odd_leaf("ca-true", ca=True), "bad_certificate", "ca-true-leaf")


def test_a_client_with_server_auth_only_is_a_bad_certificate(world: World) -> None:
    world.refuse_with(world.odd_leaf("server-auth-only", eku=SERVER_AUTH), "bad_certificate", "server-auth-only")


def test_a_leaf_without_san_is_refused_as_no_identity(world: World) -> None:
    """A CN of "orders" is never read as an identity."""
    world.refuse_with(world.odd_leaf("no-san", sans=[]), "no_identity", "no-san")


def test_a_spiffe_id_with_a_port_is_not_allowed(world: World) -> None:
    sans = [x509.UniformResourceIdentifier("spiffe://e2e.s2sgw.test:443/orders"), x509.DNSName("orders")]
    line = world.refuse_with(world.odd_leaf("uri-port", sans=sans), "identity_not_allowed", "uri-port")
    assert "peer=spiffe://e2e.s2sgw.test:443/orders " in line


def test_a_spiffe_id_of_another_trust_domain_is_not_allowed_even_with_a_matching_dns_name(world: World) -> None:
    sans = [x509.UniformResourceIdentifier(spiffe("orders", "evil.test")), x509.DNSName("orders")]
    line = world.refuse_with(world.odd_leaf("other-domain", sans=sans), "identity_not_allowed", "other-domain")
    assert "peer=spiffe://evil.test/orders " in line


def test_a_good_identity_not_on_the_allow_list_is_refused(world: World) -> None:
    line = world.refuse_with(world.pki.certs / "billing.pem", "identity_not_allowed", "not-allowed")
    assert f"peer={spiffe('billing')} " in line


def test_a_revoked_leaf_is_refused_as_revoked(world: World) -> None:
    pem = world.issue("reports")
    context = client_context(pem, pem.with_suffix(".key"), world.pki.bundle)
    roundtrip(world.users_port, context)
    serial = x509.load_pem_x509_certificates(pem.read_bytes())[0].serial_number
    world.pki.ca.revoke(serial=serial, reason="keyCompromise")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the CA notices the revocation; the gateway's 1 s cache runs out
        probe = b"still admitted?\n"
        mark = world.gateway.mark()
        if tls_exchange(world.users_port, context, probe, expect=len(probe) + 5).received != b"echo:" + probe:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the revoked leaf was still admitted 10 s after its revocation")
    world.gateway.wait_audit(mark, "users-in", "reason=revoked ")
    line = world.refuse_with(pem, "revoked", "revoked")
    assert "peer=spiffe://e2e.s2sgw.test/reports " in line


def test_a_client_without_the_key_of_its_certificate_is_refused(world: World) -> None:
    """A stolen certificate without its key: the handshake signature does not verify."""
    pem = world.pki.certs / "orders.pem"
    for _ in range(3):  # the same verdict every time, never relayed
        line = world.refuse_inbound(
            lambda payload: keyless_exchange(world.users_port, pem, payload, timeout=20.0), "tls_error", "keyless"
        )
        assert "bad signature" in line, line


def test_an_rsa_1024_leaf_is_a_bad_certificate(world: World) -> None:
    pem = world.odd_leaf("rsa1024", key=new_rsa_key(1024))
    world.refuse_with(pem, "bad_certificate", "rsa-1024", weak=True)


def test_a_sha1_signed_leaf_is_a_bad_certificate(world: World) -> None:
    pem = world.odd_leaf("sha1", sign=lambda leaf: resign_sha1(leaf, world.pki.ca.intermediate_key))
    world.refuse_with(pem, "bad_certificate", "sha1", weak=True)


# ---------------------------------------------------------------------------------------------
# Outbound: what a remote gateway presents


def test_a_remote_with_client_auth_only_is_a_bad_certificate(world: World) -> None:
    world.refuse_server(world.odd_leaf("client-auth-only", "users", eku=CLIENT_AUTH), "bad_certificate", "client-auth-only")


def test_a_remote_without_san_is_refused_as_no_identity(world: World) -> None:
    world.refuse_server(world.odd_leaf("server-no-san", "users", sans=[]), "no_identity", "server-no-san")


def test_a_remote_proving_another_identity_is_a_mismatch(world: World) -> None:
    line = world.refuse_server(world.pki.certs / "billing.pem", "identity_mismatch", "impostor-remote")
    assert f"peer={spiffe('billing')} " in line


def test_a_self_signed_remote_is_an_untrusted_chain(world: World) -> None:
    key = new_ec_key()
    cert = ca_builder("users", key.public_key(), None, key).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe("users"))]), critical=False
    ).sign(key, sha256())
    pem = write_identity(world.odd / "server-self-signed", "users", [cert], key)
    world.refuse_server(pem, "untrusted_chain", "server-self-signed")


def test_an_rsa_1024_remote_is_a_bad_certificate(world: World) -> None:
    pem = world.odd_leaf("server-rsa1024", "users", key=new_rsa_key(1024))
    world.refuse_server(pem, "bad_certificate", "server-rsa-1024", weak=True)


# ---------------------------------------------------------------------------------------------
# Status mode "crl"


@attrs.define
class CrlWorld:
    gateway: Gateway
    port: int
    revoked: Path  # a leaf the intermediate's CRL lists
    under_revoked_intermediate: Path  # a leaf of an intermediate the root's CRL revokes


def _intermediate_leaf(world: World, cn: str, directory: str) -> tuple[x509.Certificate, Path]:
    """Another intermediate of our root and a leaf "orders" under it; returns (intermediate, pem)."""
    signing_root = root_key(world.pki)
    other_key = new_ec_key()
    other = ca_builder(cn, other_key.public_key(), world.pki.ca.root_cert, signing_root).sign(signing_root, sha256())
    key = new_ec_key()
    leaf = leaf_builder("orders", key.public_key(), other, other_key).sign(other_key, sha256())
    return other, write_identity(world.odd / directory, "orders", [leaf, other], key)


@pytest.fixture(scope="module")
def crl_world(world: World) -> Iterator[CrlWorld]:
    """A second gateway, status mode "crl", holding the intermediate's CRL (one leaf revoked)
    and the root's CRL (revoking another intermediate of the root, not the CA's)."""
    ca = world.pki.ca
    revoked = world.issue("reports")
    ca.revoke(serial=x509.load_pem_x509_certificates(revoked.read_bytes())[0].serial_number, reason="keyCompromise")
    retired, under_retired = _intermediate_leaf(world, "e2e revoked intermediate", "revoked-intermediate")
    crl = world.odd / "intermediate-and-root.crl"
    crl.write_bytes(ca.make_crl().public_bytes(_pem()) + _root_crl(world, retired).public_bytes(_pem()))
    port = free_port()
    certs = world.pki.certs
    services = service_toml(
        "users", certs / "users.pem", certs / "users.key",
        inbound_toml("crl-in", port, world.backend.port, ["orders", "reports"]),
    )  # fmt: skip
    gateway = Gateway.start(
        world.procs, "crl-gateway", gateway_toml(world.pki.bundle, services, status=f'mode = "crl"\ncrl = "{crl}"'), [port]
    )
    roundtrip(port, world.allowed)  # the root's CRL does not list the CA's own intermediate
    yield CrlWorld(gateway, port, revoked, under_retired)


def _root_crl(world: World, intermediate: x509.Certificate) -> x509.CertificateRevocationList:
    """The root's CRL revoking ``intermediate`` (built from the CA directory's root key)."""
    at = now() - datetime.timedelta(minutes=1)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(intermediate.serial_number)
        .revocation_date(at)
        .add_extension(x509.CRLReason(x509.ReasonFlags.ca_compromise), critical=False)
        .build()
    )
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(world.pki.ca.root_cert.subject)
        .last_update(at)
        .next_update(at + datetime.timedelta(hours=2))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_revoked_certificate(entry)
        .sign(root_key(world.pki), sha256())
    )


def _refused_in_crl_mode(world: World, crl_world: CrlWorld, pem: Path, reason: str, case: str) -> str:
    mark, before = crl_world.gateway.mark(), world.backend.snapshot()
    exchange = tls_exchange(crl_world.port, client_context(pem, pem.with_suffix(".key")), marker(case))
    assert_refused(exchange)
    line = crl_world.gateway.wait_audit(mark, "crl-in", "outcome=refused ", f"reason={reason} ")
    world.backend.assert_untouched_since(before)
    roundtrip(crl_world.port, world.allowed)
    return line


def test_a_leaf_revoked_in_the_crl_is_refused_in_crl_mode(world: World, crl_world: CrlWorld) -> None:
    line = _refused_in_crl_mode(world, crl_world, crl_world.revoked, "revoked", "crl-revoked")
    assert "keyCompromise" in line


def test_a_leaf_of_an_intermediate_the_roots_crl_revokes_is_refused_in_crl_mode(
    world: World, crl_world: CrlWorld
) -> None:
    """The chain verifies and the leaf itself is listed nowhere, but the root's CRL (held beside
    the intermediate's in ``status.crl``) revokes its intermediate: refused as revoked."""
    pem = crl_world.under_revoked_intermediate
    line = _refused_in_crl_mode(world, crl_world, pem, "revoked", "crl-revoked-intermediate")
    assert "cACompromise" in line


def test_a_leaf_under_an_intermediate_whose_crl_we_do_not_hold_is_refused_in_crl_mode(
    world: World, crl_world: CrlWorld
) -> None:
    """Another intermediate of our root that the root's CRL does not revoke: its leaves chain
    fine, but the gateway holds no CRL of their issuer, so they are refused."""
    other, pem = _intermediate_leaf(world, "e2e retired intermediate", "other-intermediate")
    # OCSP mode: the CA's responder speaks for its own intermediate only, and says so
    line = world.refuse_with(pem, "status_invalid", "ocsp-other-intermediate")
    assert "UNAUTHORIZED" in line
    line = _refused_in_crl_mode(world, crl_world, pem, "status_invalid", "crl-other-intermediate")
    assert "not issued by the leaf's issuer" in line
