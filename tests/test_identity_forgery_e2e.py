"""End to end: a caller writing raw bytes cannot make a backend believe a forged identity.

users-gw has ``http-headers`` and ``jwt`` routes to a backend that records each request head
byte for byte, an ``identity = "none"`` route to the same recorder (to see what an outbound
``jwt`` route sends), and ``http-headers`` routes to real gunicorn (default and ``--header-map
dangerous``) and real nginx (default and ``underscores_in_headers on``) applications that echo the
identity they are shown. callers-gw (service orders) has outbound ``jwt`` routes. Tests speak
mTLS to users-gw directly with orders' certificate, or plain HTTP to callers-gw's listeners.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import queue
import shutil
import socket
import socketserver
import ssl
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from s2sgw.identity.http_headers import IDENTITY_HEADERS, fold_name
from s2sgw.identity.jwt_bearer import algorithm_for
from tests.e2e import Pki, Processes, free_port, gateway_config, service_block
from tests.identitykit import FORGED

pytestmark = pytest.mark.e2e

DOMAIN = "spiffe://e2e.s2sgw.test"
USERS, ORDERS = f"{DOMAIN}/users", f"{DOMAIN}/orders"
GUNICORN = shutil.which("gunicorn", path=str(Path(sys.executable).parent))  # from the test extras


class HeadRecorder(socketserver.BaseRequestHandler):
    """Records each request head as raw bytes (and its Content-Length body); answers 200 ok.

    Keeps the connection for the next request until the client closes or sends
    ``Connection: close``. Every read is bounded by a socket timeout.
    """

    def handle(self) -> None:
        self.request.settimeout(10)
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
            length = int(next((v for n, v in fields if n.lower() == b"content-length"), b"0"))
            while len(data) < length:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            body, data = data[:length], data[length:]
            self.server.seen.put((head, body))  # type: ignore[attr-defined]
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            if any(n.lower() == b"connection" and v.strip().lower() == b"close" for n, v in fields):
                return


WSGI_APP = '''
import json


def app(environ, start_response):
    """Echo the identity a WSGI application is shown."""
    body = json.dumps({
        "xfcc": environ.get("HTTP_X_FORWARDED_CLIENT_CERT"),
        "client_cert": environ.get("HTTP_CLIENT_CERT"),
        "client_cert_chain": environ.get("HTTP_CLIENT_CERT_CHAIN"),
        "fields": sum(1 for key in environ if key.startswith("HTTP_")),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


def nginx_config(root: Path, ports: dict[str, int]) -> Path:
    """Two servers echoing the identity nginx shows an application; one also keeps ``_`` names."""
    echo = 'return 200 "xfcc=$http_x_forwarded_client_cert\\nclient_cert=$http_client_cert\\nchain=$http_client_cert_chain\\n";'
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
                large_client_header_buffers 4 16k;
                server {{
                    listen 127.0.0.1:{ports['nginx']};
                    location / {{ {echo} }}
                }}
                server {{
                    listen 127.0.0.1:{ports['nginx_underscores']};
                    underscores_in_headers on;
                    location / {{ {echo} }}
                }}
            }}
            """
        )
    )
    return conf


