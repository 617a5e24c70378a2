"""Forgery paths of the HTTP identity modes, as units: what a caller may not make a backend believe.

Every spelling of an identity header is removed in every HTTP mode, the gateway's own fields come
first, a head has at most 100 fields, bare CR/LF are refused as they arrive, and JWT time claims
must be finite NumericDates with replays refused for the token's whole lifetime.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from s2sgw.identity.http_headers import (
    IDENTITY_HEADERS,
    MAX_HEADER_FIELDS,
    IdentityHeaders,
    fold_name,
)
from s2sgw.identity.jwt_bearer import (
    AddBearer,
    ReplayCache,
    TokenSigner,
    TokenVerifier,
    VerifyBearer,
)
from s2sgw.interfaces import Reason
from tests.identitykit import (
    CALLER,
    FORGED,
    OURS,
    US,
    CertForKey,
    Rig,
    _verify,
    rewrite,
)
from tests.identitykit import audits, pki  # noqa: F401, F811 (fixtures)
from tests.tlshelpers import PKI

NOW = 1_000_000






def test_the_spellings_cover_underscore_and_mixed_forms() -> None:
    for expected in (b"X_Forwarded_Client_Cert", b"x-forwarded_client-cert", b"CLIENT_CERT", b"Client_Cert", b"client-cert_chain"):
        assert expected in FORGED
    assert all(fold_name(spelling) in IDENTITY_HEADERS for spelling in FORGED)


@pytest.fixture(scope="module")
def key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def _policies(key: Any) -> dict[str, Any]:
    """Each HTTP identity mode's policy: http-headers, jwt inbound (token kept or not), jwt outbound."""
    clock = _clock()
    return {
        "http-headers": IdentityHeaders(OURS),
        "jwt-in": VerifyBearer(TokenVerifier(US, clock, ReplayCache(clock)), CALLER, CertForKey(key)),  # type: ignore[arg-type]
        "jwt-in-forward": VerifyBearer(TokenVerifier(US, clock, ReplayCache(clock)), CALLER, CertForKey(key), forward=True),  # type: ignore[arg-type]
        "jwt-out": AddBearer(TokenSigner(key, CALLER, clock), US),
    }


@pytest.mark.parametrize("mode", ["http-headers", "jwt-in", "jwt-in-forward", "jwt-out"])
def test_every_spelling_of_every_identity_header_is_removed_in_every_http_mode(mode: str, key: Any) -> None:
    policy = _policies(key)[mode]
    signer = TokenSigner(key, CALLER, _clock())
    data = b""
    for i, forged in enumerate(FORGED):
        token = b"Authorization: Bearer " + signer.token(US).encode() + b"\r\n"
        data += b"GET /%d HTTP/1.1\r\nHost: x\r\n%s: By=evil;URI=admin\r\n%s\r\n" % (i, forged, token)
    rewriter, run = rewrite(data, policy=policy)
    assert not run.refusals and rewriter.requests == len(FORGED)
    out = bytes(run.out)
    assert b"evil;URI=admin" not in out  # ";" never occurs in a JWT, so no token can match by chance
    names = [line.split(b":", 1)[0] for line in out.split(b"\r\n") if b":" in line and not line.startswith(b"GET")]
    identity = [name for name in names if fold_name(name) in IDENTITY_HEADERS]
    assert identity == ([b"X-Forwarded-Client-Cert", b"Client-Cert"] * len(FORGED) if mode == "http-headers" else [])


def test_a_plain_header_with_an_underscore_passes_untouched() -> None:
    _, run = rewrite(b"GET / HTTP/1.1\r\nX_Request_Id: 7\r\nclient_certainly: no\r\n\r\n")
    assert not run.refusals and b"X_Request_Id: 7\r\n" in run.out and b"client_certainly: no\r\n" in run.out


@pytest.mark.parametrize("name", [b"Content_Length", b"transfer_encoding", b"Transfer_Encoding", b"CONTENT_length"])
def test_a_framing_field_spelled_with_an_underscore_is_refused(name: bytes) -> None:
    """A backend folding ``_`` would frame the body differently from the gateway."""
    rewriter, run = rewrite(b"POST / HTTP/1.1\r\n%s: 5\r\n\r\nhello" % name)
    assert [(r.status, r.reason) for r in run.refusals] == [(400, Reason.HTTP_BAD_REQUEST)]
    assert rewriter.refused and not run.out


def _fields(count: int) -> bytes:
    return b"GET / HTTP/1.1\r\n" + b"".join(b"F%d: v\r\n" % i for i in range(count)) + b"\r\n"


@pytest.mark.parametrize("mode", ["http-headers", "jwt-out"])
def test_the_gateways_fields_come_right_after_the_request_line(mode: str, key: Any) -> None:
    _, run = rewrite(_fields(MAX_HEADER_FIELDS - 2), policy=_policies(key)[mode])
    lines = bytes(run.out).split(b"\r\n")
    assert not run.refusals and lines[0] == b"GET / HTTP/1.1"
    if mode == "http-headers":
        assert lines[1:3] == [b"%s: %s" % field for field in OURS]
        assert lines[3] == b"F0: v"
    else:
        assert lines[1].startswith(b"Authorization: Bearer ") and lines[2] == b"F0: v"


