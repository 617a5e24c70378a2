"""The identity layer: PROXY v2 headers, HTTP identity headers and JWTs, as units and in a listener."""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from s2sgw.config import ConfigError, parse_config
from s2sgw.identity.http_headers import (
    identity_headers,
)
from s2sgw.identity.jwt_bearer import (
    AddBearer,
    ReplayCache,
    TokenSigner,
    TokenVerifier,
    VerifyBearer,
    algorithm_for,
)
from s2sgw.interfaces import Reason
from s2sgw.identity.proxy_v2 import CallerInfo, encode_v2
from tests.doubles import decode_proxy_v2, decode_tlvs
from tests.identitykit import (
    CALLER,
    OURS,
    US,
    CertForKey,
    Rig,
    _verify,
    rewrite,
)
from tests.identitykit import audits, pki  # noqa: F401, F811 (fixtures)
from tests.tlshelpers import (
    PKI,
)

# ---------------------------------------------------------------------------------------------
# An independent PROXY v2 decoder (written from HAProxy's proxy-protocol.txt, not from our encoder)








def test_proxy_v2_header_carries_address_tls_facts_spiffe_id_and_serial() -> None:
    info = CallerInfo(
        source=("10.1.2.3", 40123),
        destination=("10.9.8.7", 8443),
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        spiffe_id=CALLER,
        serial=0xABCDEF,
        common_name="users",
    )
    header = encode_v2(info)
    decoded = decode_proxy_v2(header + b"GET / HTTP/1.1\r\n")
    assert decoded.consumed == len(header)
    assert (decoded.command, decoded.family) == (1, 0x11)
    assert decoded.source == ("10.1.2.3", 40123) and decoded.destination == ("10.9.8.7", 8443)
    assert decoded.tlvs[0xE0] == CALLER.encode()
    assert decoded.tlvs[0xE1] == b"abcdef"
    ssl = decoded.tlvs[0x20]
    client, verify = ssl[0], struct.unpack("!I", ssl[1:5])[0]
    assert client == 0x07 and verify == 0
    subs = decode_tlvs(ssl[5:])
    assert subs == {0x21: b"TLSv1.3", 0x22: b"users", 0x23: b"TLS_AES_256_GCM_SHA384"}


def test_proxy_v2_mixed_families_become_ipv4_mapped_ipv6() -> None:
    decoded = decode_proxy_v2(encode_v2(CallerInfo(("127.0.0.1", 5), ("::1", 6), spiffe_id=CALLER)))
    assert decoded.family == 0x21
    assert decoded.source == ("::ffff:7f00:1", 5) and decoded.destination == ("::1", 6)


def test_proxy_v2_without_tcp_addresses_is_unspec_but_keeps_the_tlvs() -> None:
    decoded = decode_proxy_v2(encode_v2(CallerInfo(None, None, spiffe_id=CALLER, serial=1)))
    assert decoded.family == 0x00 and decoded.source is None
    assert decoded.tlvs[0xE0] == CALLER.encode() and decoded.tlvs[0xE1] == b"1"


# ---------------------------------------------------------------------------------------------
# HTTP request rewriting







def parse_requests(data: bytes) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
    """(request line, headers, raw body bytes incl. chunk framing) for each request; a second parser."""
    requests = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        headers = [(f.split(b":", 1)[0], f.split(b":", 1)[1].strip()) for f in fields]
        names = {n.lower(): v for n, v in headers}
        if names.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
            pos = 0
            while True:
                end = data.index(b"\r\n", pos)
                size = int(data[pos:end].split(b";")[0], 16)
                pos = end + 2 + size + (2 if size else 0)
                if size == 0:  # trailer lines until an empty one
                    while True:
                        end = data.index(b"\r\n", pos)
                        empty, pos = end == pos, end + 2
                        if empty:
                            break
                    break
            body, data = data[:pos], data[pos:]
        else:
            length = int(names.get(b"content-length", b"0"))
            body, data = data[:length], data[length:]
        requests.append((line, headers, body))
    return requests


