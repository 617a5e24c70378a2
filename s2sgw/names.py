"""What a service may be called: one rule for the gateway's configuration and the CA's commands.

A service name becomes a DNS label (``NAME.TRUST-DOMAIN``) and the path of a SPIFFE ID, so both
rules apply: lowercase letters, digits and ``-``, starting with a letter or digit, at most 63
characters. The CA and the gateway both import this module; neither imports the other.
"""

from __future__ import annotations

import re

SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
MAX_SERVICE_NAME = 63


def service_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a service name, in words; None if it can."""
    if len(name) > MAX_SERVICE_NAME:
        return f"is {len(name)} characters long; a service name has at most {MAX_SERVICE_NAME} (it is a DNS label)"
    if not SERVICE_NAME.match(name):
        return "use a-z, 0-9 and '-', starting with a letter or digit"
    return None
