"""Judging a peer's certificate path beyond OpenSSL: our rules (``rules``), a second, independent
path validation (``strict``, with ``paths`` for what cryptography's verifier cannot judge), the
rules a CRL must follow (``crlrules``), and the bit of DER they need (``der``)."""
