"""A refusal after the TLS 1.3 handshake reaches the client as the alert that says why.

Real OpenSSL on both ends, joined in memory: the server is the gateway's TLS layer with its own
contexts, the client a plain pyOpenSSL connection that reports the alert it received.
"""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from s2sgw import tls, tlsalert
from s2sgw.tlstransport import TLSFactory
from tests.pkifactory import TestCA
from tests.tlshelpers import Recorder


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create()


def handshake(ca: TestCA):
    server_id, client_id = ca.issue("users"), ca.issue("orders")
    server_app, client_app = Recorder(), Recorder()
    server_context = tls.server_context(server_id.chain, server_id.key, [ca.root])
    client_context = tls.client_context(client_id.chain, client_id.key, [ca.root])
    server_factory = TLSFactory(tls.ServerConnectionCreator(lambda: server_context), False, Factory.forProtocol(lambda: server_app))
    client_factory = TLSMemoryBIOFactory(
        tls.ClientConnectionCreator(lambda: client_context, "users"), True, Factory.forProtocol(lambda: client_app), clock=Clock()
    )
    client_tls, server_tls, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), greet=False
    )
    pump.flush()
    assert server_app.completed and client_app.completed
    return server_tls, client_app, pump


@pytest.mark.parametrize("alert", ["access_denied", "certificate_revoked", "certificate_expired", "unknown_ca"])
def test_the_client_reads_the_alert_the_server_refused_with(ca: TestCA, alert: str) -> None:
    server_tls, client_app, pump = handshake(ca)
    assert server_tls.refuse_with_alert(alert)
    pump.flush()
    assert client_app.lost is not None
    words = str(client_app.lost.value)
    assert tlsalert.received_alert(words) == alert, words


def test_the_kept_secret_is_dropped_once_the_alert_is_sent(ca: TestCA) -> None:
    server_tls, _client_app, pump = handshake(ca)
    assert getattr(server_tls, tlsalert.SECRET) is not None
    assert server_tls.refuse_with_alert("access_denied")
    assert getattr(server_tls, tlsalert.SECRET) is None
    assert not server_tls.refuse_with_alert("access_denied")  # one alert, then nothing


def test_an_admitted_connection_forgets_the_secret(ca: TestCA) -> None:
    server_tls, _client_app, _pump = handshake(ca)
    tlsalert.forget_secret(server_tls)
    assert not server_tls.refuse_with_alert("access_denied")


def test_records_are_counted_across_chunk_boundaries() -> None:
    stream = b"\x17\x03\x03\x00\x02ab" + b"\x17\x03\x03\x00\x00" + b"\x15\x03\x03\x00\x01z"
    counter = tlsalert.RecordCounter()
    for i in range(len(stream)):
        counter.feed(stream[i : i + 1])
    assert counter.records == 3
