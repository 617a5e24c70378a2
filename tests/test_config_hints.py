"""Configuration mistakes an operator makes in the first week get an error that says what to write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s2sgw.config import ConfigError, load_config

HEAD = """
trust = "bundle.pem"
[status]
mode = "off"
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
"""


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    for name in ("bundle.pem", "orders.pem", "orders.key"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def error_for(directory: Path, text: str) -> str:
    path = directory / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_a_backend_without_a_host_says_the_host_is_missing(directory: Path) -> None:
    message = error_for(
        directory,
        HEAD + '[[service.inbound]]\nlisten = "tcp:8443"\nbackend = "tcp:28102"\nallow = ["users"]\n',
    )
    assert "service[0].inbound[0].backend" in message
    assert "the host is missing" in message and "tcp:127.0.0.1:28102" in message
    assert "escape" not in message


def test_a_toml_syntax_error_names_the_full_path_and_the_line(directory: Path) -> None:
    (directory / "gateway.toml").write_text(HEAD + "[[service.inbound]\n")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with pytest.raises(ConfigError) as info:
            load_config("gateway.toml")
    finally:
        os.chdir(cwd)
    message = str(info.value)
    assert message.startswith(f"{directory / 'gateway.toml'}: invalid TOML"), message
    assert "line 9" in message


def test_an_inbound_route_written_as_a_single_table_names_the_double_brackets(directory: Path) -> None:
    message = error_for(
        directory,
        HEAD + '[service.inbound]\nlisten = "tcp:8443"\nbackend = "tcp:127.0.0.1:8080"\n',
    )
    assert "[service.inbound]" in message and "write [[service.inbound]]" in message


@pytest.mark.parametrize("listen", ["tcp:9001", "tcp:9001:interface=0.0.0.0", "tcp:9001:interface=192.0.2.7"])
def test_an_outbound_listener_off_loopback_is_refused_without_allow_remote(directory: Path, listen: str) -> None:
    route = f'[[service.outbound]]\nlisten = "{listen}"\nremote = "tcp:users.example:8443"\npeer = "users"\n'
    message = error_for(directory, HEAD + route)
    assert "service[0].outbound[0].listen" in message and "allow_remote = true" in message
    path = directory / "gateway.toml"
    path.write_text(HEAD + route + "allow_remote = true\n")
    assert load_config(path).services[0].outbound[0].allow_remote is True


@pytest.mark.parametrize("listen", ["tcp:9001:interface=127.0.0.1", "tcp:9001:interface=\\\\:\\\\:1", "unix:/run/o.sock"])
def test_an_outbound_listener_on_loopback_or_unix_needs_nothing(directory: Path, listen: str) -> None:
    route = f'[[service.outbound]]\nlisten = "{listen}"\nremote = "tcp:users.example:8443"\npeer = "users"\n'
    path = directory / "gateway.toml"
    path.write_text(HEAD + route)
    assert load_config(path).services[0].outbound[0].allow_remote is False


CHECKED = 'trust = "bundle.pem"\n[status]\nmode = "off"\n[[service]]\nname = "orders"\ncert = "certs.pem"\nkey = "certs.key"\n'


def test_a_service_whose_certificate_names_another_identity_is_warned_about(tmp_path: Path, capsys) -> None:
    """check-config and the gateway's start say so: peers expecting orders would refuse users."""
    from twisted.logger import globalLogPublisher

    from s2sgw.cli import main
    from s2sgw.truststore import TrustStore
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("users").write(tmp_path, "certs")
    path = tmp_path / "gateway.toml"
    path.write_text(CHECKED)
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: service orders: its certificate names spiffe://example.org/users" in err
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        TrustStore.load(load_config(path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [e.get("warning", "") for e in events if e.get("log_namespace", "").startswith("s2sgw.truststore")]
    assert any("its certificate names spiffe://example.org/users" in text for text in warned), events


def test_a_service_with_its_own_certificate_gets_no_identity_warning(tmp_path: Path, capsys) -> None:
    from s2sgw.cli import main
    from tests.pkifactory import TestCA

    ca = TestCA.create()
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue("orders").write(tmp_path, "certs")
    path = tmp_path / "gateway.toml"
    path.write_text(CHECKED)
    assert main(["check-config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "words"),
    [("Orders", "use a-z, 0-9 and '-'"), ("orders.v2", "use a-z, 0-9 and '-'"), ("a" * 64, "64 characters long")],
)
def test_service_names_follow_the_rule_the_ca_issues_by(directory: Path, name: str, words: str) -> None:
    from s2sgw.ca.inputs import validate_service_name
    from s2sgw.ca.store import CAError

    message = error_for(directory, HEAD.replace('name = "orders"', f'name = "{name}"'))
    assert "service[0].name" in message and words in message
    with pytest.raises(CAError):
        validate_service_name(name)


def test_a_name_the_ca_issues_is_a_valid_service_name(directory: Path) -> None:
    from s2sgw.ca.inputs import validate_service_name

    name = "billing-2" + "x" * 54  # 63 characters
    assert validate_service_name(name) == name
    path = directory / "gateway.toml"
    path.write_text(HEAD.replace('name = "orders"', f'name = "{name}"'))
    assert load_config(path).services[0].name == name


def test_a_listen_address_written_host_first_says_how_to_write_it(directory: Path) -> None:
    message = error_for(
        directory,
        HEAD + '[[service.inbound]]\nlisten = "tcp:127.0.0.1:8443"\nbackend = "tcp:127.0.0.1:8080"\n',
    )
    assert "service[0].inbound[0].listen" in message and "write tcp:8443:interface=127.0.0.1" in message
