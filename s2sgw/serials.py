"""How a certificate serial number is written in logs, audit lines and JSON: the one form."""

from __future__ import annotations


def serial_text(serial: int) -> str:
    """``serial`` as ``openssl x509 -serial`` prints it (uppercase hex digit pairs, no colons),
    so one serial can be grepped across our logs and OpenSSL's output."""
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text
