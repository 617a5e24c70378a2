"""The EST client's TLS on loopback: only the pinned root, the URL's host, our certificate on renewal."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer

from s2sgw import pki
from s2sgw.enroll.client import BootstrapTLS, ESTClient, ESTError, PinnedTLS, make_csr, new_key
from s2sgw.enroll.command import EnrollRequest, enroll
from s2sgw.wire import est
from tests.estfake import FakeEST, loopback_names, serve_tls, server_identity
from tests.pkifactory import TestCA


async def _serve(fake: FakeEST, ca: TestCA, names: list[x509.GeneralName]) -> tuple[Any, str]:
    from twisted.internet import reactor

    chain, key = server_identity(ca, names)
    port = await serve_tls(reactor, fake, chain, key)
    return port, f"https://127.0.0.1:{port.getHost().port}"


def _fake(ca: TestCA, tokens: dict[str, str] | None = None) -> FakeEST:
    from twisted.internet import reactor

    return FakeEST(ca, reactor.seconds, tokens or {"orders": "s3cret"})


async def _outcome(d: defer.Deferred[Any]) -> Any:
    try:
        return await d
    except Exception as error:
        return error


@pytest_twisted.ensureDeferred
async def test_enrollment_and_renewal_over_real_tls() -> None:
    """Token enrollment, then renewal presenting the new certificate as the TLS client certificate."""
    from twisted.internet import reactor

    ca = TestCA.create()
    fake = _fake(ca)
    port, url = await _serve(fake, ca, loopback_names())
    try:
        request = EnrollRequest((url,), est.fingerprint(ca.root), "orders", "s3cret", Path("/nonexistent"), timeout=10)
        enrolled = await enroll(reactor, request)
        assert pki.spiffe_id(enrolled.chain[0]) == "spiffe://example.org/orders"
        assert [s.client for s in fake.seen] == [None, None, None]

        client = ESTClient((url,), reactor, PinnedTLS((ca.root,), enrolled.chain, enrolled.key), timeout=10)
        key = new_key()
        renewed = await client.simplereenroll(make_csr(key, "orders"))
        assert fake.seen[-1].client == "spiffe://example.org/orders"
        assert est.certificate_for_key(renewed, key.public_key()) is not None
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_certificate_for_another_host_is_refused() -> None:
    from twisted.internet import reactor

    ca = TestCA.create()
    fake = _fake(ca)
    port, url = await _serve(fake, ca, [x509.DNSName("est.example.org")])
    try:
        client = ESTClient((url,), reactor, PinnedTLS((ca.root,)), timeout=10)
        error = await _outcome(client.cacerts())
        assert isinstance(error, ESTError) and "not valid for 127.0.0.1" in str(error), error
        assert fake.seen == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_of_another_ca_is_refused_and_gets_no_token() -> None:
    """Even with the right fingerprint in hand, a server whose certificate does not chain to the
    pinned root sees no request under the pinned policy."""
    from twisted.internet import reactor

    ca, impostor = TestCA.create(), TestCA.create(cn="Impostor")
    fake = _fake(impostor)
    port, url = await _serve(fake, impostor, loopback_names())
    try:
        client = ESTClient((url,), reactor, PinnedTLS((ca.root,)), timeout=10)
        error = await _outcome(client.simpleenroll(make_csr(new_key(), "orders"), "orders", "s3cret"))
        assert isinstance(error, ESTError) and "does not verify against the pinned root" in str(error), error
        assert fake.seen == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bootstrap_reads_cacerts_from_any_server_but_the_fingerprint_decides() -> None:
    from twisted.internet import reactor

    ca, impostor = TestCA.create(), TestCA.create(cn="Impostor")
    fake = _fake(impostor)
    port, url = await _serve(fake, impostor, loopback_names())
    try:
        answer = await ESTClient((url,), reactor, BootstrapTLS(), timeout=10).cacerts()
        assert impostor.root in answer
        request = EnrollRequest((url,), est.fingerprint(ca.root), "orders", "s3cret", Path("/nonexistent"), timeout=10)
        error = await _outcome(defer.ensureDeferred(enroll(reactor, request)))
        assert isinstance(error, ESTError) and "pinned fingerprint" in str(error)
        assert [s.operation for s in fake.seen] == ["cacerts", "cacerts"]
        assert all(s.authorization is None for s in fake.seen)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_with_only_an_ip_of_another_host_is_refused() -> None:
    from twisted.internet import reactor

    ca = TestCA.create()
    fake = _fake(ca)
    port, url = await _serve(fake, ca, [x509.IPAddress(ipaddress.ip_address("127.0.0.9"))])
    try:
        error = await _outcome(ESTClient((url,), reactor, PinnedTLS((ca.root,)), timeout=10).cacerts())
        assert isinstance(error, ESTError) and "not valid for 127.0.0.1" in str(error), error
    finally:
        await port.stopListening()


def test_pinned_policy_needs_a_root() -> None:
    with pytest.raises(ValueError):
        PinnedTLS(())

