"""``s2sgw enroll``: a host's first certificate from a one-time token, its key made here.

The key is generated locally and never leaves the host. The CA is found by URL and trusted by
the SHA-256 fingerprint of its root, given out of band with the token (as ``step ca bootstrap
--fingerprint``): the first ``/cacerts`` is fetched without verification and accepted only if it
holds that root; from then on every request, the one carrying the token first, is verified
against that root, host name included. Nothing is written unless everything checked out; then
``NAME.pem`` (leaf + intermediate), ``NAME.key`` (0600) and ``bundle.pem`` (the CA's roots) are
written together.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.task import react
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from s2sgw import pki
from s2sgw.enroll.client import (
    DEFAULT_TIMEOUT,
    KEY_TYPES,
    BootstrapTLS,
    ESTClient,
    PinnedTLS,
    certs_pem,
    issued_chain,
    key_pem,
    make_csr,
    new_key,
    pinned_root,
)
from s2sgw.errors import S2sgwError
from s2sgw.files import write_files
from s2sgw.wire import est

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
BUNDLE = "bundle.pem"

InThread = Callable[..., "defer.Deferred[Any]"]


class EnrollError(S2sgwError):
    """Enrollment failed; nothing was written."""


@attrs.frozen
class EnrollRequest:
    """Checked command-line arguments of one enrollment."""

    urls: tuple[str, ...]
    fingerprint: str  # lower-case hex
    name: str
    token: str = attrs.field(repr=False)
    out: Path
    key_type: str = "ecdsa-p256"
    timeout: float = DEFAULT_TIMEOUT


@attrs.frozen
class Enrolled:
    """What an enrollment brought back, checked, ready to be written."""

    chain: tuple[x509.Certificate, ...]
    key: pki.PrivateKey = attrs.field(repr=False)
    roots: tuple[x509.Certificate, ...]

    def files(self, out: Path, name: str) -> list[tuple[Path, bytes, int]]:
        return [
            (out / f"{name}.key", key_pem(self.key), 0o600),
            (out / f"{name}.pem", certs_pem(self.chain), 0o644),
            (out / BUNDLE, certs_pem(self.roots), 0o644),
        ]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "enroll",
        help="get this host's first certificate from the CA with a one-time token (EST)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--ca", action="append", required=True, metavar="URL",
                        help="the CA's EST server, https://HOST:PORT (repeat to try others in order)")
    parser.add_argument("--fingerprint", required=True,
                        help="SHA-256 fingerprint of the CA's root (as `openssl x509 -noout -fingerprint -sha256` prints it)")
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the one-time token from `s2sgw ca token`")
    token.add_argument("--token-file", type=Path, help="read the token from this file (keeps it out of `ps`)")
    parser.add_argument("--name", required=True, help="the service name the token was made for")
    parser.add_argument("--out", required=True, type=Path, help="directory for NAME.pem, NAME.key and bundle.pem")
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256", help="default: ecdsa-p256")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request (default 30)")
    parser.set_defaults(run=run)


def parse_request(args: argparse.Namespace) -> EnrollRequest:
    """Check the arguments; EnrollError says which one is wrong."""
    urls = []
    for url in args.ca:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise EnrollError(f"--ca {url!r}: expected https://HOST:PORT")
        urls.append(url)
    try:
        fingerprint = est.normalize_fingerprint(args.fingerprint)
    except est.WireFormatError as error:
        raise EnrollError(f"--fingerprint: {error}") from None
    if not _NAME.match(args.name):
        raise EnrollError(f"--name {args.name!r}: expected letters, digits, '.', '_' or '-'")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as error:
            raise EnrollError(f"--token-file {args.token_file}: {error.strerror}") from None
    else:
        token = args.token.strip()
    if not token:
        raise EnrollError("the token is empty")
    if not args.timeout > 0:
        raise EnrollError("--timeout must be a positive number of seconds")
    return EnrollRequest(tuple(urls), fingerprint, args.name, token, args.out, args.key_type, args.timeout)


async def enroll(
    reactor: Any,
    request: EnrollRequest,
    *,
    http: Callable[[Any], Any] | None = None,
    in_thread: InThread = deferToThread,
) -> Enrolled:
    """Pin the root, send the CSR with the token, check the answer. Writes nothing."""
    key = await in_thread(new_key, request.key_type)
    bootstrap = ESTClient(request.urls, reactor, BootstrapTLS(), request.timeout, http)
    root = pinned_root(await bootstrap.cacerts(), request.fingerprint)
    pinned = ESTClient(request.urls, reactor, PinnedTLS((root,)), request.timeout, http)
    # The bundle comes from an answer verified against the pinned root: the unverified
    # bootstrap answer could have carried a stranger's root beside ours.
    published = await pinned.cacerts()
    pinned_root(published, request.fingerprint)
    roots = tuple(est.roots_in(published))
    issued = await pinned.simpleenroll(make_csr(key, request.name), request.name, request.token)
    now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
    chain = issued_chain(issued, key, (root,), now)
    return Enrolled(tuple(chain), key, roots)


def write_enrolled(enrolled: Enrolled, out: Path, name: str) -> list[Path]:
    """Write the three files, all or none (blocking). Existing files keep owner, group and mode."""
    out.mkdir(parents=True, exist_ok=True)
    files = enrolled.files(out, name)
    write_files(files, keep_owner=True)
    return [path for path, _, _ in files]


def run(args: argparse.Namespace) -> int:
    request = parse_request(args)
    outcome: list[Any] = []

    async def main(reactor: Any) -> None:
        try:
            enrolled = await enroll(reactor, request)
            paths = await deferToThread(write_enrolled, enrolled, request.out, request.name)
            outcome.append((enrolled, paths))
        except BaseException:  # reported after the reactor stops
            outcome.append(Failure())

    try:
        react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit:
        pass
    if not outcome:
        raise EnrollError("interrupted; nothing was written")
    result = outcome[0]
    if isinstance(result, Failure):
        raise EnrollError(f"enrollment of {request.name} failed, nothing written: {_reason(result)}")
    enrolled, paths = result
    leaf = enrolled.chain[0]
    sys.stdout.write(
        f"enrolled {pki.identity(leaf) or request.name}: serial {pki.serial_hex(leaf)}, "
        f"valid until {leaf.not_valid_after_utc.isoformat()}\n"
        + "".join(f"  wrote {path}\n" for path in paths)
    )
    return 0


def _reason(failure: Failure) -> str:
    if failure.check(S2sgwError):
        return str(failure.value)
    if failure.check(OSError):
        error = failure.value
        return f"cannot write {error.filename}: {error.strerror}"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"
