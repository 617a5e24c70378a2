"""Loading gateway configuration: every error names the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from s2sgw.cli import main
from s2sgw.config import (
    AdminConfig,
    ConfigError,
    GatewayConfig,
    InboundRoute,
    OutboundRoute,
    ResponderConfig,
    StatusConfig,
    TimeoutsConfig,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "gateway.example.toml"

FULL = """
trust = "bundle.pem"
reload_interval = 600
[status]
mode = "ocsp"
url = "http://127.0.0.1:8080/ocsp"
fail = "open"
timeout = 1.5
max_cache_age = 60
cache_size = 100
[timeouts]
handshake = 5
connect = 2
idle = 30
drain = 1
[admin]
listen = "tcp:9900:interface=127.0.0.1"
[[service]]
name = "orders"
cert = "certs/orders.pem"
key = "certs/orders.key"
  [[service.inbound]]
  name = "orders-in"
  listen = "tcp:8443:interface=0.0.0.0"
  backend = "tcp:127.0.0.1:8080"
  allow = ["users", "spiffe://example.org/billing"]
  max_connections = 10
  [[service.inbound]]
  listen = "tcp:8444"
  backend = "unix:/run/orders.sock"
  [[service.outbound]]
  name = "orders-to-users"
  listen = "tcp:9001:interface=127.0.0.1"
  remote = "tcp:users.example:8443"
  peer = "users"
[[service]]
name = "users"
cert = "certs/users.pem"
key = "certs/users.key"
  [[service.outbound]]
  listen = "unix:/run/s2sgw/users-to-orders.sock"
  remote = "tcp:orders.example:8443"
  peer = "spiffe://example.org/orders"
