"""What the second verifier costs per new connection: CPU per mTLS handshake with it and without.

    python -m bench.verify_bench [--handshakes 200] [--rounds 5] [--kinds ecdsa-p256,rsa3072,ed25519]

For each key type a CA made with ``s2sgw.ca.authority`` issues a server and a client identity.
Handshakes run in this process between the gateway's own contexts (``tls.server_context`` and
``tls.client_context``) over memory BIOs, no sockets and no reactor, so the figures are TLS and
verification CPU only, in three variants of the same contexts:

* *without*: the verify callback has no strict verifier (OpenSSL and the leaf checks only);
* *new path*: as the gateway builds them, each handshake with a path the verifiers have not seen
  (their memory of accepted paths is emptied first): a peer's first connection;
* *seen path*: as the gateway builds them, the same peers again: every later connection of a
  certificate, answered from the memory of accepted paths.

Both sides verify the other, so a handshake pair runs two strict checks: the CPU added per side
is half the difference with *without*. It is also given against the inbound gateway's whole CPU
per new connection as the handshake figure measured it (docs/benchmarks.rst). Variants alternate
round by round; figures are medians. CPU is this process's user+system time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from s2sgw import pki, tls
from s2sgw import handshake
from s2sgw.ca.authority import CertificateAuthority
from s2sgw.verify.strict import StrictVerifier

KINDS = ("ecdsa-p256", "rsa3072", "ed25519")
# CPU of the inbound gateway per new TLS 1.3 connection in the quiet re-run of the handshake
# figure (docs/benchmarks.rst): TLS, Twisted, authorization, the backend dial and the audit line.
GATEWAY_US_PER_CONNECTION = 2900


class _Target:
    """Stands in for the TLS protocol our verify callback records its verdict on."""


class Identity:
    def __init__(self, ca: CertificateAuthority, name: str) -> None:
        issued = ca.issue(name)
        self.chain = pki.parse_certificates(issued.chain_pem)
        self.key = pki.parse_private_key(issued.key_pem)
        self.roots = [ca.root_cert]


def _contexts(server: Identity, client: Identity, strict: bool) -> tuple[SSL.Context, SSL.Context, list]:
    """(server context, client context, their strict verifiers): as the gateway builds them, or
    with only OpenSSL and the leaf checks judging the peer."""
    server_context = tls.server_context(server.chain, server.key, server.roots)
    client_context = tls.client_context(client.chain, client.key, client.roots)
    verifiers = []
    for context, mode, usage, roots in (
        (server_context, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, ExtendedKeyUsageOID.CLIENT_AUTH, server.roots),
        (client_context, SSL.VERIFY_PEER, ExtendedKeyUsageOID.SERVER_AUTH, client.roots),
    ):
        verifier = StrictVerifier(tuple(roots), usage, tls.VERIFY_DEPTH) if strict else None
        context.set_verify(mode, tls._Verifier(usage, verifier))  # the same callback tls.py installs
        verifiers.append(verifier)
    return server_context, client_context, verifiers


def _move(source: SSL.Connection, sink: SSL.Connection) -> bool:
    try:
        data = source.bio_read(1 << 16)
    except SSL.WantReadError:
        return False
    sink.bio_write(data)
    return True


def mutual_handshake(server_context: SSL.Context, client_context: SSL.Context) -> None:
    """One full mutual handshake in memory; raises unless both sides verified the other."""
    server, client = SSL.Connection(server_context, None), SSL.Connection(client_context, None)
    targets = (_Target(), _Target())
    server.set_app_data(targets[0])
    client.set_app_data(targets[1])
    server.set_accept_state()
    client.set_connect_state()
    done = [False, False]
    for _ in range(50):
        for index, connection in enumerate((client, server)):
            if not done[index]:
                try:
                    connection.do_handshake()
                    done[index] = True
                except SSL.WantReadError:
                    pass
        moved = _move(client, server) | _move(server, client)
        if all(done) and not moved:
            break
    if not all(done) or any(handshake.chain_error(target) for target in targets):
        raise SystemExit(f"handshake failed: {[handshake.chain_error(t) for t in targets]}")
    if not server.get_verified_chain() or not client.get_verified_chain():
        raise SystemExit("handshake completed without verified chains")


def _cpu_per_call(call: Callable[[], object], count: int) -> float:
    """Microseconds of CPU per call of ``call``."""
    start = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - start) / count * 1e6


def measure(kind: str, directory: Path, handshakes: int, rounds: int) -> dict[str, float]:
    ca = CertificateAuthority.init(directory / kind, "bench.s2sgw.test", key_type=kind)
    server, client = Identity(ca, "server"), Identity(ca, "client")
    without = _contexts(server, client, False)
    strict = _contexts(server, client, True)

    def forgetting() -> None:
        for verifier in strict[2]:
            verifier._accepted.clear()
        mutual_handshake(strict[0], strict[1])

    variants: dict[str, Callable[[], None]] = {
        "without": lambda: mutual_handshake(without[0], without[1]),
        "new path": forgetting,
        "seen path": lambda: mutual_handshake(strict[0], strict[1]),
    }
    for run in variants.values():  # warm up: imports, caches
        for _ in range(5):
            run()
    figures: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_number in range(rounds):
        for name in names[round_number % 3 :] + names[: round_number % 3]:
            figures[name].append(_cpu_per_call(variants[name], handshakes))
    result = {name: statistics.median(values) for name, values in figures.items()}
    path = [*client.chain, ca.root_cert]
    checker = StrictVerifier((ca.root_cert,), ExtendedKeyUsageOID.CLIENT_AUTH, tls.VERIFY_DEPTH)
    ders = [certificate.public_bytes(serialization.Encoding.DER) for certificate in path]

    def check_fresh() -> None:  # fresh objects, as the verify callback has them, and nothing remembered
        checker._accepted.clear()
        assert checker.check([x509.load_der_x509_certificate(der) for der in ders]) is None

    parse = statistics.median(
        _cpu_per_call(lambda: [x509.load_der_x509_certificate(der) for der in ders], handshakes) for _ in range(rounds)
    )
    result["check"] = statistics.median(_cpu_per_call(check_fresh, handshakes) for _ in range(rounds)) - parse
    return result


def render(results: dict[str, dict[str, float]]) -> str:
    header = (
        f"{'key type':<11} {'without':>8} {'new path':>9} {'seen path':>10} {'check':>6} "
        f"{'added/side new':>15} {'seen':>6} {'new vs gateway':>15} {'seen vs gateway':>16}"
    )
    lines = [header, "-" * len(header)]
    for kind, f in results.items():
        new = (f["new path"] - f["without"]) / 2
        seen = (f["seen path"] - f["without"]) / 2
        lines.append(
            f"{kind:<11} {f['without']:>5.0f} us {f['new path']:>6.0f} us {f['seen path']:>7.0f} us {f['check']:>3.0f} us "
            f"{new:>12.0f} us {seen:>3.0f} us {new / GATEWAY_US_PER_CONNECTION:>15.1%} "
            f"{seen / GATEWAY_US_PER_CONNECTION:>16.1%}"
        )
    lines.append("")
    lines.append(
        "without / new path / seen path: CPU of one in-memory handshake pair (both sides); check: the strict "
        "verifier alone on a path it has not seen; added/side: half the difference with 'without'; vs gateway: "
        f"against {GATEWAY_US_PER_CONNECTION} us, the inbound gateway's CPU per new TLS 1.3 connection "
        "(docs/benchmarks.rst)."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=200, help="handshakes per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"CA key types, of: {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise SystemExit(f"unknown key type {kind!r}")
    with tempfile.TemporaryDirectory(prefix="s2sgw-verify-bench-") as directory:
        results = {kind: measure(kind, Path(directory), args.handshakes, args.rounds) for kind in kinds}
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
