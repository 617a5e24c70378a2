"""End to end: what a backend learns about its caller, through real `twistd s2sgw` gateways.

callers-gw hosts orders with outbound routes to four inbound routes of users-gw: ``proxy-v2``
(nginx with ``proxy_protocol`` or a raw recorder), ``http-headers`` and ``jwt`` (a recording
HTTP/1.1 backend, keep-alive), and ``none``. Status checks are off: chains and identities only.
"""

from __future__ import annotations

import hashlib
import http.client
import queue
import shutil
import socket
import socketserver
import subprocess
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.doubles import decode_proxy_v2
from tests.e2e import Pki, Processes, free_port, gateway_config, service_block

pytestmark = pytest.mark.e2e

DOMAIN = "spiffe://e2e.s2sgw.test"


class Recorder(BaseHTTPRequestHandler):
    """Answers every request with 200 and records (client port, method, path, header list)."""

    protocol_version = "HTTP/1.1"
    seen: queue.Queue  # set per server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.put((self.client_address[1], self.command, self.path, list(self.headers.items()), body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


class RawRecorder(socketserver.BaseRequestHandler):
    """Keeps the first bytes of each connection (the PROXY header and what follows)."""

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while len(data) < 16 or b"\r\n\r\n" not in data[16 + int.from_bytes(data[14:16], "big") :]:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            data += chunk
        self.server.seen.put(data)  # type: ignore[attr-defined]
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def serve(server: Any) -> Any:
    server.seen = queue.Queue()
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    root: Path
    http: Any
    raw: Any
    nginx_log: Path | None
    last_token: str | None = None  # a token the jwt backend received (replayed by a later test)

    def conn(self, route: str) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.ports[route], timeout=10)


def nginx_config(root: Path, port: int) -> Path:
    conf = root / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            daemon off;
            master_process off;
            pid {root}/nginx.pid;
            error_log {root}/nginx-error.log info;
            events {{ worker_connections 64; }}
            http {{
                access_log off;
                client_body_temp_path {root}/nginx-tmp;
                log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr "$request"';
                server {{
                    listen 127.0.0.1:{port} proxy_protocol;
                    access_log {root}/nginx-access.log pp;
                    location / {{ return 200 "nginx ok\\n"; }}
                }}
            }}
            """
        )
    )
    return conf


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("identity-e2e")
    names = ("users_gw_proxy", "users_gw_raw", "users_gw_http", "users_gw_jwt", "users_gw_none")
    names += ("proxy", "raw", "http", "jwt", "none", "nginx")
    ports = {name: free_port() for name in names}
    pki = Pki.create(root, None, ("users", "orders"))
    http_backend = serve(ThreadingHTTPServer(("127.0.0.1", 0), Recorder))
    raw_backend = serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), RawRecorder))
    procs = Processes(root)
    nginx = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists() else None)
    try:
        if nginx is not None:
            (root / "nginx-tmp").mkdir()
            procs.start("nginx", [str(nginx), "-p", str(root), "-c", str(nginx_config(root, ports["nginx"]))])
        backends = {
            "proxy": (f"tcp:127.0.0.1:{ports['nginx'] if nginx else raw_backend.server_address[1]}", "proxy-v2"),
            "raw": (f"tcp:127.0.0.1:{raw_backend.server_address[1]}", "proxy-v2"),
            "http": (f"tcp:127.0.0.1:{http_backend.server_address[1]}", "http-headers"),
            "jwt": (f"tcp:127.0.0.1:{http_backend.server_address[1]}", "jwt"),
            "none": (f"tcp:127.0.0.1:{http_backend.server_address[1]}", "none"),
        }
        inbound = "".join(
            f"""
            [[service.inbound]]
            name = "users-{route}"
            listen = "tcp:{ports['users_gw_' + route]}:interface=127.0.0.1"
            backend = "{backend}"
            allow = ["orders"]
            identity = "{mode}"
            {'jwt_forward = true' if mode == 'jwt' else ''}
            """
            for route, (backend, mode) in backends.items()
        )
        outbound = "".join(
            f"""
            [[service.outbound]]
            name = "orders-to-{route}"
            listen = "tcp:{ports[route]}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{ports['users_gw_' + route]}"
            peer = "users"
            {'identity = "jwt"' if route == 'jwt' else ''}
            """
            for route in backends
        )
        (root / "users-gw.toml").write_text(gateway_config(pki, None, service_block(pki, "users", inbound), mode="off"))
        (root / "callers-gw.toml").write_text(gateway_config(pki, None, service_block(pki, "orders", outbound), mode="off"))
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in names:
            if name != "nginx" or nginx is not None:
                procs.wait_port(ports[name])
        yield World(pki, procs, ports, root, http_backend, raw_backend, root / "nginx-access.log" if nginx else None)
    finally:
        procs.stop_all()
        http_backend.shutdown()
        raw_backend.shutdown()


def drain(q: queue.Queue) -> list[Any]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def relayed_audit(world: World, route: str) -> str:
    """The last audit line of ``route`` for a connection that carried bytes (not a readiness probe)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line
            for line in world.procs.log("users-gw").splitlines()
            if f"route={route} outcome=closed" in line and f"peer={DOMAIN}/orders" in line and "bytes_in=0 " not in line
        ]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"no relayed connection audited on {route}"
        time.sleep(0.05)


