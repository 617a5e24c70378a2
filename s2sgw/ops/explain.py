"""``s2sgw explain``: would this peer certificate get through this route, and if not, why?

TLS alerts say "unknown ca" or "internal error"; this command says what the gateway would decide
and why, in words. It runs the gateway's own code in the gateway's order: the chain against the
trust bundle (as the TLS layer does, with the peer's intermediates), the checks of the verify
callback (the leaf's, our rules and the second verifier), then the :class:`Authorizer`
(identity, allow-list or expected peer, and a real status query through the configured checker
on a reactor). Every problem of the certificate's chain is listed, not only the first.

Exit codes: 0 allowed, 1 refused, 2 the question could not be asked (bad configuration, unreadable
certificate file, unknown route).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import defer
from twisted.internet.defer import Deferred

from s2sgw import pki, tls
from s2sgw.config import GatewayConfig, InboundRoute, OutboundRoute, load_config
from s2sgw.errors import S2sgwError
from s2sgw.interfaces import Decision, IStatusChecker, Reason
from s2sgw.routes.authz import Authorizer
from s2sgw.verify import rules
from s2sgw.verify.strict import StrictVerifier

EXIT_ALLOWED = 0
EXIT_REFUSED = 1
EXIT_ERROR = 2


class ExplainError(S2sgwError):
    """The question cannot be asked: unknown route, unreadable certificate file."""


@attrs.frozen
class Verdict:
    """What the gateway would decide, with the steps that led there, in words."""

    allowed: bool
    reason: str  # a Reason code
    words: str  # the reason as a sentence
    steps: tuple[tuple[str, str], ...]  # (step, what was found)

    def render(self) -> str:
        width = max(len(step) for step, _ in self.steps) if self.steps else 0
        lines = [f"{step + ':':<{width + 1}} {text}" for step, text in self.steps]
        head = "ALLOWED" if self.allowed else f"REFUSED ({self.reason})"
        lines.append(f"{'decision:':<{width + 1}} {head}")
        lines.append(f"{'why:':<{width + 1}} {self.words}")
        return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    explain = sub.add_parser(
        "explain",
        help="say whether a peer certificate would be admitted on a route, and why",
        description=(
            "Run the gateway's checks for a peer presenting PEER.pem (leaf first, then its "
            "intermediates, as a peer sends them) on route NAME of the gateway configured in FILE: "
            "chain against the trust bundle, identity, allow-list or expected peer, and a real "
            "status query to the CA. Prints the decision and the reason in words. Exit status: "
            "0 allowed, 1 refused, 2 could not check (configuration or file error)."
        ),
    )
    explain.add_argument("--config", "-c", required=True, type=Path, metavar="FILE")
    explain.add_argument("--route", "-r", required=True, metavar="NAME")
    explain.add_argument("--cert", required=True, type=Path, metavar="PEER.pem")
    explain.set_defaults(run=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from s2sgw.material import load_material

    try:
        config = load_config(args.config)
        # A command, not the reactor: the wall clock is the right "now" here.
        now = datetime.datetime.now(datetime.UTC)
        material = load_material(config, now, 1)
        route = find_route(config, args.route)
        chain = read_chain(args.cert)
    except S2sgwError as error:
        print(f"s2sgw explain: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    verdicts: list[Verdict] = []

    def main(reactor: Any) -> Deferred[None]:
        from s2sgw.status.checker import make_status_checker

        checker = make_status_checker(config.status, reactor, material.ca_certificates)
        d = explain(config, material.roots, material.trust_domain or "", route, chain, checker, now)
        d.addCallback(verdicts.append)

        def close(result: object) -> object:
            return checker.close().addCallback(lambda _: result)

        return d.addBoth(close)

    try:
        task.react(main)
    except SystemExit as exit:
        if exit.code not in (0, None) or not verdicts:
            return EXIT_ERROR
    verdict = verdicts[0]
    print(verdict.render())
    return EXIT_ALLOWED if verdict.allowed else EXIT_REFUSED


def find_route(config: GatewayConfig, name: str) -> InboundRoute | OutboundRoute:
    routes = [route for service in config.services for route in (*service.inbound, *service.outbound)]
    for route in routes:
        if route.name == name:
            return route
    known = ", ".join(route.name for route in routes) or "none"
    raise ExplainError(f"{config.path}: no route named {name!r} (routes: {known})")


def read_chain(path: Path) -> list[x509.Certificate]:
    try:
        return pki.load_certificates(path)
    except pki.PKIError as error:
        raise ExplainError(str(error)) from None


def describe_route(route: InboundRoute | OutboundRoute) -> str:
    if isinstance(route, InboundRoute):
        allow = ", ".join(route.allow) if route.allow else "nobody (empty allow-list)"
        return f"{route.name}: inbound to service {route.service} ({route.listen} -> {route.backend}); allows {allow}"
    return f"{route.name}: outbound from service {route.service} to {route.remote}; the remote must be {route.peer}"


def describe_status(config: GatewayConfig) -> str:
    status = config.status
    if status.mode == "ocsp":
        return f"OCSP query to {status.url} (fail = {status.fail})"
    if status.mode == "crl":
        return f"CRL {status.crl} (fail = {status.fail})"
    return 'none: status mode "off" admits every certificate that chains to the bundle'


def explain(
    config: GatewayConfig,
    roots: Sequence[x509.Certificate],
    trust_domain: str,
    route: InboundRoute | OutboundRoute,
    chain: Sequence[x509.Certificate],
    checker: IStatusChecker,
    now: datetime.datetime,
) -> Deferred[Verdict]:
    """Decide on ``chain`` (leaf first, as a peer sends it) for ``route``, as the gateway would."""
    steps: list[tuple[str, str]] = [("route", describe_route(route))]
    if not chain:
        return defer.succeed(Verdict(False, Reason.NO_CLIENT_CERT, "the file holds no certificate", tuple(steps)))
    leaf = chain[0]
    steps.append(("certificate", pki.describe(leaf) + f", issued by {leaf.issuer.rfc4514_string()}"))

    def refused(reason: str, words: str) -> Deferred[Verdict]:
        return defer.succeed(Verdict(False, reason, words, tuple(steps)))

    # 1. What the handshake decides: OpenSSL, then our verify callback (leaf checks, our rules,
    #    the second verifier). Every problem is listed, not only the first.
    problems: list[tuple[str, str]] = []
    for position, certificate in enumerate(chain):
        which = "the peer's certificate" if position == 0 else f"chain certificate {certificate.subject.rfc4514_string()}"
        if now > certificate.not_valid_after_utc:
            problems.append((Reason.EXPIRED, f"{which} expired at {certificate.not_valid_after_utc.isoformat()}."))
        elif now < certificate.not_valid_before_utc:
            problems.append(
                (Reason.NOT_YET_VALID, f"{which} is not valid before {certificate.not_valid_before_utc.isoformat()}.")
            )
    root = pki.issuer_of(chain[-1], roots)
    path = [*chain, root] if root is not None and chain[-1] != root else list(chain)
    try:
        pki.verify_chain(chain, roots, now)
    except pki.PKIError as error:
        if not problems:  # an expired certificate is OpenSSL's complaint too: say it once
            if len(chain) == 1 and root is None:
                hint = " The file holds only the leaf; a peer must send its intermediate certificate too."
            elif root is None:
                hint = " It was issued by a CA this gateway does not trust (another CA, or an old one)."
            else:
                hint = ""
            problems.append(
                (
                    Reason.UNTRUSTED_CHAIN,
                    f"the certificate does not chain to the trust bundle {config.trust}: {error}.{hint}",
                )
            )
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if isinstance(route, InboundRoute) else ExtendedKeyUsageOID.SERVER_AUTH
    problem = tls.leaf_problem(leaf, usage)
    if problem is not None:
        reason, words = problem
        problems.append((reason, f"the TLS layer refuses this certificate: {words}."))
    if root is not None:  # a path to one of our roots: our rules and the second verifier
        strict = StrictVerifier(tuple(roots), usage, tls.VERIFY_DEPTH, clock=now.timestamp)
        problems.extend((reason, f"{detail}.") for reason, detail in strict.problems(path))
    else:  # no path: our rules on what the file holds, with no certificate taken for a root
        problems.extend((p.reason, f"{p.detail}.") for p in rules.problems(path, anchored=False))
    if problems:
        steps.extend(("problem", f"{reason}: {words}") for reason, words in problems)
        reason, words = problems[0]
        if len(problems) > 1:
            words += f" ({len(problems) - 1} more problem{'s' if len(problems) > 2 else ''} listed above.)"
        return refused(reason, words)
    steps.append(
        ("chain", f"verifies against the trust bundle {config.trust}"
         + (f" (root {root.subject.rfc4514_string()})" if root is not None else "")
         + ", passes our rules and the second verifier")
    )

    # 2. The authorizer: identity, allow-list or expected peer, then the status query.
    steps.append(("identity", pki.identity(leaf) or "(none)"))
    steps.append(("status check", describe_status(config)))
    authorizer = Authorizer(checker, trust_domain, fail=config.status.fail)
    d = authorizer.authorize(route, path)  # what OpenSSL hands the gateway: the verified chain up to the root
    d.addCallback(lambda decision: Verdict(decision.allowed, decision.reason, words_for(decision, route, leaf), tuple(steps)))
    return d


def words_for(decision: Decision, route: InboundRoute | OutboundRoute, leaf: x509.Certificate) -> str:
    """The authorizer's decision as a sentence an operator can act on."""
    who = decision.identity or pki.identity(leaf) or leaf.subject.rfc4514_string()
    serial = pki.serial_hex(leaf)
    reason, detail = decision.reason, decision.detail
    if decision.allowed:
        how = (
            f"{who} is on the allow-list of route {route.name}"
            if isinstance(route, InboundRoute)
            else f"{who} is the peer route {route.name} expects"
        )
        if detail.startswith("fail open"):
            return f"{how}, but its status could not be confirmed ({detail}); admitted only because fail = open."
        return f"{how}, and its certificate (serial {serial}) is good."
    if reason == Reason.IDENTITY_NOT_ALLOWED and isinstance(route, InboundRoute):
        if not route.allow:
            return f"route {route.name} allows nobody (its allow-list is empty)."
        return f"{who} is not on the allow-list of route {route.name} (it allows: {', '.join(route.allow)})."
    if reason == Reason.IDENTITY_MISMATCH and isinstance(route, OutboundRoute):
        return f"the remote proves {who}, but route {route.name} expects {route.peer}."
    if reason == Reason.NO_IDENTITY:
        return f"the certificate carries no usable identity: {detail}."
    if reason == Reason.REVOKED:
        return f"the certificate of {who} (serial {serial}) is {detail}: the CA revoked it; issue a new one."
    if reason == Reason.STATUS_UNKNOWN:
        return f"the CA does not know serial {serial} of {who}: it was not issued by this CA's database."
    if reason == Reason.CA_UNREACHABLE:
        return f"the CA status server could not be asked ({detail}), and fail = closed refuses then."
    if reason == Reason.STATUS_INVALID:
        return f"the CA's status answer did not verify ({detail}), and fail = closed refuses then."
    if reason == Reason.UNTRUSTED_CHAIN:
        return f"the chain is incomplete or untrusted: {detail}."
    return f"{reason}: {detail}."
