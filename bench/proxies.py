"""The backends and the proxy pairs under test, all on 127.0.0.1 and all with the same certificates.

Each pair is outbound proxy -> mTLS -> inbound proxy -> backend, with one route to the small HTTP
backend (nginx answering ~100 bytes) and one to an iperf3 server. Configurations stay close to
each proxy's defaults; the deliberate choices, the same for every proxy: one event loop per
process where the proxy has the knob (HAProxy ``nbthread 1``, nginx ``worker_processes 1``; stunnel
runs a thread per connection and has none), warnings-only logging except s2sgw's audit log (a
feature of the product, kept on), the chain checked against the bench CA and the peer's name
checked on the outbound side.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import attrs

from bench.procs import BenchError, Fleet, free_port, raise_nofile
from s2sgw.ca.authority import CertificateAuthority

BIN = Path(sys.executable).parent
TRUST_DOMAIN = "bench.s2sgw.test"
BODY = b"s2sgw bench: a small answer of about one hundred bytes, the size of a typical JSON status reply.\n"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PAIRS = ("direct", "s2sgw", "stunnel", "haproxy", "nginx")
STATUS_MODES = ("off", "warm", "cold")


@attrs.frozen
class Pki:
    """A throwaway ECDSA P-256 CA, a server and a client identity, in every file layout a proxy wants."""

    directory: Path
    bundle: Path  # the root: the only trust anchor of every proxy
    certs: Path  # NAME.pem (leaf + intermediate), NAME.key, NAME.combined.pem (HAProxy)

    def cert(self, name: str) -> Path:
        return self.certs / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.certs / f"{name}.key"

    def combined(self, name: str) -> Path:
        return self.certs / f"{name}.combined.pem"

    @classmethod
    def create(cls, directory: Path, ca_url: str) -> Pki:
        ca = CertificateAuthority.init(directory / "ca", TRUST_DOMAIN, key_type="ecdsa-p256", url=ca_url)
        certs = directory / "certs"
        for name in ("server", "client"):
            pem, key = ca.write_identity(ca.issue(name, hours=24), certs)
            (certs / f"{name}.combined.pem").write_bytes(pem.read_bytes() + key.read_bytes())
        return cls(directory / "ca", directory / "ca" / "bundle.pem", certs)


@attrs.frozen
class Pair:
    """Where a pair is entered; ``inbound`` is the mTLS listener alone (None for direct)."""

    name: str
    http: int  # plaintext entry forwarding to the HTTP backend
    iperf: int  # plaintext entry forwarding to the iperf3 server
    inbound: int | None
    processes: tuple[str, ...]  # fleet names whose CPU and memory count as the pair's


@attrs.frozen
class Backends:
    http: int
    iperf: int
    processes: tuple[str, ...] = ("backend-http", "backend-iperf")


@attrs.define(eq=False)
class Lab:
    """Starts everything a run needs and knows where each thing listens."""

    fleet: Fleet
    pki: Pki
    work: Path
    ca_port: int
    backends: Backends | None = None
    pairs: dict[str, Pair] = attrs.Factory(dict)
    status_listeners: dict[str, int] = attrs.Factory(dict)  # s2sgw inbound with status "warm"/"cold"
    nofile: int = attrs.Factory(raise_nofile)  # the open-file limit every child gets

    @property
    def max_proxied(self) -> int:
        """Connections one proxy process can carry: two descriptors each, under the open-file limit."""
        return (self.nofile - 400) // 2

    @classmethod
    def create(cls, fleet: Fleet, work: Path) -> Lab:
        ca_port = free_port()
        pki = Pki.create(work / "pki", f"http://127.0.0.1:{ca_port}")
        return cls(fleet, pki, work, ca_port)

    # -- backends --------------------------------------------------------------------------

    def start_backends(self) -> Backends:
        http, iperf = free_port(), free_port()
        (self.work / "www").mkdir(exist_ok=True)
        conf = self._nginx_main("backend-http", stream=False) + textwrap.dedent(
            f"""\
            http {{
                access_log off;
                keepalive_requests 100000000;
                keepalive_timeout 900s;
                client_header_timeout 900s;
                client_body_temp_path {self.work}/www/body;
                proxy_temp_path {self.work}/www/proxy;
                fastcgi_temp_path {self.work}/www/fastcgi;
                uwsgi_temp_path {self.work}/www/uwsgi;
                scgi_temp_path {self.work}/www/scgi;
                default_type text/plain;
                server {{
                    listen 127.0.0.1:{http} backlog=4096;
                    location / {{ return 200 "{BODY.decode().rstrip()}\\n"; }}
                }}
            }}
            """
        )
        self._nginx("backend-http", conf)
        process = self.fleet.start("backend-iperf", ["iperf3", "--server", "--bind", "127.0.0.1", "--port", str(iperf)])
        wait_port_quietly(http, self.fleet.running["backend-http"], "backend nginx", log=self.work / "backend-http.log")
        wait_port_quietly(iperf, process)
        self.backends = Backends(http, iperf)
        return self.backends

    # -- the CA status server (for s2sgw's status check) -------------------------------------

    def start_ca(self) -> None:
        process = self.fleet.start(
            "s2sgw-ca",
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={self.work / 's2sgw-ca.log'}",
             "s2sgw-ca", "--dir", str(self.pki.directory), "--listen", f"tcp:{self.ca_port}:interface=127.0.0.1"],
        )  # fmt: skip
        wait_port_quietly(self.ca_port, process, "twistd s2sgw-ca", log=self.work / "s2sgw-ca.log")

    # -- pairs -----------------------------------------------------------------------------

    def start_pair(self, name: str) -> Pair:
        if self.backends is None:
            raise BenchError("start the backends first")
        start = getattr(self, f"_start_{name}")
        pair = start(self.backends)
        self.pairs[name] = pair
        return pair

    def restart_pair(self, name: str) -> Pair:
        """Stop a pair's processes and start them afresh (new ports)."""
        for process in self.pairs[name].processes:
            self.fleet.stop(process)
        return self.start_pair(name)

    def _start_direct(self, backends: Backends) -> Pair:
        return Pair("direct", backends.http, backends.iperf, None, ())

    def _ports(self) -> dict[str, int]:
        return {key: free_port() for key in ("out_http", "out_iperf", "in_http", "in_iperf")}

    # s2sgw

    def _s2sgw_config(self, name: str, services: str, status: str = "off", workers: int = 1) -> Path:
        if status == "off":
            status_table = 'mode = "off"'
        else:  # warm: answers reused for minutes; cold: every handshake asks the CA
            age = 300 if status == "warm" else 0.001
            status_table = f'mode = "ocsp"\nurl = "http://127.0.0.1:{self.ca_port}/ocsp"\nmax_cache_age = {age}'
        path = self.work / f"{name}.toml"
        path.write_text(
            f'trust = "{self.pki.bundle}"\n' + (f"workers = {workers}\n" if workers != 1 else "")
            + f'\n[status]\n{status_table}\n\n[timeouts]\nidle = 900\nhandshake = 30\n'
            + textwrap.dedent(services)
        )
        return path

    def _twistd(self, name: str, config: Path, ports: list[int], reactor: str | None = None):
        chosen = [f"--reactor={reactor}"] if reactor else []  # default: s2sgw's own (s2sgw.reactor)
        process = self.fleet.start(
            name,
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={self.work / (name + '.log')}",
             *chosen, "s2sgw", "--config", str(config)],
        )  # fmt: skip
        for port in ports:
            wait_port_quietly(port, process, name, log=self.work / f"{name}.log")
        return process

    def _s2sgw_inbound(
        self, name: str, routes: dict[str, tuple[int, int]], status: str = "off", workers: int = 1,
        reactor: str | None = None,
    ) -> None:
        blocks = "".join(
            f"""
            [[service.inbound]]
            name = "{route}"
            listen = "tcp:{listen}:interface=127.0.0.1"
            backend = "tcp:127.0.0.1:{backend}"
            allow = ["client"]
            max_connections = 30000
            """
            for route, (listen, backend) in routes.items()
        )
        service = (
            f'\n[[service]]\nname = "server"\ncert = "{self.pki.cert("server")}"\nkey = "{self.pki.key("server")}"\n'
            + textwrap.dedent(blocks)
        )
        config = self._s2sgw_config(name, service, status, workers)
        self._twistd(name, config, [listen for listen, _ in routes.values()], reactor)

    def _start_s2sgw(self, backends: Backends, label: str = "s2sgw", reactor: str | None = None) -> Pair:
        """The s2sgw pair; ``label`` names its processes, ``reactor`` is twistd's ``--reactor`` (default ours)."""
        p = self._ports()
        routes = {"http-in": (p["in_http"], backends.http), "iperf-in": (p["in_iperf"], backends.iperf)}
        self._s2sgw_inbound(f"{label}-in", routes, reactor=reactor)
        blocks = "".join(
            f"""
            [[service.outbound]]
            name = "{route}"
            listen = "tcp:{listen}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{remote}"
            peer = "server"
            max_connections = 30000
            """
            for route, listen, remote in (("http-out", p["out_http"], p["in_http"]), ("iperf-out", p["out_iperf"], p["in_iperf"]))
        )
        service = (
            f'\n[[service]]\nname = "client"\ncert = "{self.pki.cert("client")}"\nkey = "{self.pki.key("client")}"\n'
            + textwrap.dedent(blocks)
        )
        self._twistd(f"{label}-out", self._s2sgw_config(f"{label}-out", service), [p["out_http"], p["out_iperf"]], reactor)
        return Pair(label, p["out_http"], p["out_iperf"], p["in_http"], (f"{label}-out", f"{label}-in"))

    def start_s2sgw_variant(self, label: str, reactor: str | None) -> Pair:
        """A second s2sgw pair beside the first, under twistd's ``--reactor`` (e.g. ``epoll``)."""
        if self.backends is None:
            raise BenchError("start the backends first")
        self.pairs[label] = pair = self._start_s2sgw(self.backends, label, reactor)
        return pair

    def start_s2sgw_inbound(self, label: str, workers: int) -> int:
        """An extra s2sgw inbound listener (status off) run by ``workers`` worker processes; its port."""
        if self.backends is None:
            raise BenchError("start the backends first")
        port = free_port()
        self._s2sgw_inbound(label, {f"http-{label}": (port, self.backends.http)}, workers=workers)
        return port

    def start_s2sgw_status(self, mode: str) -> int:
        """An extra s2sgw inbound listener whose status check asks the CA (``warm`` or ``cold`` cache)."""
        if self.backends is None:
            raise BenchError("start the backends first")
        port = free_port()
        self._s2sgw_inbound(f"s2sgw-in-{mode}", {f"http-in-{mode}": (port, self.backends.http)}, status=mode)
        self.status_listeners[mode] = port
        return port

    # stunnel

    def _start_stunnel(self, backends: Backends) -> Pair:
        p = self._ports()
        common = f"foreground = yes\npid =\ndebug = 4\noutput = {self.work}/%s.log\n"
        server = common % "stunnel-in" + "".join(
            f"""
            [{route}]
            accept = 127.0.0.1:{listen}
            connect = 127.0.0.1:{backend}
            cert = {self.pki.cert("server")}
            key = {self.pki.key("server")}
            CAfile = {self.pki.bundle}
            verifyChain = yes
            checkHost = client
            """
            for route, listen, backend in (("http", p["in_http"], backends.http), ("iperf", p["in_iperf"], backends.iperf))
        )
        client = common % "stunnel-out" + "".join(
            f"""
            [{route}]
            client = yes
            accept = 127.0.0.1:{listen}
            connect = 127.0.0.1:{remote}
            cert = {self.pki.cert("client")}
            key = {self.pki.key("client")}
            CAfile = {self.pki.bundle}
            verifyChain = yes
            checkHost = server
            sni = server
            """
            for route, listen, remote in (("http", p["out_http"], p["in_http"]), ("iperf", p["out_iperf"], p["in_iperf"]))
        )
        for name, text, ports in (("stunnel-in", server, (p["in_http"], p["in_iperf"])), ("stunnel-out", client, (p["out_http"], p["out_iperf"]))):
            conf = self.work / f"{name}.conf"
            conf.write_text(textwrap.dedent(text))
            process = self.fleet.start(name, [stunnel_binary(), str(conf)])
            for port in ports:
                wait_port_quietly(port, process, name, log=self.work / f"{name}.log")
        return Pair("stunnel", p["out_http"], p["out_iperf"], p["in_http"], ("stunnel-out", "stunnel-in"))

    # HAProxy

    def _start_haproxy(self, backends: Backends) -> Pair:
        p = self._ports()
        head = textwrap.dedent(
            f"""\
            global
                maxconn {self.max_proxied + 50}
                nbthread 1
            defaults
                mode tcp
                timeout connect 5s
                timeout client 900s
                timeout server 900s
            """
        )
        server = head + "".join(
            f"""
            frontend {route}
                bind 127.0.0.1:{listen} ssl crt {self.pki.combined("server")} ca-file {self.pki.bundle} verify required
                default_backend {route}-backend
            backend {route}-backend
                server backend 127.0.0.1:{backend}
            """
            for route, listen, backend in (("http", p["in_http"], backends.http), ("iperf", p["in_iperf"], backends.iperf))
        )
        client = head + "".join(
            f"""
            frontend {route}
                bind 127.0.0.1:{listen}
                default_backend {route}-remote
            backend {route}-remote
                server remote 127.0.0.1:{remote} ssl crt {self.pki.combined("client")} ca-file {self.pki.bundle} verify required verifyhost server sni str(server)
            """
            for route, listen, remote in (("http", p["out_http"], p["in_http"]), ("iperf", p["out_iperf"], p["in_iperf"]))
        )
        for name, text, ports in (("haproxy-in", server, (p["in_http"], p["in_iperf"])), ("haproxy-out", client, (p["out_http"], p["out_iperf"]))):
            conf = self.work / f"{name}.cfg"
            conf.write_text(textwrap.dedent(text))
            process = self.fleet.start(name, ["haproxy", "-db", "-f", str(conf)])
            for port in ports:
                wait_port_quietly(port, process, name)
        return Pair("haproxy", p["out_http"], p["out_iperf"], p["in_http"], ("haproxy-out", "haproxy-in"))

    # nginx (stream module)

    def _nginx_main(self, name: str, stream: bool) -> str:
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers read the 0600 keys of the bench PKI
        module = f"load_module {NGINX_STREAM_MODULE};\n" if stream else ""
        return module + user + textwrap.dedent(
            f"""\
            worker_processes 1;
            worker_rlimit_nofile {self.nofile};
            pid {self.work}/{name}.pid;
            error_log {self.work}/{name}.log warn;
            events {{ worker_connections {self.nofile - 100}; }}
            """
        )

    def _nginx(self, name: str, conf: str):
        path = self.work / f"{name}.nginx.conf"
        path.write_text(conf)
        return self.fleet.start(
            name, ["nginx", "-e", str(self.work / f"{name}.log"), "-p", str(self.work), "-c", str(path), "-g", "daemon off;"]
        )

    def _start_nginx(self, backends: Backends) -> Pair:
        if not NGINX_STREAM_MODULE.exists():
            raise BenchError(f"nginx stream module missing ({NGINX_STREAM_MODULE}): install libnginx-mod-stream")
        p = self._ports()
        server = self._nginx_main("nginx-in", stream=True) + "stream {\n" + "".join(
            f"""
            server {{
                listen 127.0.0.1:{listen} ssl backlog=4096;
                ssl_certificate {self.pki.cert("server")};
                ssl_certificate_key {self.pki.key("server")};
                ssl_protocols TLSv1.2 TLSv1.3;  # 1.22's default lacks 1.3
                ssl_client_certificate {self.pki.bundle};
                ssl_verify_client on;
                proxy_pass 127.0.0.1:{backend};
                proxy_timeout 900s;
            }}
            """
            for listen, backend in ((p["in_http"], backends.http), (p["in_iperf"], backends.iperf))
        ) + "}\n"
        client = self._nginx_main("nginx-out", stream=True) + "stream {\n" + "".join(
            f"""
            server {{
                listen 127.0.0.1:{listen} backlog=4096;
                proxy_pass 127.0.0.1:{remote};
                proxy_ssl on;
                proxy_ssl_protocols TLSv1.2 TLSv1.3;
                proxy_ssl_certificate {self.pki.cert("client")};
                proxy_ssl_certificate_key {self.pki.key("client")};
                proxy_ssl_trusted_certificate {self.pki.bundle};
                proxy_ssl_verify on;
                proxy_ssl_name server;
                proxy_ssl_server_name on;
                proxy_timeout 900s;
            }}
            """
            for listen, remote in ((p["out_http"], p["in_http"]), (p["out_iperf"], p["in_iperf"]))
        ) + "}\n"
        for name, conf, ports in (("nginx-in", server, (p["in_http"], p["in_iperf"])), ("nginx-out", client, (p["out_http"], p["out_iperf"]))):
            process = self._nginx(name, conf)
            for port in ports:
                wait_port_quietly(port, process, name, log=self.work / f"{name}.log")
        return Pair("nginx", p["out_http"], p["out_iperf"], p["in_http"], ("nginx-out", "nginx-in"))


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise BenchError("stunnel is not installed (Debian package stunnel4)")


def wait_port_quietly(port: int, process, what: str = "", log: Path | None = None, timeout: float = 30.0) -> None:
    """Wait until ``port`` is bound, without connecting (a probe would show in audit logs and stall some servers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise BenchError(f"{what} exited with {process.returncode} before listening on {port}\n{text}")
        if _listening(port):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} does not listen on {port} after {timeout:g} s")


def _listening(port: int) -> bool:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False
