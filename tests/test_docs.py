"""The configuration reference names every key the loader accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from s2sgw.config import ConfigError, parse_config

REFERENCE = Path(__file__).parent.parent / "docs" / "configuration.rst"


def accepted_keys(tmp_path: Path) -> set[str]:
    """Ask the loader itself: an unknown key in each table makes it list the keys it accepts."""
    for name in ("bundle.pem", "a.pem", "a.key", "ca.crl"):
        (tmp_path / name).write_text("")
    route_in = {"listen": "tcp:1:interface=127.0.0.1", "backend": "tcp:127.0.0.1:2", "allow": ["b"]}
    route_out = {"listen": "tcp:3:interface=127.0.0.1", "remote": "tcp:127.0.0.1:4", "peer": "b"}

    def config() -> dict:
        return {
            "trust": "bundle.pem",
            "status": {"mode": "off"},
            "timeouts": {},
            "admin": {"listen": "tcp:5:interface=127.0.0.1"},
            "enrollment": {"url": "https://127.0.0.1:6", "fingerprint": "ab" * 32},
            "service": [{"name": "a", "cert": "a.pem", "key": "a.key", "inbound": [dict(route_in)], "outbound": [dict(route_out)]}],
        }

    tables = {
        "": lambda c: c,
        "status": lambda c: c["status"],
        "timeouts": lambda c: c["timeouts"],
        "admin": lambda c: c["admin"],
        "enrollment": lambda c: c["enrollment"],
        "service": lambda c: c["service"][0],
        "service.inbound": lambda c: c["service"][0]["inbound"][0],
        "service.outbound": lambda c: c["service"][0]["outbound"][0],
    }
    keys: set[str] = set()
    for prefix, table_of in tables.items():
        data = config()
        table_of(data)["zz_not_a_key"] = 1
        with pytest.raises(ConfigError) as raised:
            parse_config(data, tmp_path / "gateway.toml")
        listed = re.search(r"expected one of: ([^)]*)\)", str(raised.value))
        assert listed, str(raised.value)
        for key in listed.group(1).split(", "):
            if key not in tables or prefix:  # sub-tables are documented as their own sections
                keys.add(f"{prefix}.{key}" if prefix else key)
    return keys


def test_every_config_key_is_in_the_configuration_reference(tmp_path: Path) -> None:
    text = REFERENCE.read_text()
    keys = accepted_keys(tmp_path)
    assert {"trust", "status.url", "service.inbound.allow", "service.outbound.peer"} <= keys
    missing = sorted(key for key in keys if f"``{key}``" not in text)
    assert not missing, f"keys missing from {REFERENCE.name}: {missing}"


def test_readme_config_example_loads(tmp_path: Path) -> None:
    """The configuration shown in README.rst is valid as written."""
    import textwrap
    import tomllib

    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    block = readme.split(".. code-block:: toml\n\n", 1)[1].split("\n\n", 1)[0]
    data = tomllib.loads(textwrap.dedent(block))
    for name in ("bundle.pem", "users.pem", "users.key"):
        (tmp_path / name).write_text("")
    config = parse_config(data, tmp_path / "users.toml")
    assert config.services[0].inbound[0].allow == ("orders",)
    assert config.status.url == "http://ca.internal:8080/ocsp"


def test_every_reason_code_is_documented() -> None:
    """Each reason an audit line or a metric label can carry is explained somewhere in docs/."""
    from s2sgw.interfaces import Reason
    from s2sgw.ops.metrics import KNOWN_REASONS

    text = "".join(path.read_text() for path in REFERENCE.parent.glob("*.rst"))
    missing = sorted(reason for reason in KNOWN_REASONS - {Reason.OK} if f"``{reason}``" not in text)
    assert not missing, f"reason codes missing from docs/: {missing}"
