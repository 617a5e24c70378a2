"""The [enrollment] table and per-service ``renew``: parsed into the contract, errors name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from s2sgw.config import DEFAULT_RENEW_AT, ConfigError, EnrollmentConfig, load_config

FINGERPRINT = "AB:" * 31 + "CD"
BASE = """
trust = "bundle.pem"
[status]
mode = "off"
{enrollment}
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
{renew}
"""
ENROLLMENT = f'[enrollment]\nurl = "https://ca.internal:8443"\nfingerprint = "{FINGERPRINT}"\n'


def load(tmp_path: Path, enrollment: str = ENROLLMENT, renew: str = ""):
    for name in ("bundle.pem", "orders.pem", "orders.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.format(enrollment=enrollment, renew=renew))
    return load_config(path)


def error(tmp_path: Path, enrollment: str = ENROLLMENT, renew: str = "") -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, enrollment, renew)
    message = str(raised.value)
    prefix = f"{tmp_path / 'gateway.toml'}: "
    assert message.startswith(prefix) and "\n" not in message, message
    return message[len(prefix) :]


def test_enrollment_loads_and_renewal_is_on_by_default(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.enrollment == EnrollmentConfig(
        urls=("https://ca.internal:8443",), fingerprint="ab" * 31 + "cd", renew_at=DEFAULT_RENEW_AT
    )
    assert config.services[0].renew is True


def test_a_list_of_urls_keeps_its_order(tmp_path: Path) -> None:
    enrollment = ENROLLMENT.replace(
        'url = "https://ca.internal:8443"', 'url = ["https://ca-b.internal:8443", "https://10.0.0.7:8443"]'
    ) + "renew_at = 0.5\n"
    config = load(tmp_path, enrollment)
    assert config.enrollment is not None
    assert config.enrollment.urls == ("https://ca-b.internal:8443", "https://10.0.0.7:8443")
    assert config.enrollment.renew_at == 0.5


def test_without_enrollment_nothing_renews(tmp_path: Path) -> None:
    config = load(tmp_path, enrollment="")
    assert config.enrollment is None and config.services[0].renew is False


def test_a_service_may_opt_out(tmp_path: Path) -> None:
    assert load(tmp_path, renew="renew = false").services[0].renew is False


@pytest.mark.parametrize(
    ("enrollment", "renew", "expected"),
    [
        (ENROLLMENT.replace('url = "https://ca.internal:8443"\n', ""), "", "enrollment.url: missing required key"),
        (ENROLLMENT.replace('"https://ca.internal:8443"', "[]"), "", "enrollment.url: must list at least one URL"),
        (ENROLLMENT.replace('"https://ca.internal:8443"', "8443"), "", "enrollment.url: expected a URL or a list of URLs"),
        (ENROLLMENT.replace('"https://ca.internal:8443"', '["https://a:1", "ftp://b"]'), "",
         "enrollment.url[1]: expected an http:// or https:// URL"),
        (ENROLLMENT.replace('"https://ca.internal:8443"', '["https://a:1", 7]'), "", "enrollment.url[1]: expected a string"),
        (ENROLLMENT.replace("https://ca.internal:8443", "http://ca.internal:8080"), "",
         "enrollment.url: EST needs https://"),
        (ENROLLMENT.replace('"https://ca.internal:8443"', '["https://a:1", "http://b:2"]'), "",
         "enrollment.url[1]: EST needs https://"),
        (ENROLLMENT.replace(f'fingerprint = "{FINGERPRINT}"\n', ""), "", "enrollment.fingerprint: missing required key"),
        (ENROLLMENT.replace(FINGERPRINT, "AB:CD"), "", "enrollment.fingerprint: a SHA-256 fingerprint is 64 hex digits"),
        (ENROLLMENT + "renew_at = 1.5\n", "", "enrollment.renew_at: must be between 0 and 1"),
        (ENROLLMENT + 'renew_at = "2/3"\n', "", "enrollment.renew_at: expected a number between 0 and 1"),
        (ENROLLMENT + "renew_every = 3\n", "", "enrollment.renew_every: unknown key"),
        ("", "renew = true", "service[0].renew: renewal needs an [enrollment] table"),
        (ENROLLMENT, 'renew = "yes"', "service[0].renew: expected true or false"),
    ],
)
def test_invalid_enrollment_names_file_and_key(tmp_path: Path, enrollment: str, renew: str, expected: str) -> None:
    message = error(tmp_path, enrollment, renew)
    assert message.startswith(expected), message


def test_fingerprint_forms_are_accepted(tmp_path: Path) -> None:
    for form in ("ab" * 32, "AB" * 32, "sha256:" + "ab" * 32, ":".join(["AB"] * 32)):
        config = load(tmp_path, ENROLLMENT.replace(FINGERPRINT, form))
        assert config.enrollment is not None and config.enrollment.fingerprint == "ab" * 32


def test_the_url_list_parser_is_shared(tmp_path: Path) -> None:
    """One parser for "a URL or a list of URLs", usable by any key."""
    from s2sgw.config import _Parser

    parser = _Parser(tmp_path / "gateway.toml")
    assert parser.url_list("http://a:1/ocsp", "status.url") == ("http://a:1/ocsp",)
    assert parser.url_list(["http://a:1", "https://b"], "status.url") == ("http://a:1", "https://b")
    with pytest.raises(ConfigError, match=r"status\.url\[0\]: expected an http"):
        parser.url_list(["gopher://x"], "status.url")
