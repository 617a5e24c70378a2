"""Helpers for end-to-end tests: real twistd processes, loopback ports, audit lines in logs."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import attrs

from s2sgw.ca.authority import CertificateAuthority

BIN = Path(sys.executable).parent
TRUST_DOMAIN = "e2e.s2sgw.test"


def s2sgw(*args: str | Path, timeout: float = 120.0) -> str:
    """Run the ``s2sgw`` command installed beside this Python; it must succeed. Its output."""
    result = subprocess.run([str(BIN / "s2sgw"), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"s2sgw {' '.join(map(str, args))}: {result.stdout}{result.stderr}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@attrs.define
class Processes:
    """Child processes of one test module, each logging to a file; all stopped at the end."""

    directory: Path
    running: dict[str, subprocess.Popen] = attrs.Factory(dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.out", "wb")
        process = subprocess.Popen(argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = process
        return process

    def twistd(self, name: str, *plugin_args: str) -> subprocess.Popen:
        return self.start(
            name,
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={self.directory / (name + '.log')}", *plugin_args],
        )

    def log(self, name: str) -> str:
        """``name``'s whole log: twistd rotates it at 1 MB (NAME.log.1 is the newest rotated part)."""
        numbered = [p for p in self.directory.glob(f"{name}.log.*") if p.suffix[1:].isdigit()]
        rotated = sorted(numbered, key=lambda p: -int(p.suffix[1:]))
        current = self.directory / f"{name}.log"
        parts = [*rotated, current] if current.exists() else rotated
        return "".join(part.read_text(errors="replace") for part in parts)

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.running.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}:\n{self.output(name)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nothing listens on port {port} after {timeout} s")

    def output(self, name: str) -> str:
        out = self.directory / f"{name}.out"
        return (out.read_text(errors="replace") if out.exists() else "") + self.log(name)

    def wait_audit(self, name: str, route: str, *needles: str, timeout: float = 5.0) -> str:
        """The first audit line of ``route`` in ``name``'s log containing every needle."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log(name).splitlines():
                if "s2sgw.audit" in line and f"route={route} " in line and all(n in line for n in needles):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit line for {route} with {needles} in {name}:\n{self.log(name)[-4000:]}")
            time.sleep(0.05)

    def signal(self, name: str, signum: int = signal.SIGHUP) -> None:
        os.kill(self.running[name].pid, signum)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@attrs.define
class Pki:
    """A CA directory plus identities written as NAME.pem / NAME.key under ``certs``."""

    directory: Path
    ca: CertificateAuthority
    certs: Path

    @classmethod
    def create(cls, directory: Path, ca_url: str | None, names: tuple[str, ...]) -> Pki:
        ca = CertificateAuthority.init(directory / "ca", TRUST_DOMAIN, url=ca_url)
        pki = cls(directory, ca, directory / "certs")
        for name in names:
            pki.issue(name)
        return pki

    def issue(self, name: str, **kwargs) -> int:
        identity = self.ca.issue(name, **kwargs)
        self.ca.write_identity(identity, self.certs)
        return identity.record.serial

    def issue_expired(self, name: str, out: Path) -> None:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=3)
        self.ca.write_identity(self.ca.issue(name, hours=1, now=past), out)

    @property
    def bundle(self) -> Path:
        return self.directory / "ca" / "bundle.pem"


def gateway_config(
    pki: Pki,
    ca_port: int | None,
    services: str,
    *,
    mode: str = "ocsp",
    fail: str = "closed",
    extra: str = "",
) -> str:
    status = f'url = "http://127.0.0.1:{ca_port}/ocsp"' if ca_port else ""
    return textwrap.dedent(
        f"""\
        trust = "{pki.bundle}"
        {extra}
        [status]
        mode = "{mode}"
        {status}
        fail = "{fail}"
        max_cache_age = 1.0
        [timeouts]
        handshake = 5
        drain = 2
        """
    ) + textwrap.dedent(services)


def service_block(pki: Pki, name: str, routes: str) -> str:
    return f'\n[[service]]\nname = "{name}"\ncert = "{pki.certs / (name + ".pem")}"\nkey = "{pki.certs / (name + ".key")}"\n' + textwrap.dedent(routes)


def callers_of(pki: Pki, names: tuple[str, ...], ports: dict[str, int], remote_port: int, peer: str = "users") -> str:
    """One [[service]] per caller, each with an outbound route ``NAME-to-PEER`` on ``ports[NAME]``."""
    return "".join(
        service_block(
            pki,
            name,
            f"""
            [[service.outbound]]
            name = "{name}-to-{peer}"
            listen = "tcp:{ports[name]}:interface=127.0.0.1"
            remote = "tcp:127.0.0.1:{remote_port}"
            peer = "{peer}"
            """,
        )
        for name in names
    )


class EchoServer:
    """A backend that echoes every byte, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def echoes(port: int) -> bool:
    """Does a new connection to 127.0.0.1:``port`` (a route in front of an EchoServer) get an echo?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(b"hello\n")
            return sock.recv(100) == b"hello\n"
    except OSError:
        return False


def live_connection(port: int) -> socket.socket:
    """A connection to 127.0.0.1:``port`` that has been proven to echo, left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"ping\n")
    assert sock.recv(100) == b"ping\n"
    return sock


def closed(sock: socket.socket) -> bool:
    """Has the far end closed (or reset) ``sock``? Waits at most 10 ms."""
    sock.settimeout(0.01)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def wait_for(condition, timeout: float = 10.0, step: float = 0.02) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met after {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


class ClientLoop:
    """Calls through a route one after another until stopped; counts calls and failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = f"call {self.calls}\n".encode()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.settimeout(10)
                    sock.sendall(payload)
                    answer = b""
                    while len(answer) < len(payload):
                        chunk = sock.recv(100)
                        if not chunk:
                            break
                        answer += chunk
                if answer != payload:
                    self.failures.append(f"call {self.calls}: got {answer!r}")
            except OSError as error:
                self.failures.append(f"call {self.calls}: {error}")
            self.calls += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def receive_notification(sock: socket.socket, wanted: str, timeout: float = 20.0) -> dict[str, str]:
    """The next sd_notify message on ``sock`` containing the field ``wanted`` (KEY=VALUE lines),
    skipping others (STATUS updates)."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no {wanted} notification within {timeout} s") from None
        fields = dict(line.split("=", 1) for line in data.decode("utf-8").splitlines())
        if wanted in fields:
            return fields
