"""Judging a peer's certificate path beyond OpenSSL: our rules (``rules``), and a second,
independent path validation (``strict``, with ``paths`` for what cryptography's verifier cannot
judge), with the bit of DER they need (``der``)."""
