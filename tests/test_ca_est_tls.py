"""The EST listener's own certificate and TLS: issued to itself, renewed on a Clock, client certs recorded."""

from __future__ import annotations

import datetime
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.web import server
from zope.interface import implementer

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.ca.est_tls import EstListener, _CurrentContext, san_for, tls_peer
from s2sgw.ca.store import EST_SERVER

DOMAIN = "example.org"


@attrs.define
class FakePort:
    port: int = 8443
    stopped: bool = False

    def getHost(self) -> Any:
        return types.SimpleNamespace(port=self.port)

    def stopListening(self) -> None:
        self.stopped = True


@attrs.define
class FakeEndpoint:
    factories: list[Any] = attrs.field(factory=list)
    port: FakePort = attrs.field(factory=FakePort)
    busy: int = 0  # how many listen() calls fail with "address in use"

    def listen(self, factory: Any) -> defer.Deferred:
        if self.busy > 0:
            self.busy -= 1
            return defer.fail(OSError(98, "Address already in use"))
        self.factories.append(factory)
        return defer.succeed(self.port)


@attrs.define
class Runner:
    """Runs store work at once; certificate issuance is counted, and fails while ``failing`` > 0."""

    failing: int = 0
    calls: int = 0

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if f.__name__ != "build_material":
            return defer.maybeDeferred(f, *args)
        self.calls += 1
        if self.failing > 0:
            self.failing -= 1
            return defer.fail(RuntimeError("CA store is read-only"))
        return defer.maybeDeferred(f, *args)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", DOMAIN)


def make_listener(
    ca: CertificateAuthority, *, lifetime: float = 90.0, runner: Runner | None = None
) -> tuple[EstListener, task.Clock, FakeEndpoint, Runner]:
    clock = task.Clock()
    clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
    endpoint = FakeEndpoint()
    runner = runner or Runner()
    listener = EstListener(
        ca=ca,
        names=("localhost", "127.0.0.1", "ca.example.org"),
        endpoint=endpoint,
        site=server.Site(None),
        clock=clock,
        in_thread=runner,
        lifetime=datetime.timedelta(seconds=lifetime),
    )
    return listener, clock, endpoint, runner


def est_server_rows(ca: CertificateAuthority) -> list[Any]:
    return ca.store.rows(kind=EST_SERVER)


def test_the_listener_opens_with_a_certificate_the_ca_issued_to_itself(ca: CertificateAuthority) -> None:
    listener, _, endpoint, _ = make_listener(ca)
    listener.startService()

    assert len(endpoint.factories) == 1 and listener.port is endpoint.port
    certificate = listener.material.certificate
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ca.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # never a service identity
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    certificate.verify_directly_issued_by(ca.intermediate_cert)
    (row,) = est_server_rows(ca)
    assert row.serial == certificate.serial_number
    assert ca.records() == []  # not a service certificate: not listed, not revocable by name
    assert ca.store._idle  # the store stays open for the server's life


def test_the_certificate_is_renewed_at_two_thirds_of_its_life_with_a_new_key(ca: CertificateAuthority) -> None:
    """90 s, backdated 9 s: renewed 57 s after issue; the new context serves new connections only."""
    listener, clock, endpoint, _ = make_listener(ca, lifetime=90)
    listener.startService()
    first = listener.material
    live = SSL.Connection(first.context, None)  # a connection made before the renewal

    clock.advance(56)
    assert listener.material is first
    clock.advance(1)

    second = listener.material
    assert second is not first and second.context is not first.context
    assert second.certificate.serial_number != first.certificate.serial_number
    assert second.certificate.public_key() != first.certificate.public_key()
    assert live.get_context() is first.context
    assert len(endpoint.factories) == 1  # the port stays open across renewals
    fresh = _CurrentContext(listener).serverConnectionForTLS(Protocol())
    assert fresh.get_context() is second.context
    assert len(est_server_rows(ca)) == 2
    clock.advance(60)
    assert len(est_server_rows(ca)) == 3


def test_a_failed_renewal_keeps_the_current_certificate_and_retries_with_back_off(
    ca: CertificateAuthority, logged_errors: Any
) -> None:
    logged_errors.expect("EST server certificate not issued")
    listener, clock, endpoint, runner = make_listener(ca, lifetime=90)
    listener.startService()
    first = listener.material
    runner.failing = 2

    clock.advance(57)  # fails: retry in 5 s
    assert listener.material is first and runner.calls == 2
    clock.advance(5)  # fails again: retry in 10 s
    assert listener.material is first and runner.calls == 3
    clock.advance(9.9)
    assert runner.calls == 3
    clock.advance(0.1)
    assert listener.material is not first and runner.calls == 4
    assert len(endpoint.factories) == 1


def test_a_listener_that_cannot_get_a_first_certificate_does_not_listen_until_it_can(
    ca: CertificateAuthority, logged_errors: Any
) -> None:
    logged_errors.expect("EST server certificate not issued")
    listener, clock, endpoint, _ = make_listener(ca, runner=Runner(failing=1))
    listener.startService()
    assert endpoint.factories == [] and listener.material is None
    clock.advance(5)
    assert len(endpoint.factories) == 1 and listener.material is not None


