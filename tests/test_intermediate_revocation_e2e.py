"""End to end: a revoked issuing CA (``s2sgw ca crl --root``) makes its leaves refused, in both modes.

Layout: `twistd s2sgw-ca` over a CA whose first issuing CA (A) was replaced by a second (B);
users-ocsp (mode ocsp) and users-crl (mode crl, CRL fetched from the CA) both hold a "users"
leaf under A; callers-gw (mode off) has bad (under A) call both and good (under B) call
users-ocsp. The root's CRL revoking A is signed with the offline root key while all run.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from s2sgw.ca.authority import CertificateAuthority
from tests.e2e import (
    closed,
    echoes,
    live_connection,
    EchoServer,
    Pki,
    Processes,
    free_port,
    gateway_config,
    s2sgw,
    service_block,
    wait_for,
)

pytestmark = pytest.mark.e2e




@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    root_key: Path
    old_serial: int


def _outbound(name: str, port: int, remote: int) -> str:
    return f"""
            [[service.outbound]]
            name = "{name}"
            listen = "tcp:{port}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{remote}"
            peer = "users"
            """


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("intermediate-revocation-e2e")
    names = ("ca", "users_ocsp", "users_crl", "bad_ocsp", "bad_crl", "good_ocsp")
    ports = {name: free_port() for name in names}
    pki = Pki.create(root, f"http://127.0.0.1:{ports['ca']}", ("users", "bad"))
    old_serial = pki.ca.intermediate_cert.serial_number
    s2sgw("ca", "crl", "--dir", pki.directory / "ca", "--out", root / "users-crl.pem", "--pem")  # A's CRL
    root_key = root / "offline-root.key"
    os.replace(pki.directory / "ca" / "root.key", root_key)  # the root goes offline
    s2sgw("ca", "intermediate", "--dir", pki.directory / "ca", "--root-key", root_key)
    pki.ca = CertificateAuthority.open(pki.directory / "ca")
    pki.issue("good")  # under B
    echo = EchoServer()
    procs = Processes(root)
    try:
        procs.twistd("ca", "s2sgw-ca", "--dir", str(pki.directory / "ca"),
                     "--listen", f"tcp:{ports['ca']}:interface=127.0.0.1")  # fmt: skip
        procs.wait_port(ports["ca"])
        for mode in ("ocsp", "crl"):
            allow = '["bad", "good"]' if mode == "ocsp" else '["bad"]'
            users = service_block(pki, "users", f"""
                [[service.inbound]]
                name = "users-in"
                listen = "tcp:{ports['users_' + mode]}:interface=127.0.0.1"
                backend = "tcp:127.0.0.1:{echo.port}"
                allow = {allow}
                """)  # fmt: skip
            config = gateway_config(pki, ports["ca"], users, mode=mode).replace(
                "max_cache_age = 1.0", "max_cache_age = 60.0\ncrl_refresh = 0.5"  # live closes come from the root CRL, not re-validation
            )
            if mode == "crl":
                config = config.replace(
                    f'url = "http://127.0.0.1:{ports["ca"]}/ocsp"',
                    f'crl = "{root / "users-crl.pem"}"\ncrl_url = "http://127.0.0.1:{ports["ca"]}/crl"',
                )
            (root / f"users-{mode}.toml").write_text(config)
            procs.twistd(f"users-{mode}", "s2sgw", "--config", str(root / f"users-{mode}.toml"))
        callers = service_block(
            pki, "bad",
            _outbound("bad-to-ocsp", ports["bad_ocsp"], ports["users_ocsp"])
            + _outbound("bad-to-crl", ports["bad_crl"], ports["users_crl"]),
        ) + service_block(pki, "good", _outbound("good-to-ocsp", ports["good_ocsp"], ports["users_ocsp"]))
        (root / "callers.toml").write_text(gateway_config(pki, None, callers, mode="off"))
        procs.twistd("callers", "s2sgw", "--config", str(root / "callers.toml"))
        for name in names[1:]:
            procs.wait_port(ports[name])
        yield World(pki, procs, ports, root_key, old_serial)
    finally:
        procs.stop_all()
        echo.close()


def test_revoked_intermediate_refuses_its_leaves_in_ocsp_and_crl_mode(world: World) -> None:
    """New connections of leaves under the revoked issuing CA are refused, and live ones close."""
    for route in ("bad_ocsp", "bad_crl", "good_ocsp"):
        assert echoes(world.ports[route]), f"{route} before any revocation"
    for gateway in ("users-ocsp", "users-crl"):
        wait_for(lambda: "publishes no root CRL" in world.procs.log(gateway), timeout=10)
    open_before = {route: live_connection(world.ports[route]) for route in ("bad_ocsp", "bad_crl", "good_ocsp")}

    s2sgw("ca", "crl", "--dir", world.pki.directory / "ca", "--root", world.root_key,
          "--revoke-intermediate", format(world.old_serial, "x"), "--reason", "keyCompromise")  # fmt: skip

    wait_for(lambda: not echoes(world.ports["bad_ocsp"]), timeout=15)
    wait_for(lambda: not echoes(world.ports["bad_crl"]), timeout=15)
    assert echoes(world.ports["good_ocsp"]), "a leaf under the new issuing CA is still admitted"
    wait_for(lambda: closed(open_before["bad_ocsp"]) and closed(open_before["bad_crl"]), timeout=5)
    survivor = open_before["good_ocsp"]
    survivor.settimeout(5)
    survivor.sendall(b"still here\n")
    assert survivor.recv(100) == b"still here\n"
    for sock in open_before.values():
        sock.close()
    for gateway in ("users-ocsp", "users-crl"):
        log = world.procs.log(gateway)
        assert "root CRL" in log and "is revoked by the root CRL" in log, log[-3000:]
        assert "reason=revoked" in log and "from the root CRL" in log, log[-3000:]
        assert "Traceback" not in log