def test_each_pipelined_request_gets_identity_headers_and_loses_injected_ones() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: x\r\nx-forwarded-client-cert: By=evil\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nCLIENT-CERT: :ZXZpbA==:\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nClient-Cert-Chain: x\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Forwarded-Client-Cert-Trailer: t\r\n\r\n"
    )
    rewriter, run = rewrite(data)
    assert not run.refusals and rewriter.requests == 3
    ours = b"X-Forwarded-Client-Cert: By=us;Hash=00;URI=caller\r\nClient-Cert: :AAAA:\r\n"
    assert bytes(run.out) == (
        b"GET /a HTTP/1.1\r\n" + ours + b"Host: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\n" + ours + b"Host: x\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\n" + ours + b"Transfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Forwarded-Client-Cert-Trailer: t\r\n\r\n"
    )


def test_a_body_that_looks_like_a_request_is_not_rewritten() -> None:
    smuggled = b"GET /x HTTP/1.1\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
    _, run = rewrite(data, cuts=[5, 30, 60])
    assert bytes(run.out).endswith(smuggled)
    assert bytes(run.out).count(b"By=us") == 1


def test_one_write_per_read_on_the_body_path() -> None:
    rewriter, run = rewrite(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    for _ in range(10):
        rewriter.feed(b"x" * 10)
    assert run.writes == 11 and bytes(run.out).endswith(b"x" * 100)


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 501, Reason.HTTP_UPGRADE_REFUSED),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive, UPGRADE\r\n\r\n", 501, Reason.HTTP_UPGRADE_REFUSED),
        (b"CONNECT a:443 HTTP/1.1\r\n\r\n", 501, Reason.HTTP_UPGRADE_REFUSED),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"GET / HTTP/1.1\r\nHost: x\r\n X-Forwarded-Client-Cert: folded\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"GET / HTTP/1.1\r\nX-Forwarded-Client-Cert : spaced\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"GET / HTTP/1.1\nX-Forwarded-Client-Cert: bare-lf\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"GET / HTTP/1.1\r\nA: b\rX-Forwarded-Client-Cert: bare-cr\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"GET / HTTP/2.0\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, Reason.HTTP_BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400, Reason.HTTP_BAD_REQUEST),
    ],
)
def test_ambiguous_or_unrewritable_requests_are_refused(data: bytes, status: int, reason: str) -> None:
    rewriter, run = rewrite(data)
    assert [(r.status, r.reason) for r in run.refusals] == [(status, reason)]
    assert rewriter.refused and not any(word in bytes(run.out) for word in (b"folded", b"spaced", b"bare-"))
    before = bytes(run.out)
    rewriter.feed(b"GET / HTTP/1.1\r\n\r\n")  # nothing more is forwarded after a refusal
    assert bytes(run.out) == before


def test_an_oversized_head_is_refused_with_431_before_it_is_complete() -> None:
    _, run = rewrite(b"GET / HTTP/1.1\r\n" + b"A: " + b"x" * 70000)
    assert [(r.status, r.reason) for r in run.refusals] == [(431, Reason.HTTP_BAD_REQUEST)]
    assert not run.out


def test_earlier_requests_stay_forwarded_when_a_later_one_is_refused() -> None:
    _, run = rewrite(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nUpgrade: h2c\r\n\r\n")
    assert bytes(run.out).startswith(b"GET /1 HTTP/1.1\r\n") and b"/2" not in bytes(run.out)
    assert len(run.refusals) == 1


_IDENTITY_NAMES = ["x-forwarded-client-cert", "client-cert", "client-cert-chain"]


def _casing(name: str) -> st.SearchStrategy[str]:
    """``name`` with random letter case, and each ``-`` possibly spelled ``_``."""
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flags: "".join(("_" if c == "-" else c.upper()) if f else c for c, f in zip(name, flags))
    )


def _is_identity(name: bytes) -> bool:
    return name.lower().replace(b"_", b"-").decode() in _IDENTITY_NAMES


_injected = st.sampled_from(_IDENTITY_NAMES).flatmap(_casing).map(str.encode)
_plain_name = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z", fullmatch=True).map(str.encode).filter(
    lambda n: n.lower() not in {b"content-length", b"transfer-encoding", b"upgrade", b"connection", *map(str.encode, _IDENTITY_NAMES)}
)
_value = st.from_regex(rb"\A[!-~]([ !-~]{0,30}[!-~])?\Z", fullmatch=True)


