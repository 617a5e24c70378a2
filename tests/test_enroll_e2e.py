"""End to end: `s2sgw enroll` against a real `twistd s2sgw-ca --est`, and gateways that renew.

The CA serves OCSP and EST with 60-second certificates. Gateways start from a token each (no key
made on the CA's side) and renew on their own while a client calls through them on new and on
keep-alive connections. A keep-alive connection is recycled after a few seconds, as connection
pools do: the gateway closes a live connection when its peer's certificate expires (audit reason
``expired``), so with 60-second certificates no connection may outlive about 20 seconds.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import re
import subprocess
import threading
import time
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from s2sgw.serials import serial_text
from s2sgw import pki
from s2sgw.ca.authority import CertificateAuthority
from tests.e2e import BIN, TRUST_DOMAIN, Processes, free_port, wait_for
from tests.reloadkit import ANSWER, ClientLoop, get, inbound, outbound

pytestmark = pytest.mark.e2e

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
RENEWED = re.compile(r"certificate of service (\S+) renewed: serial (\w+) -> (\w+)")


@attrs.define
class CA:
    directory: Path
    procs: Processes
    est_url: str
    status_url: str

    @property
    def fingerprint(self) -> str:
        """The root's fingerprint the way operators read it: `openssl x509 -fingerprint -sha256`."""
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(self.directory / "bundle.pem")],
            capture_output=True, text=True, check=True,
        ).stdout
        return out.strip().split("=", 1)[1]

    def token(self, name: str) -> str:
        result = subprocess.run(
            [str(BIN / "s2sgw"), "ca", "token", "--dir", str(self.directory), name, "--ttl", "5m"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def enroll(self, name: str, token: str, out: Path, fingerprint: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(BIN / "s2sgw"), "enroll", "--ca", self.est_url, "--fingerprint", fingerprint or self.fingerprint,
                "--token", token, "--name", name, "--out", str(out), "--timeout", "10",
            ],
            capture_output=True, text=True, timeout=60,
        )


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("enroll-e2e")
    status_port, est_port = free_port(), free_port()
    CertificateAuthority.init(root / "ca", TRUST_DOMAIN, url=f"http://127.0.0.1:{status_port}")
    procs = Processes(root)
    procs.twistd(
        "ca", "s2sgw-ca", "--dir", str(root / "ca"), "--listen", f"tcp:{status_port}:interface=127.0.0.1",
        "--est", f"tcp:{est_port}:interface=127.0.0.1", "--est-name", "127.0.0.1", "--est-lifetime", "60s",
    )
    try:
        procs.wait_port(est_port)
        procs.wait_port(status_port)
        yield CA(root / "ca", procs, f"https://127.0.0.1:{est_port}", f"http://127.0.0.1:{status_port}/ocsp")
    finally:
        procs.stop_all()


def gateway_toml(ca: CA, out: Path, service: str, routes: str) -> str:
    return (
        f'trust = "{out / "bundle.pem"}"\n'
        f'[status]\nmode = "ocsp"\nurl = "{ca.status_url}"\nfail = "closed"\n'
        f'[timeouts]\nhandshake = 5\ndrain = 2\n'
        f'[enrollment]\nurl = "{ca.est_url}"\nfingerprint = "{ca.fingerprint}"\n'
        f'\n[[service]]\nname = "{service}"\ncert = "{out / (service + ".pem")}"\nkey = "{out / (service + ".key")}"\n'
        + routes
    )


def test_enroll_from_a_token_makes_files_a_gateway_starts_with(ca: CA, tmp_path: Path) -> None:
    token = ca.token("users")
    out = tmp_path / "users"

    wrong = ca.enroll("users", token, out, fingerprint="AB:" * 31 + "CD")
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and "pinned fingerprint" in wrong.stderr, wrong.stderr
    assert not out.exists()

    # The wrong fingerprint stopped everything before the token was sent: it is still good.
    enrolled = ca.enroll("users", token, out)
    assert enrolled.returncode == 0, enrolled.stderr
    assert (out / "users.key").stat().st_mode & 0o777 == 0o600
    chain = pki.load_certificates(out / "users.pem")
    assert pki.spiffe_id(chain[0]) == f"spiffe://{TRUST_DOMAIN}/users" and len(chain) == 2
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "bundle.pem"), "-untrusted", str(out / "users.pem"), str(out / "users.pem")],
        capture_output=True, text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr

    again = ca.enroll("users", token, tmp_path / "again")
    assert again.returncode == 1 and "HTTP 401" in again.stderr and token not in again.stderr
    assert not (tmp_path / "again").exists()

    unreachable = subprocess.run(
        [str(BIN / "s2sgw"), "enroll", "--ca", f"https://127.0.0.1:{free_port()}", "--fingerprint", ca.fingerprint,
         "--token", ca.token("users"), "--name", "users", "--out", str(tmp_path / "none"), "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert unreachable.returncode == 1 and "refused" in unreachable.stderr.lower()

    port, backend = free_port(), free_port()
    config = tmp_path / "users-gw.toml"
    config.write_text(gateway_toml(ca, out, "users", inbound("users-in", port, backend, ["orders"])))
    check = subprocess.run([str(BIN / "s2sgw"), "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    procs = Processes(tmp_path)
    try:
        procs.twistd("users-gw", "s2sgw", "--config", str(config))
        procs.wait_port(port)
    finally:
        procs.stop_all()


# -- renewal under load ---------------------------------------------------------------------------


class KeepAliveBackend(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 backend that keeps connections open and answers ANSWER."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # One write: head and body in separate segments would meet Nagle and delayed ACKs.
                close = self.headers.get("Connection", "").lower() == "close"
                self.close_connection = close
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(ANSWER), b"Connection: close\r\n" if close else b"", ANSWER)
                )

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@attrs.define(eq=False)
class KeepAliveLoop:
    """Requests back to back on one connection, a new connection every ``recycle`` seconds."""

    port: int
    recycle: float = 8.0
    deadline: float = 330.0
    ok: int = 0
    connections: list[tuple[float, float, int]] = attrs.Factory(list)  # (opened, closed, requests), wall clock
    failures: list[str] = attrs.Factory(list)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="keep-alive-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.deadline
        while not self._stop.is_set() and time.monotonic() < end:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            opened, count = time.time(), 0
            try:
                while not self._stop.is_set() and time.time() - opened < self.recycle:
                    connection.request("GET", "/api/users/1")
                    response = connection.getresponse()
                    body = response.read()
                    if response.status != 200 or body != ANSWER:
                        self.failures.append(f"HTTP {response.status}: {body[:80]!r}")
                        break
                    self.ok += 1
                    count += 1
                    time.sleep(0.01)
            except Exception as error:  # any failed call on a live connection counts
                self.failures.append(f"{type(error).__name__}: {error} after {count} calls, {time.time() - opened:.1f} s")
            finally:
                connection.close()
                self.connections.append((opened, time.time(), count))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def enrolled(ca: CA, directories: dict[str, Path]) -> list[Path]:
    """Each service's key and certificate enrolled from a token of its own into its directory."""
    for name, out in directories.items():
        result = ca.enroll(name, ca.token(name), out)
        assert result.returncode == 0, result.stderr
    return list(directories.values())


def renewals(procs: Processes, name: str) -> list[tuple[float, str, str]]:
    """(wall-clock time, old serial, new serial) of each renewal logged by gateway ``name``."""
    found = []
    for line in procs.log(name).splitlines():
        match = RENEWED.search(line)
        if match:
            stamp = datetime.datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            found.append((stamp, match.group(2), match.group(3)))
    return found


def test_two_gateways_from_tokens_renew_five_times_each_under_load_without_a_failed_call(ca: CA, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("users_gw", "orders")}
    backend = KeepAliveBackend()
    users_out, callers_out = enrolled(ca, {"users": tmp_path / "users-gw", "orders": tmp_path / "callers-gw"})
    (tmp_path / "users-gw.toml").write_text(
        gateway_toml(ca, users_out, "users", inbound("users-in", ports["users_gw"], backend.port, ["orders"]))
    )
    (tmp_path / "callers-gw.toml").write_text(
        gateway_toml(ca, callers_out, "orders", outbound("orders-to-users", ports["orders"], ports["users_gw"], "users"))
    )
    procs = Processes(tmp_path)
    fresh = ClientLoop(ports["orders"], deadline=330.0)
    kept = KeepAliveLoop(ports["orders"])
    started = time.monotonic()
    try:
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(tmp_path / "callers-gw.toml"))
        procs.wait_port(ports["users_gw"])
        procs.wait_port(ports["orders"])
        assert get(ports["orders"]) == (200, ANSWER)
        fresh.start()
        kept.start()
        wait_for(
            lambda: all(len(renewals(procs, name)) >= 5 for name in ("users-gw", "callers-gw"))
            or bool(fresh.failures or kept.failures),
            timeout=300.0,
            step=1.0,
        )
        fresh.wait_for(10)  # calls still succeed after the last renewal
    finally:
        fresh.stop()
        kept.stop()
        logs = {name: procs.log(name) for name in ("users-gw", "callers-gw")}
        procs.stop_all()
        backend.shutdown()
    elapsed = time.monotonic() - started
    assert fresh.failures == [] and kept.failures == [], (fresh.failures[:5], kept.failures[:5])

    store = CertificateAuthority.open(ca.directory)
    for gateway, name in (("users-gw", "users"), ("callers-gw", "orders")):
        seen = renewals(procs, gateway)
        assert len(seen) >= 5, logs[gateway][-3000:]
        serials = [seen[0][1]] + [new for _, _, new in seen]
        assert len(set(serials)) == len(serials)  # a new serial each time
        assert all(old == previous for (_, old, _), previous in zip(seen, serials))  # one chain of renewals
        issued = [r for r in store.records() if r.name == name and serial_text(r.serial) in serials]
        keys = {r.certificate().public_key().public_bytes(*_SPKI) for r in issued}
        assert len(issued) == len(serials) and len(keys) == len(serials)  # a new key each time
        assert "Traceback" not in logs[gateway]
    # Keep-alive connections were open while the gateways swapped certificates, and none failed.
    swaps = [stamp for gateway in ("users-gw", "callers-gw") for stamp, _, _ in renewals(procs, gateway)]
    spanning = [c for c in kept.connections if any(c[0] < stamp < c[1] for stamp in swaps)]
    assert len(spanning) >= 3
    print(
        f"\nrenewal e2e: {elapsed:.0f} s; renewals users-gw={len(renewals(procs, 'users-gw'))} "
        f"callers-gw={len(renewals(procs, 'callers-gw'))}; calls on new connections {fresh.ok}, "
        f"on keep-alive connections {kept.ok} ({len(kept.connections)} connections, {len(spanning)} across a renewal); "
        "failed 0"
    )



def test_with_two_workers_the_parent_renews_and_every_worker_serves_the_new_certificate(
    ca: CA, tmp_path: Path
) -> None:
    """workers = 2 with [enrollment]: one renewal in the parent (not one per worker), both workers
    in force with the new serial, and calls through them meanwhile without a failure."""
    import json
    import urllib.request

    ports = {name: free_port() for name in ("users_gw", "orders", "admin")}
    backend = KeepAliveBackend()
    # A name of its own: the CA's records of it are this test's alone.
    users_out, callers_out = enrolled(ca, {"inventory": tmp_path / "users-gw", "orders": tmp_path / "callers-gw"})
    (tmp_path / "users-gw.toml").write_text(
        "workers = 2\n"
        + gateway_toml(ca, users_out, "inventory", inbound("inventory-in", ports["users_gw"], backend.port, ["orders"]))
        + f'\n[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\n'
    )
    (tmp_path / "callers-gw.toml").write_text(
        gateway_toml(ca, callers_out, "orders", outbound("orders-to-inventory", ports["orders"], ports["users_gw"], "inventory"))
    )

    def status() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/status", timeout=10) as answer:
            return json.load(answer)

    def serving(serial: str) -> bool:
        workers = status()["workers"]
        return len(workers) == 2 and all(
            w["status"] is not None and w["status"]["services"]["inventory"]["serial"] == serial for w in workers
        )

    procs = Processes(tmp_path)
    fresh = ClientLoop(ports["orders"], deadline=120.0)
    try:
        procs.twistd("users-gw", "s2sgw", "--config", str(tmp_path / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(tmp_path / "callers-gw.toml"))
        for port in ports.values():
            procs.wait_port(port)
        assert get(ports["orders"]) == (200, ANSWER)
        fresh.start()
        wait_for(lambda: renewals(procs, "users-gw") or fresh.failures, timeout=60.0, step=0.5)
        (_, old, new), *_ = renewals(procs, "users-gw")
        wait_for(lambda: serving(new), timeout=10.0, step=0.2)
        fresh.wait_for(20)  # calls reach the workers that now present the new certificate
        document = status()
        log = procs.log("users-gw")
    finally:
        fresh.stop()
        procs.stop_all()
        backend.shutdown()
    assert fresh.failures == [], fresh.failures[:5]
    assert old != new and document["services"]["inventory"]["renewal"]["renewals"] >= 1
    assert document["enrollment"]["urls"] == [ca.est_url]
    assert log.count("certificate of service inventory renewed") == len(renewals(procs, "users-gw"))
    assert "Traceback" not in log
    issued = [r for r in CertificateAuthority.open(ca.directory).records() if r.name == "inventory"]
    assert len(issued) == 1 + len(renewals(procs, "users-gw"))  # the enrollment, then one per renewal
