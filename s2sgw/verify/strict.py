"""The second verifier: a path OpenSSL accepted must pass our rules and an independent validation.

OpenSSL verifies the peer's chain during the handshake. At the leaf, the last step of that
verification, the verify callback in :mod:`s2sgw.tls` hands :meth:`StrictVerifier.check` the path
OpenSSL built (leaf first, trust anchor last), before any certificate of ours is sent to an
unproven server and before anything is authorized. The path must then pass

1. our rules (:mod:`s2sgw.verify.rules`), on every certificate, and
2. cryptography's verifier (``cryptography.x509.verification``) on the leaf and the intermediates
   the peer sent, against the same roots, at the same time (the system clock, as OpenSSL), with
   the same depth limit. Callers are judged by its client verifier; remotes by the same profile
   with the serverAuth purpose in place of clientAuth. Its server verifier is not used: it
   matches a DNS name or an IP address, while a remote is proven by its SPIFFE ID (a URI SAN the
   authorizer compares exactly after the handshake), and the dialled host name is not an identity
   here. A path holding an Ed25519 key or signature, which cryptography's Web PKI profile refuses
   outright, is judged by our own validation (:mod:`s2sgw.verify.paths`) instead.

A refusal is a (Reason code, detail) pair whose detail names the rule. Any exception is a refusal.
The trust store (``Store``) and the extension policies are built once per set of roots; the
verifier itself once per second of the clock, since certificate times have one-second precision.

Peers reconnect with the same certificate all day, and re-proving an unchanged path costs two
or three signature checks each time. So an accepted path is remembered, by the SHA-256 of every
certificate's DER in order, for as long as the time stays inside every certificate's validity:
the only input of either verifier that changes. A verifier belongs to one set of trust material
(a reload builds new contexts and new verifiers), refusals are never remembered, and at most
``REMEMBERED`` paths are kept, the oldest forgotten first.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)

from s2sgw.interfaces import Reason
from s2sgw.verify import paths, rules

SECOND_VERIFIER = "second-verifier"
REMEMBERED = 4096  # accepted paths kept per verifier
_MAX_WORDS = 300
_UTC = datetime.UTC


class WrongPurpose(ValueError):
    """An extendedKeyUsage without the purpose of this connection (raised inside cryptography)."""


def _server_auth_leaf(policy: object, certificate: x509.Certificate, extension: x509.ExtendedKeyUsage | None) -> None:
    """The Web PKI rule for a leaf's EKU, for serverAuth: if present, it must name serverAuth."""
    if extension is not None and ExtendedKeyUsageOID.SERVER_AUTH not in extension:
        raise WrongPurpose("leaf extendedKeyUsage lacks serverAuth")


def _server_auth_ca(policy: object, certificate: x509.Certificate, extension: x509.ExtendedKeyUsage | None) -> None:
    """The Web PKI rule for a CA's EKU, for serverAuth: if present, serverAuth or anyExtendedKeyUsage."""
    if extension is not None and not (
        ExtendedKeyUsageOID.SERVER_AUTH in extension or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in extension
    ):
        raise WrongPurpose("CA extendedKeyUsage excludes serverAuth")


def _server_purpose_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """(CA, EE) policies: the Web PKI defaults with serverAuth as the purpose."""
    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, _server_auth_ca
    )
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, _server_auth_leaf
    )
    return ca, ee


_SERVER_PURPOSE = _server_purpose_policies()


_CERTIFICATE_REPR = re.compile(r"<Certificate\(subject=<Name\((.*?)\)>, \.\.\.\)>")


def _words(error: BaseException) -> str:
    """cryptography's message, with certificates named by subject rather than by repr."""
    text = _CERTIFICATE_REPR.sub(r"\1", str(error)) or type(error).__name__
    return text if len(text) <= _MAX_WORDS else text[: _MAX_WORDS - 3] + "..."