@st.composite
def requests(draw: Any) -> tuple[bytes, list[list[tuple[bytes, bytes]]], list[bytes]]:
    """Serialized pipelined requests, with each request's non-identity headers and raw body."""
    data = b""
    kept_headers, bodies = [], []
    for _ in range(draw(st.integers(1, 4))):
        fields = draw(st.lists(st.tuples(st.one_of(_injected, _plain_name), _value), max_size=6))
        body = draw(st.binary(max_size=300))
        framing = draw(st.sampled_from(["length", "chunked"] if body else ["none", "length", "chunked"]))
        if framing == "length":
            fields.insert(draw(st.integers(0, len(fields))), (b"content-length", str(len(body)).encode()))
            raw = body
        elif framing == "chunked":
            fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", b"chunked"))
            raw, rest = b"", body
            while rest:
                size = draw(st.integers(1, len(rest)))
                raw += b"%x\r\n%s\r\n" % (size, rest[:size])
                rest = rest[size:]
            raw += b"0\r\n\r\n"
        else:
            raw = b""
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]))
        data += method + b" /p HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n" + raw
        kept_headers.append([(n, v) for n, v in fields if not _is_identity(n)])
        bodies.append(raw)
    return data, kept_headers, bodies


@settings(max_examples=150, deadline=None)
@given(requests(), st.lists(st.integers(1, 4000), max_size=8))
def test_injected_identity_headers_never_survive_and_bodies_pass_untouched(
    generated: tuple[bytes, list[list[tuple[bytes, bytes]]], list[bytes]], cuts: list[int]
) -> None:
    data, kept_headers, bodies = generated
    rewriter, run = rewrite(data, cuts)
    assert not run.refusals
    parsed = parse_requests(bytes(run.out))
    assert len(parsed) == len(bodies) == rewriter.requests
    for (_line, headers, body), kept, raw in zip(parsed, kept_headers, bodies):
        identity = [(n, v) for n, v in headers if _is_identity(n)]
        assert identity == list(OURS) and headers[: len(OURS)] == list(OURS)
        assert [(n, v) for n, v in headers if not _is_identity(n)] == kept
        assert body == raw


def test_identity_headers_name_us_the_caller_and_the_certificate(pki: PKI) -> None:
    leaf = x509.load_pem_x509_certificate(pki.identity("users").record.pem)
    der = leaf.public_bytes(serialization.Encoding.DER)
    headers = dict(identity_headers(US, CALLER, leaf))
    assert headers[b"X-Forwarded-Client-Cert"] == f"By={US};Hash={hashlib.sha256(der).hexdigest()};URI={CALLER}".encode()
    assert base64.b64decode(headers[b"Client-Cert"].strip(b":")) == der


# ---------------------------------------------------------------------------------------------
# JWT


def _keys() -> list[Any]:
    return [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate()]




@pytest.mark.parametrize("key", _keys(), ids=["ES256", "RS256", "EdDSA"])
def test_a_signed_token_verifies_with_pyjwt_and_with_our_verifier(key: Any) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    token = TokenSigner(key, CALLER, clock).token(US)
    alg = algorithm_for(key)
    assert jwt.get_unverified_header(token)["alg"] == alg
    claims = jwt.decode(token, key.public_key(), algorithms=[alg], audience=US, options={"verify_exp": False, "verify_iat": False})
    assert claims["iss"] == claims["sub"] == CALLER and claims["exp"] - claims["iat"] == 30 and len(claims["jti"]) >= 16
    verifier = TokenVerifier(US, clock, ReplayCache(clock))
    assert verifier.verify(token, CALLER, CertForKey(key))["jti"] == claims["jti"]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def p256() -> Any:
    return ec.generate_private_key(ec.SECP256R1())