@pytest.mark.parametrize("mode", ["http-headers", "jwt-in", "jwt-out"])
def test_101_header_fields_are_refused_with_431(mode: str, key: Any) -> None:
    rewriter, run = rewrite(_fields(101), policy=_policies(key)[mode])
    assert [(r.status, r.reason) for r in run.refusals] == [(431, Reason.HTTP_TOO_MANY_HEADERS)]
    assert rewriter.refused and not run.out


def test_a_head_reaches_the_backend_with_at_most_100_fields_counting_the_gateways() -> None:
    """98 caller fields + the gateway's 2 pass; 99 + 2 are refused, so a 100-field backend never refuses."""
    rewriter, run = rewrite(_fields(98))
    assert not run.refusals and bytes(run.out).count(b"\r\n") == 1 + 100 + 1
    rewriter, run = rewrite(_fields(99))
    assert [(r.status, r.reason) for r in run.refusals] == [(431, Reason.HTTP_TOO_MANY_HEADERS)]
    assert run.refusals[0].detail == "more than 100 header fields with the gateway's" and not run.out


def test_a_route_adding_no_field_accepts_100_caller_fields(key: Any) -> None:
    signer = TokenSigner(key, CALLER, _clock())
    head = _fields(100).replace(b"F0: v", b"Authorization: Bearer " + signer.token(US).encode())
    rewriter, run = rewrite(head, policy=_policies(key)["jwt-in-forward"])
    assert not run.refusals and rewriter.requests == 1 and bytes(run.out) == head


def test_too_many_fields_are_refused_before_the_head_is_complete() -> None:
    rewriter, run = rewrite(b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 1000)  # no empty line yet
    assert [(r.status, r.reason) for r in run.refusals] == [(431, Reason.HTTP_TOO_MANY_HEADERS)]
    assert rewriter.refused and not run.out


def test_the_field_cap_counts_fields_arriving_a_byte_at_a_time() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101
    rewriter, run = rewrite(head, cuts=list(range(1, len(head))))
    assert [r.reason for r in run.refusals] == [Reason.HTTP_TOO_MANY_HEADERS]
    ok = b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 98 + b"\r\n"
    rewriter, run = rewrite(ok, cuts=list(range(1, len(ok))))
    assert not run.refusals and rewriter.requests == 1


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HTTP/1.1\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\n",
        b"\nGET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\rHost: x",
        b"GET / HTTP/1.1\r\nA: b\r\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\n",
    ],
)
def test_a_head_with_a_bare_cr_or_lf_is_refused_before_it_is_complete(partial: bytes) -> None:
    """No waiting for 64 KiB or the idle timeout: the refusal comes with the offending byte."""
    for cuts in ([], list(range(1, len(partial)))):
        rewriter, run = rewrite(partial, cuts=cuts)
        assert [(r.status, r.reason) for r in run.refusals] == [(400, Reason.HTTP_BAD_REQUEST)], partial
        assert rewriter.refused and not run.out


def test_a_cr_at_the_end_of_a_read_waits_for_the_next_one() -> None:
    rewriter, run = rewrite(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", cuts=[15, 16, 24, 26])
    assert not run.refusals and rewriter.requests == 1


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\rhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: t\nGET",
    ],
)
def test_a_bare_cr_or_lf_in_chunk_framing_is_refused_at_once(data: bytes) -> None:
    rewriter, run = rewrite(data)
    assert [(r.status, r.reason) for r in run.refusals] == [(400, Reason.HTTP_BAD_REQUEST)]


def test_folded_lines_stay_refused_with_underscore_names() -> None:
    _, run = rewrite(b"GET / HTTP/1.1\r\nHost: x\r\n X_Forwarded_Client_Cert: folded\r\n\r\n")
    assert [r.reason for r in run.refusals] == [Reason.HTTP_BAD_REQUEST] and b"folded" not in run.out


