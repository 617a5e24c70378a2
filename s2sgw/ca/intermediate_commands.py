"""``s2sgw ca intermediate`` and ``s2sgw ca crl --root``: the commands that take the offline root."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from s2sgw.ca.inputs import (
    REVOCATION_REASONS,
    parse_serial,
    validate_hours,
    validate_reason,
)
from s2sgw.ca.passphrase import Passphrase, read_passphrase
from s2sgw.ca.store import CAError
from s2sgw.serials import serial_text

if TYPE_CHECKING:
    from s2sgw.ca.authority import CertificateAuthority


def open_ca(args: argparse.Namespace) -> CertificateAuthority:
    """The CA of ``--dir`` (its state in ``--store`` when given), its keys opened with the
    passphrase of ``--passphrase-file`` (or the systemd credential)."""
    from s2sgw.ca.authority import CertificateAuthority

    return CertificateAuthority.open(args.dir, read_passphrase(args.passphrase_file), store=args.store)


def _root_passphrase(args: argparse.Namespace, ca: CertificateAuthority) -> Passphrase | None:
    """``--root-passphrase-file`` when given, else the CA's own passphrase."""
    if args.root_passphrase_file is not None:
        return read_passphrase(args.root_passphrase_file)
    return ca.passphrase


def _root_passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root-passphrase-file", metavar="FILE", type=Path,
        help="the passphrase of the root key, when it differs from the CA's (--passphrase-file)",
    )


def root_options(parser: argparse.ArgumentParser) -> None:
    """``--root``, ``--revoke-intermediate``, ``--reason`` and ``--hours`` of ``s2sgw ca crl``."""
    parser.add_argument("--root", metavar="ROOTKEY", type=Path, help="the root's key: sign the root's CRL")
    parser.add_argument(
        "--revoke-intermediate", action="append", default=[], metavar="HEX",
        help="with --root: revoke the issuing CA with this serial (repeatable)",
    )
    parser.add_argument(
        "--reason", choices=REVOCATION_REASONS, default="unspecified", metavar="REASON",
        help="with --revoke-intermediate: the reason (default: %(default)s)",
    )
    parser.add_argument(
        "--hours", type=float, default=None, metavar="H", help="lifetime of the CRL in hours (default: 24, with --root 720)"
    )
    _root_passphrase_option(parser)


def register_intermediate(commands: argparse._SubParsersAction, dir_option: Callable[[argparse.ArgumentParser], None]) -> None:
    intermediate = commands.add_parser(
        "intermediate",
        help="make a new issuing CA with the offline root key, or retire a previous one",
        description="With --root-key: make a new issuing CA and OCSP signer; new leaves are signed by it, "
        "and the previous one keeps answering for its leaves (DIR/previous/SERIAL) until retired. "
        "With --retire HEX: delete a previous issuing CA once its leaves are renewed.",
    )
    dir_option(intermediate)
    action = intermediate.add_mutually_exclusive_group(required=True)
    action.add_argument("--root-key", metavar="PATH", type=Path, help="the root's private key (kept offline)")
    action.add_argument("--retire", metavar="HEX", help="serial of a previous issuing CA to retire")
    intermediate.add_argument("--force", action="store_true", help="retire even with unexpired leaves left")
    _root_passphrase_option(intermediate)
    intermediate.set_defaults(run=run_intermediate)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def run_intermediate(args: argparse.Namespace) -> int:
    from s2sgw.ca.rotation import load_root_key, new_intermediate, retire_intermediate

    ca = open_ca(args)
    if args.retire is not None:
        cert = retire_intermediate(ca, parse_serial(args.retire), now=_now(), force=args.force)
        _out(f"retired issuing CA {serial_text(cert.serial_number)} ({cert.subject.rfc4514_string()})")
        return 0
    old = ca.intermediate_cert
    cert = new_intermediate(ca, load_root_key(ca, args.root_key, _root_passphrase(args, ca)), now=_now())
    _out(f"new issuing CA {serial_text(cert.serial_number)} ({cert.subject.rfc4514_string()}) "
         f"valid until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    _out(f"previous issuing CA {serial_text(old.serial_number)} kept in {ca.directory / 'previous'} "
         "until `s2sgw ca intermediate --retire`")
    return 0


def sign_root_crl_from_args(ca: CertificateAuthority, args: argparse.Namespace) -> x509.CertificateRevocationList:
    from s2sgw.ca.rotation import ROOT_CRL_HOURS, load_root_key, sign_root_crl

    hours = ROOT_CRL_HOURS if args.hours is None else validate_hours(args.hours, "the root CRL lifetime")
    validate_reason(args.reason)
    serials = [parse_serial(text) for text in args.revoke_intermediate]
    root_key = load_root_key(ca, args.root, _root_passphrase(args, ca))
    if not serials and args.reason != "unspecified":
        raise CAError("--reason needs --revoke-intermediate")
    return sign_root_crl(ca, root_key, revoke=serials, reason=args.reason, hours=hours, now=_now())
