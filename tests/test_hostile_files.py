"""Broken or exposed files: start-up fails naming the problem; on SIGHUP the old material stays.

Start-up cases run ``twistd s2sgw`` on a broken copy of a good configuration and expect it to
exit at once with a message naming the file and key. Reload cases break the files of a running
gateway, send SIGHUP, and expect the log to name the problem while the gateway keeps serving with
the certificate it already had. An unreadable key on SIGHUP is made the way it happens in
production: ``twistd --uid`` drops root after start-up, so a root-only key loads at start and
fails on reload. At start-up, a mode 000 key is unreadable once root's file capabilities are
dropped (``setpriv``).

Everything lives in a world-traversable temporary directory so that the unprivileged user can
reach the files it is meant to reach.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from twisted.logger import LogLevel, globalLogPublisher

from s2sgw import pki as pkimod
from tests.hostile import (
    BIN,
    Gateway,
    Pki,
    Processes,
    RecordingBackend,
    client_context,
    free_port,
    gateway_toml,
    inbound_toml,
    roundtrip,
    service_toml,
)

pytestmark = pytest.mark.e2e

NOBODY = 65534


@attrs.define
class World:
    directory: Path
    pki: Pki
    procs: Processes
    backend: RecordingBackend
    gateway: Gateway  # runs as root
    dropped: Gateway  # dropped to NOBODY after start-up
    ports: dict[str, int]
    good_toml: dict[str, str]

    def allowed(self) -> ssl.SSLContext:
        certs = self.pki.certs
        return client_context(certs / "orders.pem", certs / "orders.key", self.pki.bundle)

    def served_serial(self, port: int) -> int:
        """Serve an allowed client and return the serial of the certificate the gateway showed."""
        import socket

        roundtrip(port, self.allowed())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with self.allowed().wrap_socket(sock, server_hostname="users") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def _service_files(directory: Path, pki: Pki, name: str) -> tuple[Path, Path]:
    """Copies of users' certificate and key that a test may break (key 0600, owned by root)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    shutil.copyfile(pki.certs / "users.pem", cert)
    shutil.copyfile(pki.certs / "users.key", key)
    cert.chmod(0o644)
    key.chmod(0o600)
    return cert, key


def _toml(world_dir: Path, pki: Pki, port: int, backend_port: int, cert: Path, key: Path) -> str:
    services = service_toml("users", cert, key, inbound_toml("users-in", port, backend_port, ["orders"]))
    return gateway_toml(pki.bundle, services)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    directory = Path(tempfile.mkdtemp(prefix="s2sgw-hostile-files-"))
    directory.chmod(0o755)
    procs = Processes(directory)
    backend = RecordingBackend(directory / "backend.bytes")
    try:
        pki = Pki.create(directory, None, ("users", "orders"))
        for path in (pki.certs, pki.directory / "ca"):
            path.chmod(0o755)
        pki.bundle.chmod(0o644)
        ports = {"root": free_port(), "dropped": free_port()}
        good = {}
        for which in ("root", "dropped"):
            cert, key = _service_files(directory / which, pki, "users")
            (directory / which).chmod(0o755)
            good[which] = _toml(directory, pki, ports[which], backend.port, cert, key)
        gateway = Gateway.start(procs, "gateway", good["root"], [ports["root"]])
        dropped = Gateway.start(
            procs, "dropped", good["dropped"], [ports["dropped"]], f"--uid={NOBODY}", f"--gid={NOBODY}"
        )
        for config in (gateway.config, dropped.config):
            config.chmod(0o644)
        yield World(directory, pki, procs, backend, gateway, dropped, ports, good)
    finally:
        procs.stop_all()
        backend.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _start(config: Path, *, without_root_reads: bool = False) -> subprocess.CompletedProcess[str]:
    """``twistd s2sgw`` expected to fail during option parsing (before it daemonizes or logs).

    ``without_root_reads`` runs it without the capabilities that let root read any file, so a
    mode 000 file is unreadable even to root.
    """
    argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "s2sgw", "--config", str(config)]
    if without_root_reads:
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=config.parent)


def _broken_copy(world: World, name: str, toml: str) -> Path:
    directory = world.directory / name
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    config = directory / "gateway.toml"
    config.write_text(toml)
    config.chmod(0o644)
    return config