def test_expired_future_and_long_lived_tokens_are_refused(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    token = TokenSigner(p256, CALLER, clock).token(US)
    later = Clock()
    later.advance(1_000_000 + 36)
    assert _verify(token, later, p256) == Reason.JWT_EXPIRED
    earlier = Clock()
    earlier.advance(1_000_000 - 10)
    assert _verify(token, earlier, p256) == Reason.JWT_EXPIRED
    long_lived = TokenSigner(p256, CALLER, clock, lifetime=3600).token(US)
    assert _verify(long_lived, clock, p256) == Reason.JWT_EXPIRED


def test_a_replayed_token_is_refused_and_forgotten_after_it_expires(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    cache = ReplayCache(clock)
    token = TokenSigner(p256, CALLER, clock).token(US)
    assert _verify(token, clock, p256, cache) == Reason.OK
    assert _verify(token, clock, p256, cache) == Reason.JWT_REPLAYED
    clock.advance(40)
    TokenSigner(p256, CALLER, clock).token(US)
    assert cache.add(("x", "y"), clock.seconds() + 30) and len(cache) == 1  # the old entry expired out


def test_the_replay_cache_is_bounded() -> None:
    clock = Clock()
    cache = ReplayCache(clock, size=3)
    for i in range(5):
        assert cache.add(("c", str(i)), 100.0 + i)
    assert len(cache) == 3 and cache.evicted == 2
    # The ids it had to forget cannot come back, and neither can any token expiring no later.
    assert not cache.add(("c", "0"), 100.0) and not cache.add(("c", "1"), 101.0) and not cache.add(("c", "new"), 101.0)
    assert cache.add(("c", "5"), 105.0)


def test_wrong_audience_other_signer_and_wrong_issuer_are_refused(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    assert _verify(TokenSigner(p256, CALLER, clock).token("spiffe://example.test/else"), clock, p256) == Reason.JWT_AUDIENCE
    other = ec.generate_private_key(ec.SECP256R1())
    resigned = TokenSigner(other, CALLER, clock).token(US)
    assert _verify(resigned, clock, p256) == Reason.JWT_INVALID
    assert _verify(TokenSigner(p256, CALLER, clock).token(US), clock, p256, caller="spiffe://example.test/x") == Reason.JWT_INVALID


def test_a_token_whose_claims_were_edited_after_signing_is_refused(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    header, payload, signature = TokenSigner(p256, CALLER, clock).token("spiffe://example.test/else").split(".")
    claims = jwt.api_jws.base64url_decode(payload).replace(b"/else", b"/orders")
    forged = ".".join([header, base64.urlsafe_b64encode(claims).rstrip(b"=").decode(), signature])
    assert _verify(forged, clock, p256) == Reason.JWT_INVALID


def test_algorithm_confusion_and_unsigned_tokens_are_refused(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    claims = {"iss": CALLER, "sub": CALLER, "aud": US, "iat": 1_000_000, "exp": 1_000_030, "jti": "abcdefghijkl"}
    pem = p256.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs256 = jwt.api_jws.PyJWS().encode(jwt.api_jwt.json.dumps(claims).encode(), b"k" * 32, algorithm="HS256")
    assert _verify(hs256, clock, p256) == Reason.JWT_INVALID
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert _verify(unsigned, clock, p256) == Reason.JWT_INVALID
    assert _verify("not.a.token", clock, p256) == Reason.JWT_INVALID
    assert pem  # the public key exists; it is never usable as an HMAC secret


def test_bearer_policies_strip_replace_and_require_the_token(p256: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    signer = TokenSigner(p256, CALLER, clock)
    # Outbound: the local client's Authorization is replaced by a fresh token per request.
    _, run = rewrite(b"GET /1 HTTP/1.1\r\nauthorization: Basic eA==\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", policy=AddBearer(signer, US))
    tokens = [line.split(b"Bearer ")[1] for line in bytes(run.out).split(b"\r\n") if line.startswith(b"Authorization: Bearer ")]
    assert len(tokens) == 2 and tokens[0] != tokens[1] and b"Basic" not in bytes(run.out)
    # Inbound: verified and stripped (or forwarded); a request without one is refused.
    verifier = TokenVerifier(US, clock, ReplayCache(clock))
    inbound = VerifyBearer(verifier, CALLER, CertForKey(p256))  # type: ignore[arg-type]
    _, checked = rewrite(bytes(run.out), policy=inbound)
    assert not checked.refusals and b"Authorization" not in bytes(checked.out) and bytes(checked.out).count(b"GET") == 2
    _, replayed = rewrite(bytes(run.out), policy=inbound)
    assert [r.reason for r in replayed.refusals] == [Reason.JWT_REPLAYED]
    forwarding = VerifyBearer(TokenVerifier(US, clock, ReplayCache(clock)), CALLER, CertForKey(p256), forward=True)  # type: ignore[arg-type]
    _, kept = rewrite(bytes(run.out), policy=forwarding)
    assert bytes(kept.out) == bytes(run.out)
    _, missing = rewrite(b"GET / HTTP/1.1\r\n\r\n", policy=inbound)
    assert [(r.status, r.reason) for r in missing.refusals] == [(401, Reason.JWT_MISSING)]


# ---------------------------------------------------------------------------------------------
# Configuration


def _config(tmp_path: Any, inbound: dict, outbound: dict | None = None) -> Any:
    for name in ("bundle.pem", "a.pem", "a.key"):
        (tmp_path / name).write_text("")
    service = {"name": "a", "cert": "a.pem", "key": "a.key", "inbound": [{"listen": "tcp:1", "backend": "tcp:127.0.0.1:2", **inbound}]}
    if outbound is not None:
        service["outbound"] = [{"listen": "tcp:3:interface=127.0.0.1", "remote": "tcp:127.0.0.1:4", "peer": "b", **outbound}]
    return parse_config({"trust": "bundle.pem", "status": {"mode": "off"}, "service": [service]}, tmp_path / "g.toml")


def test_identity_keys_load_with_their_defaults(tmp_path: Any) -> None:
    plain = _config(tmp_path, {}, {})
    assert plain.services[0].inbound[0].identity == "none" and plain.services[0].outbound[0].identity == "none"
    config = _config(tmp_path, {"identity": "jwt", "jwt_forward": True}, {"identity": "jwt"})
    route = config.services[0].inbound[0]
    assert (route.identity, route.jwt_forward, config.services[0].outbound[0].identity) == ("jwt", True, "jwt")
    with pytest.raises(ConfigError, match=r"inbound\[0\]\.identity: expected one of"):
        _config(tmp_path, {"identity": "xfcc"})
    with pytest.raises(ConfigError, match=r"inbound\[0\]\.jwt_forward: only used with identity"):
        _config(tmp_path, {"identity": "http-headers", "jwt_forward": True})
    with pytest.raises(ConfigError, match=r"outbound\[0\]\.identity: expected one of"):
        _config(tmp_path, {}, {"identity": "proxy-v2"})


# ---------------------------------------------------------------------------------------------
# In a listener: real TLS in memory








def test_a_proxy_v2_route_sends_the_header_before_the_callers_first_byte(pki: PKI) -> None:
    rig = Rig(pki, "proxy-v2")
    caller = rig.connect()
    caller.transport.write(b"hello")
    rig.pump()
    received = bytes(rig.backend.peers[0].received)
    decoded = decode_proxy_v2(received)
    assert received[decoded.consumed :] == b"hello"
    assert decoded.source == ("10.0.0.1", 40000) and decoded.destination == ("10.0.0.2", 443)
    assert decoded.tlvs[0xE0] == CALLER.encode()
    serial = x509.load_pem_x509_certificate(pki.identity("users").record.pem).serial_number
    assert decoded.tlvs[0xE1] == f"{serial:x}".encode()
    assert decode_tlvs(decoded.tlvs[0x20][5:])[0x21] == b"TLSv1.3"


def test_an_http_headers_route_rewrites_every_request_of_the_connection(pki: PKI) -> None:
    rig = Rig(pki, "http-headers")
    caller = rig.connect()
    caller.transport.write(b"GET /1 HTTP/1.1\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n")
    rig.pump()
    caller.transport.write(b"GET /2 HTTP/1.1\r\nclient-cert: :ZXZpbA==:\r\n\r\n")
    rig.pump()
    received = bytes(rig.backend.peers[0].received)
    assert b"evil" not in received and b"ZXZpbA" not in received
    assert received.count(f"By={US};Hash=".encode()) == 2 and received.count(f";URI={CALLER}".encode()) == 2


def test_a_jwt_route_refuses_a_request_without_a_token_with_401_and_audits_the_reason(
    pki: PKI, audits: list[dict]
) -> None:
    rig = Rig(pki, "jwt")
    caller = rig.connect()
    caller.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.pump()
    assert bytes(caller.received).startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert bytes(rig.backend.peers[0].received) == b""
    assert [(e["outcome"], e["reason"]) for e in audits] == [("closed", Reason.JWT_MISSING)]
    assert audits[0]["detail"] == "no Authorization header"
