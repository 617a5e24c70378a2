"""The authorizer: identity from SANs, allow-lists and expected peers, status -> reason codes."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from s2sgw.config import InboundRoute, OutboundRoute
from s2sgw.interfaces import Decision, IAuthorizer, Reason
from s2sgw.routes.authz import Authorizer, PeerIdentity, peer_identity
from s2sgw.wire.ocsp import CertStatus, StatusInvalid, StatusUnavailable
from tests.doubles import FakeStatusChecker
from tests.pkifactory import NOW, make_ca
from tests.tlshelpers import FakeAuthorizer

DOMAIN = "s2s.test"
HOUR = datetime.timedelta(hours=1)
CA = make_ca("Authz Test CA")
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def leaf(*sans: str, cn: str = "peer") -> x509.Certificate:
    """A leaf of CA with SANs written as "URI:...", "DNS:..." or "IP:..."."""
    names: list[x509.GeneralName] = []
    for san in sans:
        kind, _, value = san.partition(":")
        if kind == "URI":
            names.append(x509.UniformResourceIdentifier(value))
        elif kind == "DNS":
            names.append(x509.DNSName(value))
        else:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(CA.cert.subject)
        .public_key(LEAF_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(CA.key, hashes.SHA256())


def service_leaf(name: str) -> x509.Certificate:
    """What the CA issues: SPIFFE ID plus DNS NAME and NAME.DOMAIN."""
    return leaf(f"URI:spiffe://{DOMAIN}/{name}", f"DNS:{name}", f"DNS:{name}.{DOMAIN}")


USERS = service_leaf("users")


def inbound(*allow: str) -> InboundRoute:
    return InboundRoute(name="orders-in", service="orders", listen="tcp:0", backend="tcp:127.0.0.1:1", allow=allow)


def outbound(peer: str) -> OutboundRoute:
    return OutboundRoute(name="orders-to-x", service="orders", listen="tcp:0", remote="tcp:127.0.0.1:1", peer=peer)


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(NOW.timestamp())
    return c


@pytest.fixture
def checker(clock):
    return FakeStatusChecker(clock)


@pytest.fixture
def warnings():
    events: list[str] = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn:
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def decide(authorizer: Authorizer, route, chain) -> Decision:
    results = []
    authorizer.authorize(route, chain).addBoth(results.append)
    assert results, "authorize did not fire"
    assert isinstance(results[0], Decision), results[0]
    return results[0]


def test_provides_interface(checker):
    assert verifyObject(IAuthorizer, Authorizer(checker, DOMAIN))


def test_the_fake_authorizer_provides_the_same_interface():
    assert verifyObject(IAuthorizer, FakeAuthorizer())


def test_without_a_staple_source_a_stapled_answer_is_not_used(checker):
    """The gateway hands the authorizer a staple source only when its status checker staples."""
    authorizer = Authorizer(checker, DOMAIN)
    assert authorizer.accept_staple(outbound("users"), [USERS, CA.cert], b"any answer") is None
    assert decide(authorizer, outbound("users"), [USERS, CA.cert]).allowed
    assert len(checker.calls) == 1  # the status check asked the checker as usual


def test_rejects_unknown_fail_mode(checker):
    with pytest.raises(ValueError):
        Authorizer(checker, DOMAIN, fail="ajar")


class TestIdentity:
    def test_bare_name_on_allow_list_admits_spiffe_peer(self, checker):
        """A bare allow entry means spiffe://DOMAIN/NAME; the decision carries ID and serial."""
        decision = decide(Authorizer(checker, DOMAIN), inbound("billing", "users"), [USERS, CA.cert])
        assert decision == Decision(True, Reason.OK, identity=f"spiffe://{DOMAIN}/users", serial=USERS.serial_number)

    def test_spiffe_entry_matches_exactly(self, checker):
        authorizer = Authorizer(checker, DOMAIN)
        assert decide(authorizer, inbound(f"spiffe://{DOMAIN}/users"), [USERS, CA.cert]).allowed
        refused = decide(authorizer, inbound(f"spiffe://{DOMAIN}/users/"), [USERS, CA.cert])
        assert refused.reason == Reason.IDENTITY_NOT_ALLOWED

    def test_peer_not_on_allow_list_is_refused_without_status_query(self, checker):
        decision = decide(Authorizer(checker, DOMAIN), inbound("billing"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason) == (False, Reason.IDENTITY_NOT_ALLOWED)
        assert decision.identity == f"spiffe://{DOMAIN}/users"
        assert checker.calls == []

    def test_empty_allow_list_refuses_everyone(self, checker):
        decision = decide(Authorizer(checker, DOMAIN), inbound(), [USERS, CA.cert])
        assert decision.reason == Reason.IDENTITY_NOT_ALLOWED
        assert "nobody" in decision.detail

    def test_outbound_peer_must_be_the_expected_one(self, checker):
        authorizer = Authorizer(checker, DOMAIN)
        assert decide(authorizer, outbound("users"), [USERS, CA.cert]).allowed
        assert decide(authorizer, outbound(f"spiffe://{DOMAIN}/users"), [USERS, CA.cert]).allowed
        mismatch = decide(authorizer, outbound("billing"), [USERS, CA.cert])
        assert (mismatch.allowed, mismatch.reason) == (False, Reason.IDENTITY_MISMATCH)

    @pytest.mark.parametrize(
        "uri",
        [
            f"spiffe://{DOMAIN}:8443/users",  # port
            "spiffe://other.test/users",  # other trust domain
            f"spiffe://{DOMAIN}/users/extra",
            f"spiffe://{DOMAIN.upper()}/users",
            f"SPIFFE://{DOMAIN}/users",
        ],
    )
    def test_near_miss_spiffe_ids_never_match(self, checker, uri):
        """A SPIFFE ID with a port, another trust domain, more path or other case matches nothing,
        even with a matching DNS SAN beside it."""
        cert = leaf(f"URI:{uri}", "DNS:users")
        authorizer = Authorizer(checker, DOMAIN)
        for route in (inbound("users"), inbound(f"spiffe://{DOMAIN}/users"), outbound("users")):
            decision = decide(authorizer, route, [cert, CA.cert])
            assert not decision.allowed
            assert decision.reason in (Reason.IDENTITY_NOT_ALLOWED, Reason.IDENTITY_MISMATCH)

    def test_dns_only_peer_matches_bare_name(self, checker):
        """A leaf without SPIFFE ID is matched on its DNS SANs; its identity is the first one."""
        cert = leaf("DNS:users", "DNS:users.s2s.test")
        decision = decide(Authorizer(checker, DOMAIN), inbound("users"), [cert, CA.cert])
        assert (decision.allowed, decision.identity) == (True, "users")
        assert decide(Authorizer(checker, DOMAIN), inbound("users.s2s.test"), [cert, CA.cert]).allowed
        assert not decide(Authorizer(checker, DOMAIN), inbound("user"), [cert, CA.cert]).allowed
        # a spiffe:// entry never matches a DNS name
        assert not decide(Authorizer(checker, DOMAIN), inbound(f"spiffe://{DOMAIN}/users"), [cert, CA.cert]).allowed

    @pytest.mark.parametrize(
        "sans",
        [(), ("IP:127.0.0.1",), ("URI:https://users.s2s.test/",), (f"URI:spiffe://{DOMAIN}/a", f"URI:spiffe://{DOMAIN}/b")],
        ids=["no-san", "ip-only", "https-uri-only", "two-spiffe-ids"],
    )
    def test_leaf_without_usable_identity_is_refused(self, checker, sans):
        cert = leaf(*sans, cn="users")  # the CN is never an identity
        decision = decide(Authorizer(checker, DOMAIN), inbound("users"), [cert, CA.cert])
        assert (decision.allowed, decision.reason) == (False, Reason.NO_IDENTITY)
        assert decision.serial == cert.serial_number
        assert checker.calls == []

    def test_chain_without_issuer_is_refused(self, checker):
        assert decide(Authorizer(checker, DOMAIN), inbound("users"), [USERS]).reason == Reason.UNTRUSTED_CHAIN
        assert decide(Authorizer(checker, DOMAIN), inbound("users"), []).reason == Reason.NO_CLIENT_CERT

    @settings(max_examples=25, deadline=None)
    @given(
        cert_name=st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
        entry=st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
    )
    def test_bare_name_matches_only_its_own_spiffe_id(self, cert_name, entry):
        authorizer = Authorizer(FakeStatusChecker(task.Clock()), DOMAIN)
        cert = leaf(f"URI:spiffe://{DOMAIN}/{cert_name}")
        assert decide(authorizer, inbound(entry), [cert, CA.cert]).allowed == (entry == cert_name)

    def test_peer_identity_reads_spiffe_and_dns(self):
        assert peer_identity(USERS) == PeerIdentity(f"spiffe://{DOMAIN}/users", ("users", f"users.{DOMAIN}"))


class TestStatus:
    def test_status_is_asked_about_leaf_and_its_issuer(self, checker):
        decide(Authorizer(checker, DOMAIN), inbound("users"), [USERS, CA.cert])
        assert checker.calls == [(USERS.serial_number, CA.cert.subject)]

    def test_revoked_peer_is_refused(self, checker):
        checker.set(
            USERS.serial_number,
            CertStatus("revoked", NOW, None, revoked_at=NOW - HOUR, revocation_reason="keyCompromise"),
        )
        decision = decide(Authorizer(checker, DOMAIN, fail="open"), inbound("users"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason, decision.serial) == (False, Reason.REVOKED, USERS.serial_number)
        assert "keyCompromise" in decision.detail

    def test_unknown_peer_is_refused_even_fail_open(self, checker):
        checker.set(USERS.serial_number, "unknown")
        decision = decide(Authorizer(checker, DOMAIN, fail="open"), inbound("users"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason) == (False, Reason.STATUS_UNKNOWN)

    def test_unreachable_ca_fails_closed(self, checker, warnings):
        checker.set(USERS.serial_number, StatusUnavailable("connection refused"))
        decision = decide(Authorizer(checker, DOMAIN), inbound("users"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason) == (False, Reason.CA_UNREACHABLE)
        assert "connection refused" in decision.detail
        assert warnings == []

    def test_unreachable_ca_fails_open_with_warning(self, checker, warnings):
        """fail = open admits with reason ok, says so in the detail and logs a warning."""
        checker.set(USERS.serial_number, StatusUnavailable("connection refused"))
        decision = decide(Authorizer(checker, DOMAIN, fail="open"), inbound("users"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason) == (True, Reason.OK)
        assert decision.detail.startswith("fail open: ca_unreachable")
        assert len(warnings) == 1 and "fail = open" in warnings[0] and "users" in warnings[0]

    def test_invalid_answer_refuses_closed_and_admits_open(self, checker, warnings):
        checker.set(USERS.serial_number, StatusInvalid("signature does not verify"))
        closed = decide(Authorizer(checker, DOMAIN), inbound("users"), [USERS, CA.cert])
        assert (closed.allowed, closed.reason) == (False, Reason.STATUS_INVALID)
        opened = decide(Authorizer(checker, DOMAIN, fail="open"), inbound("users"), [USERS, CA.cert])
        assert (opened.allowed, opened.detail) == (True, "fail open: status_invalid: signature does not verify")
        assert len(warnings) == 1

    @pytest.mark.parametrize("synchronous", [True, False])
    def test_checker_bug_becomes_refusal_and_warning(self, clock, warnings, synchronous):
        """An unexpected exception never escapes: the peer is refused and a warning logged."""

        class Broken:
            def check(self, leaf, issuer):
                if synchronous:
                    raise RuntimeError("boom")
                return defer.fail(RuntimeError("boom"))

        decision = decide(Authorizer(Broken(), DOMAIN, fail="open"), inbound("users"), [USERS, CA.cert])
        assert (decision.allowed, decision.reason) == (False, Reason.STATUS_INVALID)
        assert "boom" in decision.detail
        assert len(warnings) == 1 and "RuntimeError: boom" in warnings[0]

    def test_decision_waits_for_the_status_answer(self, checker):
        checker.hold = True
        d = Authorizer(checker, DOMAIN).authorize(inbound("users"), [USERS, CA.cert])
        assert not d.called
        checker.release()
        assert d.result.allowed