def _assert_start_fails(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    for word in words:
        assert word in text, text


# ---------------------------------------------------------------------------------------------
# Start-up


def test_truncated_certificate_fails_start_up_naming_the_file(world: World) -> None:
    cert, key = _service_files(world.directory / "truncated-cert", world.pki, "users")
    cert.write_bytes(cert.read_bytes()[:300])
    toml = _toml(world.directory, world.pki, free_port(), world.backend.port, cert, key)
    _assert_start_fails(_start(_broken_copy(world, "truncated-cert", toml)), str(cert), "truncated PEM certificate")


def test_truncated_key_fails_start_up_naming_the_file(world: World) -> None:
    cert, key = _service_files(world.directory / "truncated-key", world.pki, "users")
    key.write_bytes(key.read_bytes()[:100])
    toml = _toml(world.directory, world.pki, free_port(), world.backend.port, cert, key)
    _assert_start_fails(_start(_broken_copy(world, "truncated-key", toml)), str(key), "malformed private key")


def test_truncated_trust_bundle_fails_start_up_naming_the_file(world: World) -> None:
    bundle = world.directory / "truncated-bundle.pem"
    bundle.write_bytes(world.pki.bundle.read_bytes()[:-40])
    toml = world.good_toml["root"].replace(f'trust = "{world.pki.bundle}"', f'trust = "{bundle}"')
    toml = toml.replace(str(world.ports["root"]), str(free_port()))
    _assert_start_fails(_start(_broken_copy(world, "truncated-bundle", toml)), str(bundle), "truncated PEM")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (("[timeouts]\n", "[timeouts]\nhandshak = 1\n"), ("timeouts.handshak", "unknown key")),
        (("[status]\n", "[status]\ncolour = \"blue\"\n"), ("status.colour", "unknown key")),
        (("max_connections = 1024", "max_connections = \"1024\""), ("max_connections", "expected an integer")),
        (("handshake = 1\n", "handshake = \"fast\"\n"), ("timeouts.handshake", "expected a number of seconds")),
        (('allow = ["orders"]', 'allow = "orders"'), ("allow", "expected a list of strings")),
        (('mode = "off"', 'mode = "maybe"'), ("status.mode", "expected one of")),
        (("handshake = 1\n", "handshake = -1\n"), ("timeouts.handshake", "must be a positive number")),
    ],
    ids=["unknown-timeouts-key", "unknown-status-key", "string-for-int", "string-for-seconds",
         "string-for-list", "bad-choice", "negative-seconds"],
)  # fmt: skip
def test_config_with_unknown_keys_or_wrong_types_fails_start_up_naming_the_key(
    world: World, edit: tuple[str, str], words: tuple[str, ...]
) -> None:
    old, new = edit
    good = world.good_toml["root"].replace(str(world.ports["root"]), str(free_port()))
    assert old in good
    config = _broken_copy(world, "config-" + words[0].replace(".", "-"), good.replace(old, new, 1))
    _assert_start_fails(_start(config), str(config), *words)


def test_unreadable_key_fails_start_up_naming_the_file(world: World) -> None:
    cert, key = _service_files(world.directory / "unreadable", world.pki, "users")
    (world.directory / "unreadable").chmod(0o755)
    toml = _toml(world.directory, world.pki, free_port(), world.backend.port, cert, key)
    config = _broken_copy(world, "unreadable-config", toml)
    key.chmod(0)
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root reads any file")
    _assert_start_fails(_start(config, without_root_reads=os.geteuid() == 0), str(key), "Permission denied")


def test_a_key_readable_by_others_is_loaded_with_a_warning(world: World, tmp_path: Path) -> None:
    """Unit level: the loader warns (and still loads) when group or others may read the key."""
    key = tmp_path / "users.key"
    shutil.copyfile(world.pki.certs / "users.key", key)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        key.chmod(0o600)
        pkimod.load_private_key(key)
        assert not [e for e in events if e.get("log_namespace") == "s2sgw.pki"]
        key.chmod(0o644)
        assert pkimod.load_private_key(key) is not None
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_namespace") == "s2sgw.pki"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == LogLevel.warn
    assert str(key) in warnings[0]["problem"] and "0644" in warnings[0]["problem"]


def test_a_gateway_started_with_a_key_readable_by_others_warns_in_its_log(world: World) -> None:
    cert, key = _service_files(world.directory / "open-key", world.pki, "users")
    key.chmod(0o644)
    port = free_port()
    toml = _toml(world.directory, world.pki, port, world.backend.port, cert, key)
    gateway = Gateway.start(world.procs, "open-key", toml, [port])
    try:
        line = gateway.wait_log(0, "s2sgw.pki#warn", str(key))
        assert "accessible by others (mode 0644)" in line
        roundtrip(port, world.allowed())
    finally:
        process = world.procs.running.pop("open-key")
        process.terminate()
        process.wait(timeout=15)


