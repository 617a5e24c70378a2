"""End to end: the issuing CA is replaced under load, with zero failed calls.

`twistd s2sgw-ca` over a CA whose root is offline; users-gw admits orders and relays to an echo
backend; orders-gw calls it. While a client loop calls through orders-gw without pause: a new
issuing CA is made with the root key (the running server takes it in), both gateways get leaves
under it and reload, and the old issuing CA is retired.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e import (
    ClientLoop,
    EchoServer,
    Pki,
    Processes,
    callers_of,
    free_port,
    gateway_config,
    s2sgw,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e




def _issuer_of(pem: Path) -> x509.Name:
    return x509.load_pem_x509_certificate(pem.read_bytes()).issuer


def test_intermediate_rotation_under_load_fails_no_call(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("ca", "users_gw", "orders")}
    pki = Pki.create(tmp_path, f"http://127.0.0.1:{ports['ca']}", ("users", "orders"))
    ca_dir = pki.directory / "ca"
    root_key = tmp_path / "offline-root.key"
    os.replace(ca_dir / "root.key", root_key)
    old = pki.ca.intermediate_cert
    echo = EchoServer()
    procs = Processes(tmp_path)
    loop = None
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(ca_dir), "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")
        users = service_block(pki, "users", f"""
            [[service.inbound]]
            name = "users-in"
            listen = "tcp:{ports['users_gw']}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{echo.port}"
            allow = ["orders"]
            """)  # fmt: skip
        (tmp_path / "users-gw.toml").write_text(gateway_config(pki, ports["ca"], users))
        callers = callers_of(pki, ("orders",), ports, ports["users_gw"])
        (tmp_path / "orders-gw.toml").write_text(gateway_config(pki, ports["ca"], callers))
        procs.wait_port(ports["ca"])
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("orders-gw", "s2sgw", "--config", str(tmp_path / "orders-gw.toml"))
        procs.wait_port(ports["users_gw"])
        procs.wait_port(ports["orders"])

        loop = ClientLoop(ports["orders"])
        wait_for(lambda: loop.calls >= 20, timeout=20)

        # 1. A new issuing CA: the running server takes it in.
        s2sgw("ca", "intermediate", "--dir", ca_dir, "--root-key", root_key)
        new = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
        assert new.subject != old.subject
        wait_for(lambda: "in use; answering also for" in procs.log("ca"), timeout=10)
        calls = loop.calls
        wait_for(lambda: loop.calls >= calls + 20, timeout=20)

        # 2. Both gateways get leaves under it and reload.
        for name in ("users", "orders"):
            s2sgw("ca", "issue", "--dir", ca_dir, name, "--out", pki.certs)
            assert _issuer_of(pki.certs / f"{name}.pem") == new.subject
        for name in ("users-gw", "orders-gw"):
            procs.signal(name, signal.SIGHUP)
        for name in ("users-gw", "orders-gw"):
            wait_for(lambda name=name: "generation 2" in procs.log(name) or "generation=2" in procs.log(name), timeout=15)
        calls = loop.calls
        wait_for(lambda: loop.calls >= calls + 20, timeout=20)

        # 3. The old one retired: the server answers only for the new one.
        s2sgw("ca", "intermediate", "--dir", ca_dir, "--retire", format(old.serial_number, "x"), "--force")
        wait_for(lambda: "answering also for no other" in procs.log("ca"), timeout=10)
        calls = loop.calls
        wait_for(lambda: loop.calls >= calls + 50, timeout=30)
    finally:
        if loop is not None:
            loop.stop()
        procs.stop_all()
        echo.close()
    assert loop.failures == [], loop.failures[:5]
    assert loop.calls >= 110
    for name in ("ca", "users-gw", "orders-gw"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]
