"""The ``s2sgw`` admin command: ``ca ...``, ``check-config``, ``explain``, ``demo``, ``enroll``.

Each group lives beside the code it drives and registers itself here, so this module only
parses arguments and turns :class:`S2sgwError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from s2sgw.errors import S2sgwError


def build_parser() -> argparse.ArgumentParser:
    from s2sgw import __version__, demo
    from s2sgw.ca import commands as ca_commands
    from s2sgw.enroll import command as enroll_command
    from s2sgw.ops import commands, explain

    parser = argparse.ArgumentParser(prog="s2sgw", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"s2sgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ca_commands.register(sub)
    commands.register(sub)
    demo.register(sub)
    enroll_command.register(sub)
    explain.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except S2sgwError as error:
        print(f"s2sgw: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
