"""The TLS parameters our contexts pin instead of inheriting OpenSSL's defaults.

OpenSSL's defaults change with its version (OpenSSL 4 offers hybrid post-quantum groups first,
and its signature algorithm list is long); a gateway states its own. pyOpenSSL has no API for
key exchange groups or signature algorithms, so they are set through its OpenSSL binding, and a
context that cannot be pinned is not built.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib

GROUPS = b"X25519:P-256:P-384"
# No SHA-1, SHA-224, DSA or Ed448. OpenSSL never signs a TLS 1.3 CertificateVerify with
# rsa_pkcs1_*: those stay for TLS 1.2 and for certificates signed with PKCS#1 v1.5.
SIGNATURE_ALGORITHMS = b":".join(
    [
        b"ecdsa_secp256r1_sha256", b"ecdsa_secp384r1_sha384", b"ecdsa_secp521r1_sha512", b"ed25519",
        b"rsa_pss_rsae_sha256", b"rsa_pss_rsae_sha384", b"rsa_pss_rsae_sha512",
        b"rsa_pss_pss_sha256", b"rsa_pss_pss_sha384", b"rsa_pss_pss_sha512",
        b"rsa_pkcs1_sha256", b"rsa_pkcs1_sha384", b"rsa_pkcs1_sha512",
    ]
)  # fmt: skip


def pin(context: SSL.Context) -> None:
    """Set our groups and signature algorithms on ``context``, and no TLS 1.3 tickets if possible."""
    handle = context._context  # the SSL_CTX*; pyOpenSSL offers no public accessor
    if _ssl_lib.SSL_CTX_set1_curves_list(handle, GROUPS) != 1:
        raise SSL.Error([("s2sgw", "groups", f"cannot restrict key exchange groups to {GROUPS.decode()}")])
    if not getattr(_ssl_lib, "Cryptography_HAS_SIGALGS", False) or (
        _ssl_lib.SSL_CTX_set1_sigalgs_list(handle, SIGNATURE_ALGORITHMS) != 1
    ):
        raise SSL.Error([("s2sgw", "sigalgs", "cannot restrict signature algorithms")])
    # OP_NO_TICKET (set with the other options) stops TLS 1.2 tickets; a TLS 1.3 server still
    # sends two stateful tickets that no cache holds (resumption is off). pyOpenSSL 26.4 has no
    # binding for SSL_CTX_set_num_tickets: use it as soon as one exists.
    set_num_tickets = getattr(context, "set_num_tickets", None)
    if set_num_tickets is not None:
        set_num_tickets(0)