@attrs.define(eq=False)
class StrictVerifier:
    """Our rules and the second verifier for peers whose leaf must carry ``usage``, against ``roots``.

    ``usage`` is clientAuth for callers (server contexts) and serverAuth for remotes (client
    contexts). ``clock`` gives POSIX seconds; it is the system clock because OpenSSL judges
    validity by the system clock too, and both verifiers must judge the same instant.
    """

    roots: tuple[x509.Certificate, ...] = attrs.field(converter=tuple)
    usage: x509.ObjectIdentifier
    max_depth: int
    clock: Callable[[], float] = time.time
    _store: Store = attrs.field(init=False)
    _verifier: ClientVerifier | None = attrs.field(init=False, default=None)
    _second: int | None = attrs.field(init=False, default=None)
    _accepted: dict[bytes, tuple[int, int]] = attrs.field(init=False, factory=dict)  # path -> validity

    def __attrs_post_init__(self) -> None:
        if not self.roots:
            raise ValueError("a strict verifier needs at least one root")
        self._store = Store(list(self.roots))

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(int(self.clock()), _UTC)

    def _cryptography_verifier(self, now: datetime.datetime) -> ClientVerifier:
        second = int(now.timestamp())
        if self._verifier is None or self._second != second:
            builder = PolicyBuilder().store(self._store).time(now).max_chain_depth(self.max_depth)
            if self.usage == ExtendedKeyUsageOID.SERVER_AUTH:
                ca, ee = _SERVER_PURPOSE
                builder = builder.extension_policies(ca_policy=ca, ee_policy=ee)
            elif self.usage != ExtendedKeyUsageOID.CLIENT_AUTH:
                raise ValueError(f"no verifier profile for extendedKeyUsage {self.usage.dotted_string}")
            self._verifier, self._second = builder.build_client_verifier(), second
        return self._verifier

    def second_opinion(self, path: Sequence[x509.Certificate]) -> str | None:
        """Why the independent validation refuses ``path`` (leaf first, root last), or None."""
        try:
            now = self._now()
            if not path:
                return "empty path"
            if paths.needs_own_validation(path):
                return paths.validate(path, self.roots, self.usage, now, self.max_depth)
            intermediates = [c for c in path[1:] if c not in self.roots]
            self._cryptography_verifier(now).verify(path[0], intermediates)
            return None
        except Exception as error:  # VerificationError, a refusing policy callback, anything
            return _words(error)

    def problems(self, path: Sequence[x509.Certificate]) -> list[tuple[str, str]]:
        """Every rule ``path`` breaks and the second verifier's refusal, as (Reason code, detail)."""
        found = [(problem.reason, problem.detail) for problem in rules.problems(path)]
        refusal = self.second_opinion(path)
        if refusal is not None:
            found.append((Reason.UNTRUSTED_CHAIN, f"{SECOND_VERIFIER}: {refusal}"))
        return found

    def check(self, path: Sequence[x509.Certificate]) -> tuple[str, str] | None:
        """None if ``path`` passes; else the first (Reason code, detail). Never raises."""
        try:
            key = _path_key(path)
            now = int(self.clock())
            window = self._accepted.get(key)
            if window is not None and window[0] <= now <= window[1]:
                return None
            problem = rules.first_problem(path)
            if problem is not None:
                return problem.reason, problem.detail
            refusal = self.second_opinion(path)
            if refusal is not None:
                return Reason.UNTRUSTED_CHAIN, f"{SECOND_VERIFIER}: {refusal}"
            self._remember(key, path)
            return None
        except Exception as error:
            return Reason.UNTRUSTED_CHAIN, f"{SECOND_VERIFIER}: failed: {_words(error)}"

    def _remember(self, key: bytes, path: Sequence[x509.Certificate]) -> None:
        self._accepted.pop(key, None)
        while len(self._accepted) >= REMEMBERED:
            del self._accepted[next(iter(self._accepted))]
        start = max(int(c.not_valid_before_utc.timestamp()) for c in path)
        end = min(int(c.not_valid_after_utc.timestamp()) for c in path)
        self._accepted[key] = (start, end)


def _path_key(path: Sequence[x509.Certificate]) -> bytes:
    """SHA-256 over every certificate's DER, in order, each prefixed by its length."""
    digest = hashlib.sha256()
    for certificate in path:
        der = certificate.public_bytes(serialization.Encoding.DER)
        digest.update(len(der).to_bytes(4, "big"))
        digest.update(der)
    return digest.digest()
