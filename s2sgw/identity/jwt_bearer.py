"""JWT identity: the calling gateway signs each request, the called gateway checks it.

The outbound gateway signs a fresh, short-lived token per request with its service key
(``iss`` = ``sub`` = its SPIFFE ID, ``aud`` = the peer's SPIFFE ID, ``iat``/``exp`` 30 s apart,
random ``jti``) and sends it as ``Authorization: Bearer``, replacing whatever the local client
sent. The inbound gateway verifies it against the public key of the certificate the caller
presented in the same TLS session, so a token is only good on a connection of its signer: the
algorithm comes from that key (never from the token), the time checks use the injected clock,
and every ``jti`` is remembered until its token expires. PyJWT does the JWS work.

Time claims are checked as RFC 7519 NumericDates before any arithmetic: a finite number, not a
bool or a string. Python's JSON parser reads ``NaN`` and ``Infinity``, and every comparison
with NaN is false, so an unchecked NaN ``exp`` would pass the expiry test and be forgotten by
the replay cache at once.
"""

from __future__ import annotations

import base64
import heapq
import math
import secrets
from collections.abc import Sequence
from typing import Any

import attrs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from s2sgw.identity.http_headers import IDENTITY_HEADERS, Header, Refusal, RequestHead
from s2sgw.interfaces import Reason

TOKEN_LIFETIME = 30.0  # seconds between iat and exp of the tokens we sign
MAX_LIFETIME = 60.0  # longest exp - iat we accept
LEEWAY = 5.0  # clock skew allowed between the two gateways, seconds
REPLAY_CACHE_SIZE = 200_000
AUTHORIZATION = b"authorization"
MAX_NUMERIC_DATE = 2**53  # later than any real date; keeps the arithmetic below exact and finite

_CURVE_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def algorithm_for(key: Any) -> str:
    """The JWS algorithm for a private or public key: ES256 (P-256), RS256, EdDSA (Ed25519)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        try:
            return _CURVE_ALGS[key.curve.name]
        except KeyError:
            raise ValueError(f"no JWS algorithm for curve {key.curve.name}") from None
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "EdDSA"
    raise ValueError(f"no JWS algorithm for a {type(key).__name__}")


@attrs.define(eq=False)
class TokenSigner:
    """Signs tokens for one service identity."""

    key: Any  # the service's private key (matches the certificate it presents)
    issuer: str  # its SPIFFE ID
    clock: IReactorTime
    lifetime: float = TOKEN_LIFETIME
    algorithm: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.algorithm = algorithm_for(self.key)

    def token(self, audience: str) -> str:
        now = int(self.clock.seconds())
        claims = {
            "iss": self.issuer,
            "sub": self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + int(self.lifetime),
            "jti": base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii"),
        }
        return jwt.encode(claims, self.key, algorithm=self.algorithm)


ReplayKey = tuple[str, str]  # (caller's SPIFFE ID, jti)


@attrs.define(eq=False)
class ReplayCache:
    """Token ids seen, each kept while its token could still be accepted; bounded.

    An id is forgotten only once its ``until`` has passed, or when the cache is full: then the
    id that expires first goes, and its ``until`` becomes a floor under which every token is
    refused from then on. So no token is accepted twice while it is acceptable, full cache or
    not; under a flood, fresh tokens (which expire last) still pass.
    """

    clock: IReactorTime
    size: int = REPLAY_CACHE_SIZE
    evicted: int = 0
    floor: float = -math.inf  # the latest ``until`` of an id forgotten before its time
    _seen: dict[ReplayKey, float] = attrs.field(factory=dict)
    _expiry: list[tuple[float, ReplayKey]] = attrs.field(factory=list)  # heap, soonest first

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: ReplayKey, until: float) -> bool:
        """Remember ``key`` until ``until`` (inclusive); False if it may be a replay."""
        if not math.isfinite(until):
            return False
        now = self.clock.seconds()
        seen, expiry = self._seen, self._expiry
        while expiry and expiry[0][0] < now:
            del seen[heapq.heappop(expiry)[1]]
        if key in seen or until <= self.floor:
            return False
        while len(seen) >= self.size:
            forgotten_until, forgotten = heapq.heappop(expiry)
            del seen[forgotten]
            self.evicted += 1
            self.floor = max(self.floor, forgotten_until)
        seen[key] = until
        heapq.heappush(expiry, (until, key))
        return True


def numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """The claim ``name`` as an RFC 7519 NumericDate, None if absent; Refusal if not one."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_NUMERIC_DATE:
        raise _refusal(Reason.JWT_INVALID, f"{name} is not a finite NumericDate")
    return float(value)


