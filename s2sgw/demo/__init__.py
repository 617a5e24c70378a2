"""``s2sgw demo``: the whole architecture, running, in one command.

A throwaway PKI, the CA status server and the gateways run as real ``twistd`` processes; a sample
REST "users" service runs in this process behind its gateway, and this process also plays the
calling services. Each gateway enrolls with a one-time token (its key is made on its side) and
renews its short-lived certificate on its own. Every step checks what it shows and the demo exits
non-zero when one does not.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from s2sgw.demo.children import Children, DemoFailed
from s2sgw.demo.scenario import Demo, say
from s2sgw.errors import S2sgwError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the quickstart demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="host every gateway in one twistd process instead of one process per side",
    )
    parser.add_argument("--workdir", help="keep the PKI, configs and logs here instead of a temporary directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="s2sgw-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir=workdir.resolve(), one_process=args.one_process)
    outcome: list[BaseException] = []
    completed: list[bool] = []

    async def main(reactor: Any) -> None:
        demo.reactor = reactor
        demo.children = Children(reactor, demo.workdir)
        try:
            await demo.run()
            completed.append(True)
        except BaseException as error:  # reported after the reactor stops
            outcome.append(error)
        finally:
            await demo.children.stop()

    try:
        react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            outcome.append(DemoFailed(f"reactor exited with {exit_.code}"))
    finally:
        if demo.children is not None:
            demo.children.kill_now()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if outcome:
        error = outcome[0]
        if isinstance(error, S2sgwError):
            raise error
        raise DemoFailed(f"{type(error).__name__}: {error}") from error
    if not completed:  # Ctrl-C stopped the reactor before the last step
        say("\nInterrupted; every process the demo started was stopped.")
        return 130
    say("\nAll steps behaved as shown.")
    return 0
