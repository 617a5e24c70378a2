"""What a TLS handshake left behind: the verified chain, the version and cipher, or why it failed.

One home for these facts, read by both route directions and the relay after (or instead of) a
completed handshake; the verify callback in :mod:`s2sgw.tls` records its verdict on the protocol.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from s2sgw.interfaces import Reason
from s2sgw.tls import CHAIN_ERROR, CHAIN_ERROR_DETAIL, reason_for_verify_error

# -- after the handshake -------------------------------------------------------------------------


def chain_error(tls_protocol: Any) -> tuple[str, str] | None:
    """The verification failure our verify callback recorded on ``tls_protocol``, as (reason, detail)."""
    code = getattr(tls_protocol, CHAIN_ERROR, None)
    if not code:
        return None
    return code, str(getattr(tls_protocol, CHAIN_ERROR_DETAIL, "") or code)


def ssl_error_text(error: BaseException) -> str:
    """OpenSSL's reasons in an ``SSL.Error`` as words, never empty (so an audit line says why)."""
    reasons: list[str] = []
    for arg in getattr(error, "args", ()):
        if isinstance(arg, list):
            for entry in arg:
                if isinstance(entry, tuple) and entry:
                    reasons.append(str(entry[-1]))
                elif entry:
                    reasons.append(str(entry))
        elif arg not in (None, "", -1):
            reasons.append(str(arg))
    text = "; ".join(reason for reason in reasons if reason)
    return text or f"{type(error).__name__} without details from OpenSSL"


def failure_words(reason: Failure | None) -> str:
    """Words for how a TLS connection failed, never empty."""
    if reason is None:
        return "the connection failed without a reason"
    if reason.check(SSL.Error):
        return ssl_error_text(reason.value)
    return str(reason.value) or reason.type.__name__


def handshake_failure(tls_protocol: Any, reason: Failure | None) -> tuple[str, str]:
    """Classify a connection that ended before its handshake completed as (Reason code, detail).

    Our own verify callback's verdict wins; otherwise OpenSSL's error text tells a missing
    client certificate or an untrusted chain from other TLS errors (versions, ciphers, garbage).
    """
    recorded = chain_error(tls_protocol)
    if recorded is not None:
        return recorded
    if reason is None or reason.check(ConnectionDone, ConnectionLost):
        return Reason.CLOSED_BEFORE_HANDSHAKE, "closed by the other side before the TLS handshake completed"
    text = failure_words(reason)
    lowered = str(reason.value).lower() + " " + text.lower()
    if "peer did not return a certificate" in lowered or "alert certificate required" in lowered:
        return Reason.NO_CLIENT_CERT, "the client sent no certificate"
    if "certificate verify failed" in lowered:
        return Reason.UNTRUSTED_CHAIN, text
    return Reason.TLS_ERROR, text


class NoVerifiedChain(ValueError):
    """A completed handshake left no verified chain: nothing may be judged or admitted."""


def peer_chain(tls_protocol: Any) -> list[x509.Certificate]:
    """The peer's chain as OpenSSL verified it (and our verify callback accepted), leaf first.

    It is the one chain the gateway judges a peer by. The chain the peer sent is never a
    substitute: without a verified chain this raises :class:`NoVerifiedChain`.
    """
    connection: SSL.Connection = tls_protocol.getHandle()
    # OpenSSL keeps whatever chain it built even when verification failed (possible only for
    # a context that does not verify): the chain counts only with a successful result.
    result = _ssl_lib.SSL_get_verify_result(connection._ssl)  # no public accessor in pyOpenSSL
    if result != 0:
        raise NoVerifiedChain(f"the peer's chain did not verify: {reason_for_verify_error(result)[1]}")
    chain = connection.get_verified_chain(as_cryptography=True)
    if not chain:
        raise NoVerifiedChain("the handshake left no verified certificate chain")
    return list(chain)


def negotiated(tls_protocol: Any) -> tuple[str, str]:
    """(protocol version, cipher) of an established TLS connection, for the audit log."""
    connection: SSL.Connection = tls_protocol.getHandle()
    return (connection.get_protocol_version_name() or "-", connection.get_cipher_name() or "-")