def test_trailers_pass_untouched_identity_names_included() -> None:
    """What security.rst tells backend authors: never merge trailer fields into headers."""
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n"
    _, run = rewrite(data)
    assert not run.refusals and bytes(run.out).endswith(b"0\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# In a listener: the answer, the audit reason and the metric


def _connections(rig: Rig, reason: str) -> float:
    value = rig.registry.get_sample_value(
        "s2sgw_connections_total", {"route": "orders-in", "outcome": "closed", "reason": reason}
    )
    return value or 0.0


def test_a_listener_answers_a_bare_lf_head_with_400_at_once(pki: PKI, audits: list[dict]) -> None:
    rig = Rig(pki, "http-headers")
    caller = rig.connect()
    caller.transport.write(b"GET / HTTP/1.1\nHost: x\n")
    rig.pump()  # no clock advance: nothing waits for more bytes or for the idle timeout
    assert bytes(caller.received).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert bytes(caller.received).endswith(b"\r\n\r\nhttp_bad_request\n")
    assert bytes(rig.backend.peers[0].received) == b""
    assert [(e["outcome"], e["reason"]) for e in audits] == [("closed", Reason.HTTP_BAD_REQUEST)]
    assert _connections(rig, Reason.HTTP_BAD_REQUEST) == 1


@pytest.mark.parametrize("identity", ["http-headers", "jwt"])
def test_a_listener_refuses_101_header_fields_with_431_and_counts_the_reason(pki: PKI, audits: list[dict], identity: str) -> None:
    rig = Rig(pki, identity)
    caller = rig.connect()
    caller.transport.write(b"GET / HTTP/1.1\r\n" + b"".join(b"F%d: v\r\n" % i for i in range(101)) + b"\r\n")
    rig.pump()
    assert bytes(caller.received).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert bytes(caller.received).endswith(b"http_too_many_headers\n")
    assert bytes(rig.backend.peers[0].received) == b""
    assert [(e["outcome"], e["reason"]) for e in audits] == [("closed", Reason.HTTP_TOO_MANY_HEADERS)]
    assert audits[0]["detail"] == "more than 100 header fields"
    assert _connections(rig, Reason.HTTP_TOO_MANY_HEADERS) == 1


# ---------------------------------------------------------------------------------------------
# JWT time claims and replays


def _token(key: Any, **changes: Any) -> str:
    """A token from the caller with some claims replaced (``None`` drops nothing: it is JSON null)."""
    claims: dict[str, Any] = {"iss": CALLER, "sub": CALLER, "aud": US, "iat": NOW, "exp": NOW + 30, "jti": "abcdefghijkl"}
    claims.update(changes)
    payload = json.dumps(claims, separators=(",", ":"), allow_nan=True).encode()
    return jwt.api_jws.PyJWS().encode(payload, key, algorithm="ES256")


BAD_DATES = [math.nan, math.inf, -math.inf, "123", str(NOW), True, False, None, [NOW], {"n": NOW}, 10**400, -1]


@pytest.mark.parametrize("claim", ["iat", "exp", "nbf"])
@pytest.mark.parametrize("value", BAD_DATES, ids=repr)
def test_a_time_claim_that_is_not_a_finite_number_is_refused(key: Any, claim: str, value: Any) -> None:
    token = _token(key, **{claim: value})
    assert _verify(token, _clock(), key) == Reason.JWT_INVALID


def test_a_nan_token_is_refused_every_time_it_is_presented(key: Any) -> None:
    token = _token(key, iat=math.nan, exp=math.nan)
    assert "NaN" in jwt.api_jws.base64url_decode(token.split(".")[1]).decode()
    clock = _clock()
    cache = ReplayCache(clock)
    assert [_verify(token, clock, key, cache) for _ in range(3)] == [Reason.JWT_INVALID] * 3
    assert len(cache) == 0


def test_finite_time_claims_are_accepted_integer_or_not(key: Any) -> None:
    assert _verify(_token(key, iat=NOW - 0.5, exp=NOW + 29.5, nbf=NOW - 1.25), _clock(), key) == Reason.OK


def test_a_token_not_valid_yet_is_refused(key: Any) -> None:
    assert _verify(_token(key, nbf=NOW + 10), _clock(), key) == Reason.JWT_EXPIRED
    assert _verify(_token(key, nbf=NOW + 4), _clock(), key) == Reason.OK  # within the leeway


def test_a_used_token_is_refused_at_every_instant_until_it_expires(key: Any) -> None:
    """Accepted until exp + leeway inclusive, and remembered exactly as long."""
    clock = _clock()
    cache = ReplayCache(clock)
    token = _token(key)
    assert _verify(token, clock, key, cache) == Reason.OK
    for _ in range(35):
        clock.advance(1)
        assert _verify(token, clock, key, cache) == Reason.JWT_REPLAYED, clock.seconds() - NOW
    assert clock.seconds() == NOW + 30 + 5  # exp + leeway: still acceptable, so still remembered
    clock.advance(0.001)
    assert _verify(token, clock, key, cache) == Reason.JWT_EXPIRED


def test_a_full_replay_cache_never_lets_a_forgotten_token_back_in(key: Any) -> None:
    clock = _clock()
    cache = ReplayCache(clock, size=3)
    tokens = [_token(key, jti=f"jti-{i:08d}", exp=NOW + 20 + i) for i in range(6)]
    assert [_verify(t, clock, key, cache) for t in tokens] == [Reason.OK] * 6
    assert len(cache) == 3 and cache.evicted == 3
    assert [_verify(t, clock, key, cache) for t in tokens] == [Reason.JWT_REPLAYED] * 6
    fresh = _token(key, jti="jti-fresh", exp=NOW + 30)
    assert _verify(fresh, clock, key, cache) == Reason.OK


def test_the_replay_cache_never_keeps_an_entry_without_a_finite_end() -> None:
    cache = ReplayCache(Clock())
    assert not cache.add(("c", "nan"), math.nan) and not cache.add(("c", "inf"), math.inf)
    assert len(cache) == 0