@attrs.define(eq=False)
class TokenVerifier:
    """Checks tokens addressed to one service identity (``audience``)."""

    _log = Logger()

    audience: str
    clock: IReactorTime
    replay: ReplayCache
    max_lifetime: float = MAX_LIFETIME
    leeway: float = LEEWAY

    def verify(self, token: str, caller_id: str, caller_cert: x509.Certificate) -> dict[str, Any]:
        """Return the claims, or raise :class:`Refusal` with a ``jwt_*`` reason."""
        public_key = caller_cert.public_key()
        try:
            algorithm = algorithm_for(public_key)
        except ValueError as error:
            raise _refusal(Reason.JWT_INVALID, str(error)) from None
        try:
            # ``algorithms`` comes from the caller's key: a token naming another alg (HS256,
            # none, ...) fails with InvalidAlgorithmError before any signature check.
            claims = jwt.decode(
                token,
                public_key,
                algorithms=[algorithm],
                options={
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": ["iss", "sub", "aud", "iat", "exp", "jti"],
                },
            )
        except jwt.InvalidSignatureError:
            raise _refusal(Reason.JWT_INVALID, "signature does not verify with the caller's certificate key") from None
        except jwt.PyJWTError as error:
            raise _refusal(Reason.JWT_INVALID, str(error)) from None
        if claims["iss"] != caller_id or claims["sub"] != caller_id:
            raise _refusal(Reason.JWT_INVALID, "iss/sub is not the caller's SPIFFE ID")
        audience = claims["aud"]
        if not (audience == self.audience or (isinstance(audience, list) and self.audience in audience)):
            raise _refusal(Reason.JWT_AUDIENCE, "aud is not this service")
        issued, expires, not_before = (numeric_date(claims, name) for name in ("iat", "exp", "nbf"))
        if issued is None or expires is None:
            raise _refusal(Reason.JWT_INVALID, "iat/exp missing")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 8 <= len(jti) <= 128:
            raise _refusal(Reason.JWT_INVALID, "jti missing or of a bad size")
        now = self.clock.seconds()
        if expires + self.leeway < now:
            raise _refusal(Reason.JWT_EXPIRED, "the token has expired")
        if issued - self.leeway > now:
            raise _refusal(Reason.JWT_EXPIRED, "the token was issued in the future")
        if not_before is not None and not_before - self.leeway > now:
            raise _refusal(Reason.JWT_EXPIRED, "the token is not valid yet (nbf)")
        if expires - issued > self.max_lifetime or expires < issued:
            raise _refusal(Reason.JWT_EXPIRED, f"the token lives longer than {self.max_lifetime:g} s")
        if not self.replay.add((caller_id, jti), expires + self.leeway):
            raise _refusal(Reason.JWT_REPLAYED, "jti seen before (or expiring before ids a full cache forgot)")
        return claims


def _refusal(reason: str, detail: str) -> Refusal:
    return Refusal(401, reason, detail)


def bearer_token(head: RequestHead) -> str:
    """The one Bearer token of ``head``; Refusal if there is none or more than one."""
    values = head.values(AUTHORIZATION)
    if not values:
        raise _refusal(Reason.JWT_MISSING, "no Authorization header")
    if len(values) > 1:
        raise _refusal(Reason.JWT_INVALID, "more than one Authorization header")
    scheme, _, token = values[0].partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise _refusal(Reason.JWT_MISSING, "Authorization is not a Bearer token")
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        raise _refusal(Reason.JWT_INVALID, "token is not ASCII") from None


@attrs.frozen
class VerifyBearer:
    """Inbound ``identity = "jwt"``: each request must carry a good token from the TLS peer."""

    verifier: TokenVerifier
    caller_id: str
    caller_cert: x509.Certificate
    forward: bool = False  # pass the token on to the backend, or strip it
    strip: frozenset[bytes] = attrs.field(init=False)

    @strip.default
    def _strip(self) -> frozenset[bytes]:
        # Identity headers go in any case: a backend must never read a caller-written one.
        return IDENTITY_HEADERS if self.forward else IDENTITY_HEADERS | {AUTHORIZATION}

    def headers_for(self, head: RequestHead) -> Sequence[Header]:
        self.verifier.verify(bearer_token(head), self.caller_id, self.caller_cert)
        return ()


@attrs.frozen
class AddBearer:
    """Outbound ``identity = "jwt"``: a fresh token on each request, replacing the client's.

    The local client's identity headers are removed too: the only identity that leaves is the
    signed token.
    """

    signer: TokenSigner
    audience: str
    strip: frozenset[bytes] = IDENTITY_HEADERS | {AUTHORIZATION}

    def headers_for(self, head: RequestHead) -> Sequence[Header]:
        return ((b"Authorization", b"Bearer " + self.signer.token(self.audience).encode("ascii")),)