"""


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """A directory with the files FULL refers to (contents do not matter to the config loader)."""
    (tmp_path / "certs").mkdir()
    for name in ("bundle.pem", "certs/orders.pem", "certs/orders.key", "certs/users.pem", "certs/users.key"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(text)
    return path


def error_for(directory: Path, text: str) -> str:
    path = write(directory, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message[len(f"{path}: ") :]


def test_full_config_loads_into_the_contract_classes(directory: Path) -> None:
    config = load_config(write(directory, FULL))
    assert isinstance(config, GatewayConfig)
    assert config.path == directory / "gateway.toml"
    assert config.trust == directory / "bundle.pem"
    assert config.reload_interval == 600.0
    assert config.status == StatusConfig(
        mode="ocsp", fail="open", crl=None, timeout=1.5, max_cache_age=60.0, cache_size=100,
        responders=(ResponderConfig(urls=("http://127.0.0.1:8080/ocsp",)),),
    )
    assert config.timeouts == TimeoutsConfig(handshake=5.0, connect=2.0, idle=30.0, drain=1.0)
    assert config.admin == AdminConfig(listen="tcp:9900:interface=127.0.0.1")
    orders, users = config.services
    assert orders.cert == directory / "certs" / "orders.pem"
    assert orders.inbound == (
        InboundRoute(
            name="orders-in", service="orders", listen="tcp:8443:interface=0.0.0.0",
            backend="tcp:127.0.0.1:8080", allow=("users", "spiffe://example.org/billing"), max_connections=10,
        ),
        InboundRoute(
            name="orders-in-1", service="orders", listen="tcp:8444",
            backend="unix:/run/orders.sock", allow=(), max_connections=1024,
        ),
    )
    assert orders.outbound[0] == OutboundRoute(
        name="orders-to-users", service="orders", listen="tcp:9001:interface=127.0.0.1",
        remote="tcp:users.example:8443", peer="users",
    )
    assert users.outbound[0].name == "users-to-orders"


def test_minimal_config_uses_defaults(directory: Path) -> None:
    config = load_config(
        write(
            directory,
            'trust = "bundle.pem"\n[status]\nmode = "off"\n'
            '[[service]]\nname = "a"\ncert = "certs/orders.pem"\nkey = "certs/orders.key"\n',
        )
    )
    assert config.status.mode == "off"
    assert config.timeouts == TimeoutsConfig()
    assert config.admin is None and config.reload_interval is None
    assert config.services[0].inbound == () == config.services[0].outbound


def test_absolute_and_home_relative_paths_are_kept(directory: Path) -> None:
    text = FULL.replace('trust = "bundle.pem"', f'trust = "{directory / "bundle.pem"}"')
    assert load_config(write(directory, text)).trust == directory / "bundle.pem"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('allow = ["users", "spiffe://example.org/billing"]', 'allow = "users"',
         "service[0].inbound[0].allow: expected a list of strings"),
        ('allow = ["users", "spiffe://example.org/billing"]', "allow = [1]",
         "service[0].inbound[0].allow: expected a list of strings"),
        ('allow = ["users", "spiffe://example.org/billing"]', 'allow = ["spiffe://"]',
         "service[0].inbound[0].allow[0]: malformed SPIFFE ID"),
        ("max_connections = 10", "max_connections = 0", "service[0].inbound[0].max_connections: must be at least 1"),
        ("max_connections = 10", "max_connections = true", "service[0].inbound[0].max_connections: expected an integer"),
        ("max_connections = 10", "max_conections = 10", "service[0].inbound[0].max_conections: unknown key"),
        ('trust = "bundle.pem"', "trust = 3", "trust: expected a string"),
        ('trust = "bundle.pem"', 'trust = "missing.pem"', "trust: no such file"),
        ('trust = "bundle.pem"', "", "trust: missing required key"),
        ("reload_interval = 600", "reload_interval = -1", "reload_interval: must be a positive number"),
        ("reload_interval = 600", 'reload_interval = "10m"', "reload_interval: expected a number of seconds"),
        ('mode = "ocsp"', 'mode = "stapled"', "status.mode: expected one of 'ocsp', 'crl', 'off'"),
        ('url = "http://127.0.0.1:8080/ocsp"', "", 'status.url: required when status.mode = "ocsp"'),
        ('mode = "ocsp"', 'mode = "crl"', 'status.crl: required when status.mode = "crl"'),
        ('url = "http://127.0.0.1:8080/ocsp"', 'url = "ftp://x"', "status.url: expected an http:// or https:// URL"),
        ('fail = "open"', 'fail = "maybe"', "status.fail: expected one of 'closed', 'open'"),
        ("handshake = 5", "handshake = 0", "timeouts.handshake: must be a positive number"),
        ("drain = 1", "drains = 1", "timeouts.drains: unknown key"),
        ('listen = "tcp:9900:interface=127.0.0.1"', "listen = 9900", "admin.listen: expected a string"),
        ('cert = "certs/orders.pem"', "", "service[0].cert: missing required key"),
        ('key = "certs/users.key"', 'key = "certs/nope.key"', "service[1].key: no such file"),
        ('name = "users"\n', 'name = "orders"\n', "service[1].name: duplicate service name 'orders'"),
        ('name = "orders"\n', 'name = "or ders"\n', "service[0].name: expected a name"),
        ('backend = "tcp:127.0.0.1:8080"', 'backend = "tcp:127.0.0.1"',
         "service[0].inbound[0].backend: bad endpoint"),
        ('backend = "tcp:127.0.0.1:8080"', 'backend = "carrier-pigeon:coop"',
         "service[0].inbound[0].backend: bad endpoint"),
        ('listen = "tcp:8443:interface=0.0.0.0"', 'listen = "tcp:http"', "service[0].inbound[0].listen: bad endpoint"),
        ('listen = "tcp:8443:interface=0.0.0.0"', 'listen = "tcp:8443:colour=blue"',
         "service[0].inbound[0].listen: bad endpoint 'tcp:8443:colour=blue': unknown option"),
        ('listen = "tcp:8443:interface=0.0.0.0"', 'listen = "tcp:99999"', "port out of range"),
        ('listen = "tcp:8443:interface=0.0.0.0"', 'listen = "ssl:8443"', "ssl: endpoints are not supported"),
        ('listen = "tcp:8444"', 'listen = "tcp:8443:interface=127.0.0.1"',
         "service[0].inbound[1].listen: endpoint 'tcp:8443:interface=127.0.0.1' is also used by "
         "service[0].inbound[0].listen"),
        ('listen = "unix:/run/s2sgw/users-to-orders.sock"', 'listen = "tcp:9900:interface=127.0.0.1"',
         "service[1].outbound[0].listen: endpoint 'tcp:9900:interface=127.0.0.1' is also used by admin.listen"),
        ('name = "orders-to-users"', 'name = "orders-in"', "service[0].outbound[0].name: duplicate route name"),
        ('peer = "users"', "", "service[0].outbound[0].peer: missing required key"),
        ('peer = "users"', 'peer = "https://users"', "service[0].outbound[0].peer: expected a service name"),
        ('key = "certs/users.key"', 'key = "certs/users.key"\ninbound = "x"',
         "service[1].inbound: expected an array of tables"),
        ("[admin]", "[admn]", "admn: unknown key"),
    ],
)
def test_invalid_config_names_file_and_key(directory: Path, old: str, new: str, expected: str) -> None:
    assert old in FULL
    message = error_for(directory, FULL.replace(old, new, 1))
    assert expected in message, message


def test_two_outbound_routes_to_one_peer_need_names(directory: Path) -> None:
    extra = (
        '  [[service.outbound]]\n  listen = "tcp:9002:interface=127.0.0.1"\n'
        '  remote = "tcp:users2.example:8443"\n  peer = "users"\n'
    )
    text = FULL.replace("[[service]]\nname = \"users\"", extra + "[[service]]\nname = \"users\"")
    text = text.replace('name = "orders-to-users"\n', "")
    message = error_for(directory, text)
    assert message.startswith("service[0].outbound[1].name: duplicate route name 'orders-to-users'")


def test_port_zero_may_repeat(directory: Path) -> None:
    text = FULL.replace('listen = "tcp:8443:interface=0.0.0.0"', 'listen = "tcp:0"').replace(
        'listen = "tcp:8444"', 'listen = "tcp:0"'
    )
    assert load_config(write(directory, text)).services[0].inbound[1].listen == "tcp:0"


def test_invalid_toml_and_missing_file_are_config_errors(directory: Path) -> None:
    assert error_for(directory, "trust = ").startswith("invalid TOML")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(directory / "nope.toml")


def test_a_service_is_required(directory: Path) -> None:
    assert "service: missing required key" in error_for(directory, 'trust = "bundle.pem"\n[status]\nmode="off"\n')


def test_example_config_is_valid(tmp_path: Path) -> None:
    """The shipped example parses once the files it names exist."""
    text = EXAMPLE.read_text()
    for name in ("bundle.pem", "orders.pem", "orders.key", "users.pem", "users.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    config = load_config(path)
    assert [s.name for s in config.services] == ["orders", "users"]


# -- s2sgw check-config ---------------------------------------------------------------------------


def test_check_config_reports_one_line_error_and_exit_1(directory: Path, capsys) -> None:
    path = write(directory, FULL.replace('allow = ["users", "spiffe://example.org/billing"]', "allow = 1"))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}: service[0].inbound[0].allow: expected a list of strings" in err


def test_check_config_loads_material_and_prints_summary(tmp_path: Path, capsys) -> None:
    """A valid file with valid certificates prints services, routes and certificate facts."""
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "orders")
    path = write(
        tmp_path,
        'trust = "bundle.pem"\n[status]\nmode = "off"\n[[service]]\nname = "orders"\n'
        'cert = "orders.pem"\nkey = "orders.key"\n[[service.inbound]]\nlisten = "tcp:8443"\n'
        'backend = "tcp:127.0.0.1:8080"\nallow = ["users"]\n',
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "spiffe://example.org/orders" in out
    assert "orders-in-0" in out and "tcp:8443" in out and "users" in out


def test_check_config_refuses_a_key_that_does_not_match(tmp_path: Path, capsys) -> None:
    from tests.pkifactory import TestCA, key_pem, new_key

    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "orders")
    (tmp_path / "orders.key").write_bytes(key_pem(new_key()))
    path = write(
        tmp_path,
        'trust = "bundle.pem"\n[status]\nmode = "off"\n[[service]]\nname = "orders"\n'
        'cert = "orders.pem"\nkey = "orders.key"\n',
    )
    assert main(["check-config", str(path)]) == 1
    assert "orders.key: key does not match the certificate" in capsys.readouterr().err


def test_check_config_command_line(directory: Path) -> None:
    """The installed entry point exits 1 with the message on stderr."""
    path = write(directory, "trust = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "s2sgw.cli", "check-config", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"s2sgw: error: {path}: trust: expected a string"