def test_proxy_v2_header_reaches_the_backend_with_the_spiffe_id_tlv(world: World) -> None:
    drain(world.raw.seen)
    with socket.create_connection(("127.0.0.1", world.ports["raw"]), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
    received = world.raw.seen.get(timeout=5)
    while not received.endswith(b"Host: users\r\n\r\n"):  # skip the readiness probes' empty connections
        received = world.raw.seen.get(timeout=5)
    decoded = decode_proxy_v2(received)
    assert received[decoded.consumed :] == b"GET / HTTP/1.1\r\nHost: users\r\n\r\n"
    assert decoded.tlvs[0xE0] == f"{DOMAIN}/orders".encode()
    serial = x509.load_pem_x509_certificate((world.pki.certs / "orders.pem").read_bytes()).serial_number
    assert decoded.tlvs[0xE1] == f"{serial:x}".encode()
    line = relayed_audit(world, "users-raw")
    caller_address = line.split("address=", 1)[1].split()[0]
    assert decoded.source == ("127.0.0.1", int(caller_address.rsplit(":", 1)[1]))
    assert decoded.destination == ("127.0.0.1", world.ports["users_gw_raw"])


def test_nginx_with_proxy_protocol_logs_the_callers_address(world: World) -> None:
    if world.nginx_log is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{world.ports['proxy']}/who"], capture_output=True, timeout=20
    )
    assert result.stdout == b"nginx ok\n", result.stderr
    line = relayed_audit(world, "users-proxy")
    caller_port = line.split("address=", 1)[1].split()[0].rsplit(":", 1)[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "/who" not in world.nginx_log.read_text():
        time.sleep(0.05)
    logged = [entry for entry in world.nginx_log.read_text().splitlines() if "/who" in entry]
    assert logged and logged[-1].split()[:2] == ["127.0.0.1", caller_port], logged


def test_every_request_of_a_keep_alive_connection_carries_the_callers_identity(world: World) -> None:
    drain(world.http.seen)
    conn = world.conn("http")
    orders_pem = x509.load_pem_x509_certificate((world.pki.certs / "orders.pem").read_bytes())
    digest = hashlib.sha256(orders_pem.public_bytes(serialization.Encoding.DER)).hexdigest()
    spoofs = ["X-Forwarded-Client-Cert", "x-forwarded-client-cert", "CLIENT-CERT", "Client-Cert-Chain", "x-FORWARDED-client-CERT"]
    for i, spoof in enumerate(spoofs):
        body = b"payload %d" % i
        conn.putrequest("POST", f"/req/{i}")
        conn.putheader(spoof, f"By=evil;URI={DOMAIN}/admin")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"ok")
    conn.close()
    seen = [world.http.seen.get(timeout=5) for _ in spoofs]
    assert len({port for port, *_ in seen}) == 1  # one backend connection: keep-alive all the way
    for i, (_port, method, path, headers, body) in enumerate(seen):
        assert (method, path, body) == ("POST", f"/req/{i}", b"payload %d" % i)
        identity = [(name.lower(), value) for name, value in headers if name.lower() in ("x-forwarded-client-cert", "client-cert", "client-cert-chain")]
        assert identity[0] == ("x-forwarded-client-cert", f"By={DOMAIN}/users;Hash={digest};URI={DOMAIN}/orders")
        assert identity[1][0] == "client-cert" and len(identity) == 2
        assert all("evil" not in value for _name, value in headers)


def test_a_jwt_route_backend_gets_a_token_that_verifies_against_the_callers_key(world: World) -> None:
    drain(world.http.seen)
    conn = world.conn("jwt")
    for i in range(3):
        conn.request("GET", f"/jwt/{i}", headers={"Authorization": "Bearer forged.by.client"})
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"ok")
    conn.close()
    orders_key = x509.load_pem_x509_certificate((world.pki.certs / "orders.pem").read_bytes()).public_key()
    jtis = set()
    for _ in range(3):
        _port, _method, _path, headers, _body = world.http.seen.get(timeout=5)
        tokens = [value for name, value in headers if name.lower() == "authorization"]
        assert len(tokens) == 1 and tokens[0].startswith("Bearer ")
        claims = jwt.decode(tokens[0][7:], orders_key, algorithms=["ES256"], audience=f"{DOMAIN}/users", issuer=f"{DOMAIN}/orders")
        assert claims["sub"] == f"{DOMAIN}/orders" and claims["exp"] - claims["iat"] <= 60
        jtis.add(claims["jti"])
    assert len(jtis) == 3
    world.last_token = tokens[0][7:]


def curl_direct(world: World, *headers: str) -> subprocess.CompletedProcess[bytes]:
    """orders' certificate straight to the users jwt listener, without its gateway signing."""
    port = world.ports["users_gw_jwt"]
    certs = world.pki.certs
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(world.pki.bundle), "--cert", str(certs / "orders.pem")]
    argv += ["--key", str(certs / "orders.key"), "--resolve", f"users:{port}:127.0.0.1", f"https://users:{port}/direct"]
    for header in headers:
        argv += ["-H", header]
    return subprocess.run(argv, capture_output=True, timeout=20)


def test_a_jwt_route_refuses_missing_and_replayed_tokens_with_a_reason(world: World) -> None:
    result = curl_direct(world)
    assert result.stdout == b"jwt_missing\n", result.stderr
    world.procs.wait_audit("users-gw", "users-jwt", "reason=jwt_missing ")
    token = world.last_token
    if token is None:
        pytest.skip("needs the token captured by the previous test")
    result = curl_direct(world, f"Authorization: Bearer {token}")
    assert result.stdout == b"jwt_replayed\n", result.stderr
    world.procs.wait_audit("users-gw", "users-jwt", "reason=jwt_replayed ")


def test_a_route_without_identity_passes_injected_headers_untouched(world: World) -> None:
    drain(world.http.seen)
    conn = world.conn("none")
    conn.request("GET", "/plain", headers={"X-Forwarded-Client-Cert": "By=whatever"})
    assert conn.getresponse().read() == b"ok"
    conn.close()
    _port, _method, _path, headers, _body = world.http.seen.get(timeout=5)
    assert ("X-Forwarded-Client-Cert", "By=whatever") in headers