@attrs.define
class World:
    pki: Pki
    procs: Processes
    ports: dict[str, int]
    recorder: Any
    xfcc: str  # what users-gw writes for orders
    client_cert: str

    def mtls(self, route: str, data: bytes, timeout: float = 10.0) -> bytes:
        """Send ``data`` to users-gw's ``route`` over mTLS as orders; everything until the close."""
        context = ssl.create_default_context(cafile=str(self.pki.bundle))
        context.load_cert_chain(self.pki.certs / "orders.pem", self.pki.certs / "orders.key")
        with socket.create_connection(("127.0.0.1", self.ports["users_" + route]), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname="users") as tls:
                tls.sendall(data)
                return read_to_end(tls)

    def plain(self, route: str, data: bytes, timeout: float = 10.0) -> bytes:
        """Send ``data`` to callers-gw's outbound ``route`` (plain TCP); everything until the close."""
        with socket.create_connection(("127.0.0.1", self.ports["orders_" + route]), timeout=timeout) as sock:
            sock.sendall(data)
            return read_to_end(sock)

    def heads(self, count: int) -> list[bytes]:
        return [self.recorder.seen.get(timeout=5)[0] for _ in range(count)]

    def token(self, **changes: Any) -> str:
        """A token orders' gateway could have signed for users, with some claims replaced."""
        key = serialization.load_pem_private_key((self.pki.certs / "orders.key").read_bytes(), None)
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ORDERS, "sub": ORDERS, "aud": USERS, "iat": now, "exp": now + 30}
        claims["jti"] = base64.urlsafe_b64encode(hashlib.sha256(repr((now, time.perf_counter_ns())).encode()).digest()[:16]).decode()
        claims.update(changes)
        payload = json.dumps(claims, separators=(",", ":"), allow_nan=True).encode()
        return jwt.api_jws.PyJWS().encode(payload, key, algorithm=algorithm_for(key))


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("identity-forgery-e2e")
    inbound_routes = {
        "http": "http-headers",
        "jwt": "jwt",
        "jwtfwd": "jwt",
        "none": "none",
        "gunicorn": "http-headers",
        "gunicorn_dangerous": "http-headers",
        "nginx": "http-headers",
        "nginx_underscores": "http-headers",
    }
    outbound_routes = {"jwt": "jwt", "jwt_to_none": "none"}  # name -> users-gw route it reaches
    names = [f"users_{r}" for r in inbound_routes] + [f"orders_{r}" for r in outbound_routes]
    names += ["gunicorn", "gunicorn_dangerous", "nginx", "nginx_underscores"]
    ports = {name: free_port() for name in names}
    pki = Pki.create(root, None, ("users", "orders"))
    recorder = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HeadRecorder)
    recorder.daemon_threads = True
    recorder.seen = queue.Queue()  # type: ignore[attr-defined]
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    procs = Processes(root)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    gunicorn = GUNICORN
    try:
        (root / "echo_app.py").write_text(WSGI_APP)
        for name, extra in (("gunicorn", []), ("gunicorn_dangerous", ["--header-map", "dangerous"])):
            if gunicorn:
                argv = [gunicorn, "--chdir", str(root), "--workers", "1", "--bind", f"127.0.0.1:{ports[name]}", *extra, "echo_app:app"]
                procs.start(name, argv)
        if nginx:
            (root / "nginx-tmp").mkdir()
            procs.start("nginx", [nginx, "-p", str(root), "-c", str(nginx_config(root, ports))])
        recorder_at = f"tcp:127.0.0.1:{recorder.server_address[1]}"
        backends = {route: f"tcp:127.0.0.1:{ports[route]}" for route in ("gunicorn", "gunicorn_dangerous", "nginx", "nginx_underscores")}
        inbound = "".join(
            f"""
            [[service.inbound]]
            name = "users-{route}"
            listen = "tcp:{ports['users_' + route]}:interface=127.0.0.1"
            backend = "{backends.get(route, recorder_at)}"
            allow = ["orders"]
            identity = "{mode}"
            {'jwt_forward = true' if route == 'jwtfwd' else ''}
            """
            for route, mode in inbound_routes.items()
        )
        outbound = "".join(
            f"""
            [[service.outbound]]
            name = "orders-{route}"
            listen = "tcp:{ports['orders_' + route]}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{ports['users_' + target]}"
            peer = "users"
            identity = "jwt"
            """
            for route, target in outbound_routes.items()
        )
        (root / "users-gw.toml").write_text(gateway_config(pki, None, service_block(pki, "users", inbound), mode="off"))
        (root / "callers-gw.toml").write_text(gateway_config(pki, None, service_block(pki, "orders", outbound), mode="off"))
        procs.twistd("users-gw", "s2sgw", "--config", str(root / "users-gw.toml"))
        procs.twistd("callers-gw", "s2sgw", "--config", str(root / "callers-gw.toml"))
        for name in names:
            if (not name.startswith("gunicorn") or gunicorn) and (not name.startswith("nginx") or nginx):
                procs.wait_port(ports[name])
        der = x509.load_pem_x509_certificate((pki.certs / "orders.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
        xfcc = f"By={USERS};Hash={hashlib.sha256(der).hexdigest()};URI={ORDERS}"
        yield World(pki, procs, ports, recorder, xfcc, ":" + base64.b64encode(der).decode() + ":")
    finally:
        procs.stop_all()
        recorder.shutdown()
        recorder.server_close()


def forged_fields(value: bytes = b"By=evil;URI=spiffe://e2e.s2sgw.test/admin") -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name in FORGED)


def identity_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
    return [(name, value.strip()) for name, value in fields if fold_name(name) in IDENTITY_HEADERS]


def test_no_spelling_of_an_identity_header_reaches_the_backend_of_an_http_headers_route(world: World) -> None:
    drain(world.recorder.seen)
    request = b"POST /forged HTTP/1.1\r\nHost: users\r\n" + forged_fields() + b"Content-Length: 4\r\nConnection: close\r\n\r\nbody"
    answer = world.mtls("http", request)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ok")
    (head,) = world.heads(1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /forged HTTP/1.1"
    assert lines[1:3] == [b"X-Forwarded-Client-Cert: " + world.xfcc.encode(), b"Client-Cert: " + world.client_cert.encode()]
    assert identity_fields(head) == [(b"X-Forwarded-Client-Cert", world.xfcc.encode()), (b"Client-Cert", world.client_cert.encode())]
    assert b"evil;URI=" not in head


def test_a_jwt_route_never_forwards_a_caller_written_identity_header_inbound(world: World) -> None:
    """With the token removed (default) or forwarded, no identity header of the caller's reaches the backend."""
    for route in ("jwt", "jwtfwd"):
        drain(world.recorder.seen)
        token = world.token().encode()
        request = b"GET /" + route.encode() + b" HTTP/1.1\r\nHost: users\r\nAuthorization: Bearer " + token + b"\r\n"
        answer = world.mtls(route, request + forged_fields() + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        (head,) = world.heads(1)
        assert identity_fields(head) == [] and b"evil;URI=" not in head
        assert (b"Authorization: Bearer " + token in head) == (route == "jwtfwd")


def test_an_outbound_jwt_route_never_sends_a_local_clients_identity_header(world: World) -> None:
    """The remote route has identity = "none", so the backend sees exactly what the outbound side sent."""
    drain(world.recorder.seen)
    request = b"GET /out HTTP/1.1\r\nHost: users\r\nAuthorization: Bearer mine\r\n" + forged_fields() + b"Connection: close\r\n\r\n"
    answer = world.plain("jwt_to_none", request)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    (head,) = world.heads(1)
    lines = head.split(b"\r\n")
    assert lines[1].startswith(b"Authorization: Bearer ey") and b"mine" not in head
    assert identity_fields(head) == [] and b"evil;URI=" not in head
    # Through both sides (outbound jwt -> inbound jwt), nothing either.
    drain(world.recorder.seen)
    assert world.plain("jwt", request).startswith(b"HTTP/1.1 200 OK\r\n")
    (head,) = world.heads(1)
    assert identity_fields(head) == [] and b"evil;URI=" not in head and b"Authorization" not in head


@pytest.mark.parametrize("route", ["http", "jwt"])
def test_1000_caller_header_fields_are_refused_with_431(world: World, route: str) -> None:
    drain(world.recorder.seen)
    request = b"GET /many HTTP/1.1\r\nHost: users\r\n" + b"".join(b"X-Field-%d: v\r\n" % i for i in range(1000)) + b"\r\n"
    answer = world.mtls(route, request)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") and answer.endswith(b"http_too_many_headers\n")
    world.procs.wait_audit("users-gw", f"users-{route}", "reason=http_too_many_headers ")
    with pytest.raises(queue.Empty):
        world.recorder.seen.get(timeout=0.3)


def test_1000_header_fields_from_a_local_client_are_refused_by_an_outbound_jwt_route(world: World) -> None:
    request = b"GET /many HTTP/1.1\r\nHost: users\r\n" + b"".join(b"X-Field-%d: v\r\n" % i for i in range(1000)) + b"\r\n"
    answer = world.plain("jwt", request)
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.endswith(b"http_too_many_headers\n")
    world.procs.wait_audit("callers-gw", "orders-jwt", "reason=http_too_many_headers ")


@pytest.mark.parametrize("route", ["http", "jwt"])
def test_a_bare_lf_head_is_refused_within_a_second(world: World, route: str) -> None:
    context = ssl.create_default_context(cafile=str(world.pki.bundle))
    context.load_cert_chain(world.pki.certs / "orders.pem", world.pki.certs / "orders.key")
    with socket.create_connection(("127.0.0.1", world.ports["users_" + route]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="users") as tls:
            start = time.monotonic()
            tls.sendall(b"GET /lf HTTP/1.1\nHost: users\n")  # the head is not even complete
            answer = read_to_end(tls)
            elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and answer.endswith(b"http_bad_request\n")
    assert elapsed < 1.0, elapsed
    world.procs.wait_audit("users-gw", f"users-{route}", "reason=http_bad_request ")


@pytest.mark.parametrize("claim", ["iat", "exp", "nbf"])
def test_time_claims_that_are_not_finite_numbers_are_refused(world: World, claim: str) -> None:
    drain(world.recorder.seen)
    for value in (math.nan, math.inf, -math.inf, "123", True, None):
        token = world.token(**{claim: value}).encode()
        answer = world.mtls("jwt", b"GET /t HTTP/1.1\r\nHost: users\r\nAuthorization: Bearer " + token + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and answer.endswith(b"jwt_invalid\n"), (claim, value, answer)
    with pytest.raises(queue.Empty):
        world.recorder.seen.get(timeout=0.3)


def test_a_token_is_accepted_once(world: World) -> None:
    token = world.token().encode()
    request = b"GET /once HTTP/1.1\r\nHost: users\r\nAuthorization: Bearer " + token + b"\r\nConnection: close\r\n\r\n"
    assert world.mtls("jwt", request).startswith(b"HTTP/1.1 200 OK\r\n")
    assert world.mtls("jwt", request).endswith(b"jwt_replayed\n")
    assert world.mtls("jwtfwd", request).startswith(b"HTTP/1.1 200 OK\r\n")  # each route has its own cache
    assert world.mtls("jwtfwd", request).endswith(b"jwt_replayed\n")


# ---------------------------------------------------------------------------------------------
# Real backends: what gunicorn and nginx show the application


@pytest.mark.parametrize("route", ["gunicorn", "gunicorn_dangerous"])
def test_gunicorn_shows_the_application_exactly_the_gateways_identity(world: World, route: str) -> None:
    if GUNICORN is None:
        pytest.skip("gunicorn is not installed (pip install '.[test]')")
    answer = world.mtls(route, b"GET / HTTP/1.1\r\nHost: users\r\n" + forged_fields() + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    shown = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (shown["xfcc"], shown["client_cert"], shown["client_cert_chain"]) == (world.xfcc, world.client_cert, None)


def test_gunicorn_accepts_every_head_the_gateway_forwards(world: World) -> None:
    """98 caller fields + the gateway's 2 = gunicorn's limit of 100: accepted; 99 are refused by the gateway."""
    if GUNICORN is None:
        pytest.skip("gunicorn is not installed (pip install '.[test]')")
    fields = [b"Host: users", b"Connection: close", *(b"X-Field-%d: v" % i for i in range(96))]
    answer = world.mtls("gunicorn", b"GET / HTTP/1.1\r\n" + b"\r\n".join(fields) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    shown = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert shown["xfcc"] == world.xfcc and shown["fields"] == 100  # every field reached the application
    fields.append(b"X-Field-96: v")
    answer = world.mtls("gunicorn", b"GET / HTTP/1.1\r\n" + b"\r\n".join(fields) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.endswith(b"http_too_many_headers\n")


@pytest.mark.parametrize("route", ["nginx", "nginx_underscores"])
def test_nginx_shows_the_application_exactly_the_gateways_identity(world: World, route: str) -> None:
    if world.procs.running.get("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    answer = world.mtls(route, b"GET / HTTP/1.1\r\nHost: users\r\n" + forged_fields() + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    body = answer.partition(b"\r\n\r\n")[2].decode()
    assert body == f"xfcc={world.xfcc}\nclient_cert={world.client_cert}\nchain=\n"
