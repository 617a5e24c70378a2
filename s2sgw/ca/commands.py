"""``s2sgw ca ...``: init, issue, token, revoke, crl, list.

Thin wrappers over :class:`~s2sgw.ca.authority.CertificateAuthority`: parse, call, report.
Every failure is a :class:`~s2sgw.ca.authority.CAError`, which ``s2sgw.cli`` prints as one line.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from s2sgw.ca.intermediate_commands import open_ca, register_intermediate, root_options, sign_root_crl_from_args
from s2sgw.ca.passphrase import CREDENTIAL, read_passphrase
from s2sgw.ca.authority import (
    KEY_TYPES,
    REVOCATION_REASONS,
    CAError,
    CertificateAuthority,
    CertRecord,
    parse_serial,
    validate_dns_name,
    validate_hours,
    validate_ip,
    validate_service_name,
    write_atomically,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ca`` group and its subcommands to the top-level parser."""
    ca = sub.add_parser(
        "ca",
        help="run the certificate authority: init, issue, token, revoke, crl, list",
        description="Create a CA, issue service identities, revoke them and publish CRLs.",
    )
    commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create a root CA, an issuing CA and an OCSP signer in DIR",
        description="Create an offline root CA, an intermediate issuing CA and a delegated OCSP "
        "signing certificate in DIR. DIR/bundle.pem is the trust bundle.",
    )
    _dir_option(init)
    init.add_argument("--trust-domain", required=True, metavar="DOMAIN", help="e.g. example.internal")
    init.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256", help="default: %(default)s")
    init.add_argument(
        "--url",
        metavar="URL",
        help="public base URL of the status server (http://HOST:PORT); leaves then name URL/crl and URL/ocsp",
    )
    init.add_argument(
        "--root-key-out",
        metavar="PATH",
        type=Path,
        help="write the root's private key to PATH (outside DIR; keep it offline) instead of DIR/root.key",
    )
    init.set_defaults(run=run_init)

    issue = commands.add_parser(
        "issue",
        help="issue a certificate and key for a service",
        description="Write OUTDIR/NAME.pem (leaf, then intermediate) and OUTDIR/NAME.key (0600).",
    )
    _dir_option(issue)
    issue.add_argument("name", metavar="NAME", help="service name: a-z, 0-9 and '-'")
    issue.add_argument("--out", required=True, metavar="OUTDIR", type=Path, help="where to write the files")
    issue.add_argument("--dns", action="append", default=[], metavar="N", help="extra DNS name (repeatable)")
    issue.add_argument("--ip", action="append", default=[], metavar="A", help="IP address SAN (repeatable)")
    issue.add_argument("--hours", type=float, default=24.0, metavar="H", help="lifetime (default: %(default)g)")
    issue.set_defaults(run=run_issue)

    token = commands.add_parser(
        "token",
        help="print a one-time enrollment token for a service",
        description="Print a single-use token that lets NAME enroll over EST (simpleenroll) once, "
        "before it expires. Only the token goes to stdout; the CA keeps only its hash.",
    )
    _dir_option(token)
    token.add_argument("name", metavar="NAME", help="service name: a-z, 0-9 and '-'")
    token.add_argument("--ttl", default="15m", metavar="DURATION", help="time to live, e.g. 60s, 15m, 24h (default: %(default)s)")
    token.add_argument("--dns", action="append", default=[], metavar="N", help="extra DNS name (repeatable)")
    token.set_defaults(run=run_token)

    revoke = commands.add_parser(
        "revoke",
        help="revoke every certificate of a service, or one serial",
        description="Revoke every unrevoked certificate issued to NAME, or the one with --serial.",
    )
    _dir_option(revoke)
    revoke.add_argument("name", metavar="NAME", nargs="?", help="service name")
    revoke.add_argument("--serial", metavar="HEX", help="serial number in hexadecimal")
    revoke.add_argument(
        "--reason", choices=REVOCATION_REASONS, default="unspecified", metavar="REASON",
        help=f"one of {', '.join(REVOCATION_REASONS)} (default: %(default)s)",
    )
    revoke.set_defaults(run=run_revoke)

    crl = commands.add_parser(
        "crl",
        help="write a fresh CRL signed by the issuing CA, or with --root the root's CRL",
        description="Write a CRL with the next CRL number, valid for 24 hours. With --root, sign the "
        "root's CRL instead (revoking issuing CAs with --revoke-intermediate); it is also written to "
        "DIR/root.crl, which the status server publishes at /root.crl.",
    )
    _dir_option(crl)
    crl.add_argument("--out", metavar="FILE", type=Path, help="where to write the CRL (required without --root)")
    crl.add_argument("--pem", action="store_true", help="write PEM instead of DER")
    root_options(crl)
    crl.set_defaults(run=run_crl)

    register_intermediate(commands, _dir_option)

    listing = commands.add_parser("list", help="show every issued certificate and its status")
    _dir_option(listing)
    listing.set_defaults(run=run_list)


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, metavar="DIR", type=Path, help="the CA directory")
    parser.add_argument(
        "--passphrase-file", metavar="FILE", type=Path,
        help=f"the passphrase of the CA's keys (default: $CREDENTIALS_DIRECTORY/{CREDENTIAL} when set; "
        "without one, keys are written unencrypted)",
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_init(args: argparse.Namespace) -> int:
    passphrase = read_passphrase(args.passphrase_file)
    ca = CertificateAuthority.init(
        args.dir,
        args.trust_domain,
        key_type=args.key_type,
        url=args.url,
        root_key_out=args.root_key_out,
        passphrase=passphrase,
    )
    _out(f"created CA for trust domain {ca.trust_domain} in {ca.directory} ({ca.key_type})")
    if passphrase is None:
        _out("keys are NOT encrypted (give --passphrase-file or the systemd credential to encrypt them)")
    else:
        _out(f"keys are encrypted with the passphrase from {passphrase.source}")
    if args.root_key_out is not None:
        _out(f"root key: {args.root_key_out} (not in {ca.directory}; keep it offline)")
    else:
        _out(f"root key: {ca.directory / 'root.key'} (move it offline: see --root-key-out)")
    _out(f"trust bundle: {ca.directory / 'bundle.pem'}")
    if ca.url:
        _out(f"leaves point at {ca.url}/crl and {ca.url}/ocsp")
    return 0


def _prepare_out_dir(out_dir: Path) -> None:
    """Fail before issuing, so an unwritable OUTDIR leaves no unused certificate behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".s2sgw-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CAError(f"cannot write to {out_dir}: {error.strerror}") from None


def run_issue(args: argparse.Namespace) -> int:
    ca = open_ca(args)
    validate_service_name(args.name)
    for name in args.dns:
        validate_dns_name(name)
    for address in args.ip:
        validate_ip(address)
    validate_hours(args.hours, "the lifetime")
    _prepare_out_dir(args.out)
    identity = ca.issue(args.name, dns=args.dns, ips=args.ip, hours=args.hours)
    pem, key = ca.write_identity(identity, args.out)
    record = identity.record
    _out(f"issued {record.name} serial {record.serial_hex} valid until {_time(record.not_after)}")
    _out(f"certificate chain: {pem}")
    _out(f"private key: {key}")
    return 0


def run_token(args: argparse.Namespace) -> int:
    from s2sgw.ca.tokens import TokenBook
    from s2sgw.durations import parse_duration

    validate_service_name(args.name)
    try:
        ttl = datetime.timedelta(seconds=parse_duration(args.ttl))
    except ValueError as error:
        raise CAError(f"--ttl: {error}") from None
    ca = open_ca(args)
    _out(TokenBook(ca.store).create(args.name, dns=args.dns, ttl=ttl, now=_now()))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.serial is None):
        raise CAError("revoke needs exactly one of NAME or --serial HEX")
    ca = open_ca(args)
    serial = None if args.serial is None else parse_serial(args.serial)
    for record in ca.revoke(name=args.name, serial=serial, reason=args.reason):
        _out(f"revoked {record.name} serial {record.serial_hex} ({record.reason})")
    return 0


def run_crl(args: argparse.Namespace) -> int:
    if args.root is None and (args.out is None or args.revoke_intermediate):
        raise CAError("crl needs --out FILE" if args.out is None else "--revoke-intermediate needs --root ROOTKEY")
    ca = open_ca(args)
    crl = ca.make_crl(hours=24.0 if args.hours is None else args.hours) if args.root is None else sign_root_crl_from_args(ca, args)
    encoding = serialization.Encoding.PEM if args.pem else serialization.Encoding.DER
    if args.out is not None:
        write_atomically(args.out, crl.public_bytes(encoding), 0o644)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    where = " and ".join(str(p) for p in (args.out, None if args.root is None else ca.directory / "root.crl") if p)
    whose = "root CRL" if args.root is not None else "CRL"
    _out(f"wrote {whose} number {number} with {len(crl)} entries to {where}, next update {_time(crl.next_update_utc)}")
    return 0


def status_text(record: CertRecord, now: datetime.datetime) -> str:
    state = record.state(now)
    return f"revoked ({record.reason})" if state == "revoked" else state


def run_list(args: argparse.Namespace) -> int:
    ca = open_ca(args)
    now = _now()
    rows = [("SERIAL", "NAME", "NOT AFTER", "ISSUED", "STATUS")]
    rows += [(r.serial_hex, r.name, _time(r.not_after), r.issued_via, status_text(r, now)) for r in ca.records()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0