def test_a_port_in_use_is_retried_while_the_certificate_is_kept(ca: CertificateAuthority, logged_errors: Any) -> None:
    logged_errors.expect("EST listener cannot listen")
    listener, clock, endpoint, runner = make_listener(ca)
    endpoint.busy = 2
    listener.startService()
    assert listener.material is not None and listener.port is None
    clock.advance(5)
    assert listener.port is None
    clock.advance(10)
    assert listener.port is endpoint.port and len(endpoint.factories) == 1
    assert runner.calls == 1  # one certificate all along


def test_stopping_closes_the_port_and_cancels_the_renewal(ca: CertificateAuthority) -> None:
    listener, clock, endpoint, runner = make_listener(ca)
    listener.startService()
    listener.stopService()
    assert endpoint.port.stopped and clock.getDelayedCalls() == []
    clock.advance(1000)
    assert runner.calls == 1


def test_names_are_ip_or_dns_sans_and_bad_ones_are_refused() -> None:
    assert isinstance(san_for("::1"), x509.IPAddress)
    assert san_for("CA.Example.org") == x509.DNSName("ca.example.org")
    with pytest.raises(Exception, match="invalid DNS name"):
        san_for("not a name")


# -- real handshakes in memory ----------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class ClientCreator:
    context: SSL.Context

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        return connection


def handshake(listener: EstListener, identity: tuple[bytes, bytes] | None) -> tuple[Any, Any]:
    """(server TLS protocol, client TLS protocol) after a handshake over iosim."""
    server_factory = TLSMemoryBIOFactory(_CurrentContext(listener), False, Factory.forProtocol(Protocol))
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if identity is not None:
        chain = x509.load_pem_x509_certificates(identity[0])
        context.use_certificate(chain[0])
        for extra in chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(serialization.load_pem_private_key(identity[1], None))
    client_factory = TLSMemoryBIOFactory(ClientCreator(context), True, ClientFactory.forProtocol(Protocol))
    client, server_tls, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    pump.flush()
    client.wrappedProtocol.transport.write(b"x")  # one record each way: the handshake is over
    pump.flush()
    return server_tls, client


def peer_of(server_tls: Any) -> Any:
    return tls_peer(types.SimpleNamespace(channel=types.SimpleNamespace(transport=server_tls)))


def test_a_client_certificate_of_this_ca_is_seen_as_chained(ca: CertificateAuthority) -> None:
    listener, *_ = make_listener(ca)
    listener.startService()
    issued = ca.issue("orders")
    server_tls, _ = handshake(listener, (issued.chain_pem, issued.key_pem))
    peer = peer_of(server_tls)
    assert peer.chain_ok and peer.chain_error == ""
    assert peer.certificate == issued.record.certificate()


def test_a_foreign_client_certificate_completes_the_handshake_but_is_not_chained(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """No TLS alert: the refusal is left to HTTP (403 with a reason in the log)."""
    listener, *_ = make_listener(ca)
    listener.startService()
    other = CertificateAuthority.init(tmp_path / "other", DOMAIN).issue("orders")
    server_tls, _ = handshake(listener, (other.chain_pem, other.key_pem))
    peer = peer_of(server_tls)
    assert peer is not None and not peer.chain_ok
    assert "verify error" in peer.chain_error


def test_a_client_without_a_certificate_is_served_without_one(ca: CertificateAuthority) -> None:
    listener, *_ = make_listener(ca)
    listener.startService()
    server_tls, _ = handshake(listener, None)
    assert server_tls.getHandle().get_protocol_version_name() == "TLSv1.3"  # the handshake went through
    assert peer_of(server_tls) is None


# -- twistd options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--est-name", "not a name"], "--est-name: invalid DNS name"),
        (["--est-lifetime", "soon"], "--est-lifetime: invalid duration"),
        (["--est-lifetime", "5s"], "--est-lifetime must be at least 10 seconds"),
        (["--est-server-lifetime", "1s"], "--est-server-lifetime must be at least 2 seconds"),
        (["--est-rate-limit", "-1"], "--est-rate-limit must be 0"),
        (["--est", "nonsense:1"], "is not an endpoint"),
    ],
)
def test_est_options_are_checked_before_starting(ca: CertificateAuthority, args: list[str], message: str) -> None:
    from twisted.python import usage

    from s2sgw.ca import tap

    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(["--dir", str(ca.directory), "--est", "tcp:0", *args])


def test_est_flags_add_the_listener_with_their_values(ca: CertificateAuthority) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from s2sgw.ca import tap

    options = tap.Options()
    options.parseOptions(["--dir", str(ca.directory), "--est", "tcp:0:interface=127.0.0.1", "--est-name", "ca.test",
                          "--est-name", "::1", "--est-lifetime", "60s"])  # fmt: skip
    assert options["est-lifetime"] == datetime.timedelta(seconds=60)
    assert options["est-server-lifetime"] == datetime.timedelta(hours=24)
    assert options["est-rate-limit"] == 10
    (est,) = [s for s in tap.makeService(options, reactor=MemoryReactorClock()) if isinstance(s, EstListener)]
    assert est.names == ("ca.test", "::1")
    enroll = est.site.resource.children[b".well-known"].children[b"est"].children[b"simpleenroll"]
    assert enroll._enroller.lifetime == datetime.timedelta(seconds=60) and enroll._enroller.limiter.limit == 10
    defaults = tap.Options()
    defaults.parseOptions(["--dir", str(ca.directory)])
    assert defaults["est"] is None and len(list(tap.makeService(defaults, reactor=MemoryReactorClock()))) == 2
