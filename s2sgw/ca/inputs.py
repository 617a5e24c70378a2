"""What the CA accepts from its operators: service and DNS names, trust domains, URLs, key types,
revocation reasons, lifetimes and serials, each refused with a CAError that says why."""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse

from cryptography import x509

from s2sgw.ca.store import CAError
from s2sgw.names import SERVICE_NAME, service_name_problem

_SERVICE_NAME = SERVICE_NAME  # the gateway's configuration checks service.name with the same rule



_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")



def validate_service_name(name: str) -> str:
    """A service name becomes a DNS label and a SPIFFE path segment: the rule of :mod:`s2sgw.names`,
    which a gateway's ``service.name`` follows too."""
    problem = service_name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 63 else name[:20] + "..."
        raise CAError(f"invalid service name {shown!r}: {problem}")
    return name



def _dns_ok(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_DNS_LABEL.match(label) for label in name.split("."))



def validate_trust_domain(domain: str) -> str:
    if not _dns_ok(domain):
        raise CAError(f"invalid trust domain {domain!r}: use a lowercase DNS name such as example.internal")
    return domain



def validate_dns_name(name: str) -> str:
    """Return the lowercase form of a DNS name, or raise CAError."""
    lowered = name.lower()
    if not _dns_ok(lowered):
        raise CAError(f"invalid DNS name {name!r}")
    return lowered



def validate_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CAError(f"invalid IP address {text!r}") from None



def validate_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise CAError(f"invalid CA URL {url!r}: bad port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise CAError(f"invalid CA URL {url!r}: use http://HOST:PORT")
    return url.rstrip("/")



def validate_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    return key_type



def validate_reason(reason: str) -> x509.ReasonFlags:
    if reason not in REVOCATION_REASONS:
        raise CAError(f"unknown revocation reason {reason!r}: use one of {', '.join(REVOCATION_REASONS)}")
    return x509.ReasonFlags(reason)



def validate_hours(hours: float, what: str) -> float:
    if not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise CAError(f"{what} must be a positive number of hours, not {hours!r}")
    return float(hours)



def parse_serial(text: str) -> int:
    """Read a serial written as hex, with or without ``0x`` and ``:`` separators."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned[2:] if cleaned.startswith("0x") else cleaned
    try:
        serial = int(cleaned, 16)
    except ValueError:
        raise CAError(f"invalid serial {text!r}: expected hexadecimal") from None
    if serial <= 0:
        raise CAError(f"invalid serial {text!r}: serials are positive")
    return serial


KEY_TYPES = ("ecdsa-p256", "rsa3072", "ed25519")


# Final revocations only: a hold can be lifted, which this CA does not model.
REVOCATION_REASONS = tuple(
    flag.value
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.certificate_hold)
)
