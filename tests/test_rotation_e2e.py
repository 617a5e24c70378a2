"""Trust-anchor rotation in OCSP mode with ``fail = "closed"``: the steps of docs/operations.rst,
done to real processes, drop nothing.

Two CAs (old and new root), each serving its own status with ``twistd s2sgw-ca``. users-gw runs
users (inbound to a small HTTP backend); callers-gw runs orders (outbound to users-gw). Each
gateway asks about the other's certificate (answers cached for at most 1 s, so it asks all the
time). A client opening a new connection per request and wrk run through orders for the whole
rotation; every step is a SIGHUP to the real gateways.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.serials import serial_text
from tests.e2e import TRUST_DOMAIN, Pki, Processes, free_port
from tests.reloadkit import ANSWER, ClientLoop, config_text, get, inbound, outbound, reloaded

pytestmark = pytest.mark.e2e


def _fingerprint(bundle: Path) -> str:
    root = x509.load_pem_x509_certificate(bundle.read_bytes())
    return root.fingerprint(hashes.SHA256()).hex(":").upper()


def _status(ca_port: int, responder: tuple[str, int] | None = None) -> str:
    text = f'mode = "ocsp"\nurl = "http://127.0.0.1:{ca_port}/ocsp"\nfail = "closed"\nmax_cache_age = 1.0\n'
    if responder is not None:
        fingerprint, port = responder
        text += f'[[status.responder]]\nfingerprint = "{fingerprint}"\nurl = "http://127.0.0.1:{port}/ocsp"\n'
    return text


def _wrk_failures(output: str) -> tuple[int, int]:
    """(requests, failed requests) from wrk's report: socket errors and non-2xx answers."""
    done = re.search(r"(\d+) requests in", output)
    assert done is not None, output
    failed = 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors is not None:
        failed += sum(int(n) for n in errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx is not None:
        failed += int(non_2xx.group(1))
    return int(done.group(1)), failed


def test_trust_anchor_rotation_in_ocsp_mode_fails_no_request(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (bash dev.sh test installs it)")
    ports = {name: free_port() for name in ("users_gw", "backend", "orders", "old_ca", "new_ca")}
    pki = Pki.create(tmp_path, None, ("users", "orders"))
    new_ca = CertificateAuthority.init(tmp_path / "ca2", TRUST_DOMAIN)
    old_bundle, new_bundle = pki.bundle, tmp_path / "ca2" / "bundle.pem"
    trust = tmp_path / "trust.pem"
    shutil.copyfile(old_bundle, trust)
    www = tmp_path / "www"
    (www / "api" / "users").mkdir(parents=True)
    (www / "api" / "users" / "1").write_bytes(ANSWER)

    def write_configs(status: str) -> None:
        users = inbound("users-in", ports["users_gw"], ports["backend"], ["orders"])
        orders = outbound("orders-to-users", ports["orders"], ports["users_gw"], "users")
        (tmp_path / "users-gw.toml").write_text(config_text(trust, pki.certs, {"users": users}, status=status))
        (tmp_path / "callers-gw.toml").write_text(config_text(trust, pki.certs, {"orders": orders}, status=status))

    def reload(name: str, generation: int) -> None:
        procs.signal(name)
        reloaded(procs, name, generation)

    procs = Processes(tmp_path)
    client = ClientLoop(ports["orders"], deadline=240.0)
    wrk = None
    try:
        for name, directory in (("old_ca", pki.ca.directory), ("new_ca", tmp_path / "ca2")):
            procs.twistd(name, "s2sgw-ca", "--dir", str(directory), "--listen", f"tcp:{ports[name]}:interface=127.0.0.1")
        procs.start(
            "backend",
            [sys.executable, "-m", "http.server", str(ports["backend"]), "--bind", "127.0.0.1", "--directory", str(www)],
        )
        write_configs(_status(ports["old_ca"]))
        for name in ("old_ca", "new_ca", "backend"):
            procs.wait_port(ports[name])
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(tmp_path / "callers-gw.toml"))
        procs.wait_port(ports["users_gw"])
        procs.wait_port(ports["orders"])
        assert get(ports["orders"]) == (200, ANSWER)

        client.start()
        wrk = subprocess.Popen(
            ["wrk", "--threads", "1", "--connections", "2", "--duration", "300s", "--timeout", "10s",
             f"http://127.0.0.1:{ports['orders']}/api/users/1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        client.wait_for(20)

        # 1. Overlap: both roots in the bundle, and the new root's certificates asked at the new CA.
        trust.write_bytes(old_bundle.read_bytes() + new_bundle.read_bytes())
        write_configs(_status(ports["old_ca"], (_fingerprint(new_bundle), ports["new_ca"])))
        reload("users-gw", 2)
        reload("callers-gw", 2)
        client.wait_for(20)

        # 2. Each service gets a certificate from the new CA; its gateway reloads.
        new_ca.write_identity(new_ca.issue("users"), pki.certs)
        reload("users-gw", 3)
        client.wait_for(20)
        users_serial = serial_text(x509.load_pem_x509_certificate((pki.certs / 'users.pem').read_bytes()).serial_number)
        procs.wait_audit("callers-gw", "orders-to-users", "outcome=closed", f"serial={users_serial} ")
        new_ca.write_identity(new_ca.issue("orders"), pki.certs)
        reload("callers-gw", 3)
        client.wait_for(20)

        # 3. Every service presents a new-root certificate: the new root alone, asked at the new CA.
        trust.write_bytes(new_bundle.read_bytes())
        write_configs(_status(ports["new_ca"]))
        reload("users-gw", 4)
        reload("callers-gw", 4)
        client.wait_for(20)

        # 4. The old CA's status server is no longer needed.
        procs.running["old_ca"].send_signal(signal.SIGTERM)
        procs.running["old_ca"].wait(timeout=15)
        client.wait_for(40)
    finally:
        client.stop()
        wrk_output = ""
        if wrk is not None:
            wrk.send_signal(signal.SIGINT)
            wrk_output = wrk.communicate(timeout=30)[0]
        procs.stop_all()
    requests, failed = _wrk_failures(wrk_output)
    print(f"trust-anchor rotation (ocsp): loop {client.ok} ok, {len(client.failures)} failed; wrk {requests} requests, {failed} failed")
    assert client.failures == [], f"{len(client.failures)} of {client.ok + len(client.failures)} failed: {client.failures[:5]}"
    assert failed == 0, wrk_output
    assert client.ok >= 140 and requests >= 100
    for name in ("users-gw", "callers-gw"):
        log = procs.log(name)
        assert "trust reload failed" not in log
        assert "reason=status_invalid" not in log and "reason=ca_unreachable" not in log
