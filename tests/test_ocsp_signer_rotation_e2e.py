"""End to end: the status server renews a short-lived OCSP signer while gateways keep verifying.

`twistd s2sgw-ca --ocsp-lifetime 30s` renews its signer every 20 seconds. users-gw admits orders
(OCSP, cached at most a second, so it asks all the time) and follows the revocation feed; a
client loop calls through orders-gw the whole time. After at least three renewals every call has
passed, and a revocation still arrives over the feed, signed by the newest signer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import (
    ClientLoop,
    EchoServer,
    Pki,
    Processes,
    callers_of,
    free_port,
    gateway_config,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e

S2SGW = str(Path(sys.executable).parent / "s2sgw")


def test_gateways_verify_answers_and_the_feed_across_three_signer_renewals(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("ca", "users_gw", "orders")}
    pki = Pki.create(tmp_path, f"http://127.0.0.1:{ports['ca']}", ("users", "orders", "reports"))
    echo = EchoServer()
    procs = Processes(tmp_path)
    loop = None
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"),
                     "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1", "--ocsp-lifetime", "30s")  # fmt: skip
        users = service_block(pki, "users", f"""
            [[service.inbound]]
            name = "users-in"
            listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{echo.port}"
            allow = ["orders", "reports"]
            """)  # fmt: skip
        (tmp_path / "users-gw.toml").write_text(gateway_config(pki, ports["ca"], users))
        (tmp_path / "orders-gw.toml").write_text(
            gateway_config(pki, ports["ca"], callers_of(pki, ("orders",), ports, ports["users_gw"]))
        )
        procs.wait_port(ports["ca"])
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("orders-gw", "s2sgw", "--config", str(tmp_path / "orders-gw.toml"))
        procs.wait_port(ports["users_gw"])
        procs.wait_port(ports["orders"])
        loop = ClientLoop(ports["orders"])

        def renewals() -> int:
            return procs.log("ca").count("OCSP signer of")

        wait_for(lambda: renewals() >= 4, timeout=120)  # the 7-day one at start, then three more
        subprocess.run([S2SGW, "ca", "revoke", "--dir", str(pki.directory / "ca"), "reports"],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
        wait_for(lambda: "revocation feed: 1 revocations" in procs.log("users-gw"), timeout=15)
        calls = loop.calls
        wait_for(lambda: loop.calls >= calls + 20, timeout=20)
    finally:
        if loop is not None:
            loop.stop()
        procs.stop_all()
        echo.close()
    assert loop.failures == [], loop.failures[:5]
    assert loop.calls >= 100
    for name in ("users-gw", "orders-gw"):
        log = procs.log(name)
        assert "Traceback" not in log
        assert "responder certificate" not in log, "a signer was refused"
        assert "feed answer" not in log and "not taken" not in log, log[-3000:]