# ---------------------------------------------------------------------------------------------
# The same problems on SIGHUP: the old material stays


def _reload_and_expect_failure(gateway: Gateway, *words: str) -> str:
    mark = gateway.mark()
    gateway.procs.signal(gateway.name, signal.SIGHUP)
    line = gateway.wait_log(mark, "trust reload failed, keeping generation")
    for word in words:
        assert word in line, line
    return line


def _restore(world: World, gateway: Gateway, which: str) -> None:
    cert, key = _service_files(world.directory / which, world.pki, "users")
    gateway.config.write_text(world.good_toml[which])
    mark = gateway.mark()
    gateway.procs.signal(gateway.name, signal.SIGHUP)
    gateway.wait_log(mark, "trust material reloaded: generation")


@pytest.mark.parametrize(
    "breakage",
    ["truncated-cert", "truncated-key", "garbage-key", "empty-cert", "unknown-key", "wrong-type", "invalid-toml"],
)
def test_broken_files_on_sighup_keep_the_old_material(world: World, breakage: str) -> None:
    gateway, port = world.gateway, world.ports["root"]
    serial = world.served_serial(port)
    cert, key = world.directory / "root" / "users.pem", world.directory / "root" / "users.key"
    words: tuple[str, ...]
    if breakage == "truncated-cert":
        cert.write_bytes(cert.read_bytes()[:300])
        words = (str(cert), "truncated PEM certificate")
    elif breakage == "truncated-key":
        key.write_bytes(key.read_bytes()[:100])
        words = (str(key), "malformed private key")
    elif breakage == "garbage-key":
        key.write_bytes(os.urandom(500))
        words = (str(key), "malformed private key")
    elif breakage == "empty-cert":
        cert.write_bytes(b"")
        words = (str(cert), "no certificate found (the file is empty)")
    elif breakage == "unknown-key":
        gateway.config.write_text(world.good_toml["root"].replace("[timeouts]\n", "[timeouts]\nhandshak = 1\n"))
        words = (str(gateway.config), "timeouts.handshak", "unknown key")
    elif breakage == "wrong-type":
        gateway.config.write_text(world.good_toml["root"].replace('allow = ["orders"]', 'allow = "orders"'))
        words = (str(gateway.config), "allow", "expected a list of strings")
    else:
        gateway.config.write_text(world.good_toml["root"] + "\n[[[\n")
        words = (str(gateway.config), "invalid TOML")
    try:
        _reload_and_expect_failure(gateway, *words)
        assert gateway.alive()
        assert world.served_serial(port) == serial  # still the old certificate, still serving
    finally:
        _restore(world, gateway, "root")
    assert world.served_serial(port) == serial


def test_a_key_unreadable_after_privileges_drop_keeps_the_old_material_on_sighup(world: World) -> None:
    """Started as root with ``--uid``: the 0600 root key loaded at start; a reload as nobody
    cannot read it, says so, and keeps serving with what it has."""
    gateway, port = world.dropped, world.ports["dropped"]
    serial = world.served_serial(port)
    key = world.directory / "dropped" / "users.key"
    assert key.stat().st_uid == 0 and (key.stat().st_mode & 0o077) == 0
    _reload_and_expect_failure(gateway, str(key), "Permission denied")
    assert gateway.alive()
    assert world.served_serial(port) == serial


def test_a_crl_file_holding_two_crls_of_one_ca_fails_start_up(world: World) -> None:
    """Several CRLs are read (the intermediate's and the root's), but two of the same CA would
    leave it open which one counts; so the file is refused, by name."""
    from cryptography.hazmat.primitives import serialization

    ca = world.pki.ca
    first = ca.make_crl().public_bytes(serialization.Encoding.PEM)
    second = ca.make_crl().public_bytes(serialization.Encoding.PEM)
    crl = world.directory / "two.crl"
    crl.write_bytes(first + second)
    crl.chmod(0o644)
    good = world.good_toml["root"].replace(str(world.ports["root"]), str(free_port()))
    config = _broken_copy(world, "two-crls", good.replace('mode = "off"', f'mode = "crl"\ncrl = "{crl}"'))
    _assert_start_fails(_start(config), str(crl), "several CRLs of")
