"""nginx's proxy_cache (etc/nginx/s2sgw-ca-cache.conf as shipped) in front of two status
servers on one PostgreSQL store: cached GET answers that `openssl ocsp` verifies, and a
revocation that still reaches feed subscribers within a second."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.e2e import Processes, free_port, s2sgw
from tests.replicas import ReplicaSet, feed, load_cert, ocsp_status

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).parent.parent / "etc" / "nginx" / "s2sgw-ca-cache.conf"
SHIPPED_SERVERS = ("ca-1.internal:8080", "ca-2.internal:8080", "ca-3.internal:8080")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def cache_config(root: Path, port: int, servers: list[str]) -> Path:
    """The shipped include with the test's servers, port and cache path, in a main config."""
    text = SHIPPED.read_text()
    server_lines = [line for line in text.splitlines() if line.strip().startswith("server ") and ":8080" in line]
    assert len(server_lines) == len(SHIPPED_SERVERS)
    template = server_lines[0].replace(SHIPPED_SERVERS[0], "{}")
    text = text.replace("\n".join(server_lines), "\n".join(template.format(s) for s in servers))
    text = text.replace("/var/cache/nginx/s2sgw-ca", str(root / "cache")).replace("listen 80;", f"listen 127.0.0.1:{port};")
    (root / "nginx-ca.conf").write_text(text)
    main = root / "nginx.conf"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {root}/nginx.pid;\nerror_log {root}/nginx-error.log info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {root}/tmp-body;\n    proxy_temp_path {root}/tmp-proxy;\n"
        f"    include {root}/nginx-ca.conf;\n}}\n"
    )
    return main


@attrs.frozen
class World:
    root: Path
    certs: Path
    replicas: ReplicaSet
    cache_url: str

    @property
    def ca(self) -> Path:
        return self.replicas.source

    def get(self, name: str) -> tuple[dict[str, str], Path]:
        """GET /ocsp/{base64 of openssl's own nonce-less request} through nginx; headers and the answer."""
        request, answer = self.root / f"{name}.req", self.root / f"{name}.resp"
        subprocess.run(
            ["openssl", "ocsp", "-issuer", str(self.ca / "intermediate.pem"), "-cert", str(self.certs / f"{name}.pem"),
             "-no_nonce", "-reqout", str(request)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        encoded = urllib.parse.quote(base64.b64encode(request.read_bytes()).decode(), safe="")
        with urllib.request.urlopen(f"{self.cache_url}/ocsp/{encoded}", timeout=10) as response:
            answer.write_bytes(response.read())
            headers = {k.lower(): v for k, v in response.headers.items()}
        return headers, answer

    def verify(self, name: str, answer: Path) -> str:
        result = subprocess.run(
            ["openssl", "ocsp", "-respin", str(answer), "-issuer", str(self.ca / "intermediate.pem"),
             "-cert", str(self.certs / f"{name}.pem"), "-CAfile", str(self.ca / "bundle.pem")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[World]:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (bash dev.sh test installs it)")
    root = tmp_path_factory.mktemp("cache")
    source, certs = root / "ca", root / "certs"
    s2sgw("ca", "init", "--dir", source, "--trust-domain", "example.org", "--store", pg_cluster.new_database())
    for name in ("alice", "bob"):
        s2sgw("ca", "issue", "--dir", source, "--out", certs, name)
    processes = Processes(root)
    replicas = ReplicaSet(source, processes)
    try:
        started = replicas.start(2)
        port = free_port()
        for directory in ("cache", "tmp-body", "tmp-proxy"):
            (root / directory).mkdir()
        conf = cache_config(root, port, [f"127.0.0.1:{r.port}" for r in started])
        processes.start("nginx", [nginx, "-p", str(root), "-c", str(conf)])
        processes.wait_port(port)
        yield World(root, certs, replicas, f"http://127.0.0.1:{port}")
    finally:
        processes.stop_all()


def test_get_answers_are_cached_and_verify_with_openssl(world: World) -> None:
    first, answer = world.get("alice")
    assert first["x-cache-status"] == "MISS"
    assert "max-age=" in first["cache-control"]
    out = world.verify("alice", answer)
    assert "Response verify OK" in out and "alice.pem: good" in out, out
    again, cached = world.get("alice")
    assert again["x-cache-status"] == "HIT"
    assert cached.read_bytes() == answer.read_bytes()
    out = world.verify("alice", cached)
    assert "Response verify OK" in out and "alice.pem: good" in out, out


def test_a_revocation_reaches_feed_subscribers_through_the_cache_within_a_second(world: World) -> None:
    issuer = load_cert(world.ca / "intermediate.pem")
    bob = load_cert(world.certs / "bob.pem")
    world.get("bob")
    assert world.get("bob")[0]["x-cache-status"] == "HIT"
    latest = feed(world.cache_url, [issuer], 0, wait=False).latest
    held: dict[str, object] = {}

    def subscriber() -> None:
        held["document"] = feed(world.cache_url, [issuer], latest, wait=True)
        held["at"] = time.monotonic()

    waiting = threading.Thread(target=subscriber)
    waiting.start()
    time.sleep(0.3)
    replica = world.replicas.replicas[0]
    s2sgw("ca", "revoke", "--dir", replica.directory, "bob", "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    waiting.join(timeout=10)
    assert [entry.serial for entry in held["document"].revocations] == [bob.serial_number]
    assert held["at"] - revoked_at < 1.0
    # POST (a nonce-capable query) is never cached: it says revoked at once.
    assert ocsp_status(world.cache_url, bob, issuer) == "revoked"
    # A cached GET answer is a signed statement valid until its nextUpdate (RFC 5019): the
    # feed, not the cache, is what carries a revocation at once.
    headers, answer = world.get("bob")
    assert headers["x-cache-status"] == "HIT"
    assert "bob.pem: good" in world.verify("bob", answer)

