"""The demo's child processes: ``twistd`` programs and ``s2sgw`` commands, run by the reactor.

``spawnProcess`` keeps the reactor free while children start, run and exit; a child that dies
early is noticed at the next check and named in the error.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from s2sgw.errors import S2sgwError

STOP_TIMEOUT = 10.0  # seconds a child gets to drain after SIGTERM before SIGKILL


class DemoFailed(S2sgwError):
    """A step did not behave as the demo says it should."""


class _Child(ProcessProtocol):
    """One spawned program: its exit status once it has ended, and a Deferred for that moment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status: int | None = None
        self._waiters: list[Deferred[None]] = []

    def when_ended(self) -> Deferred[None]:
        """A new Deferred for the end of the process: cancelling it leaves the others alone."""
        if self.status is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def processEnded(self, reason: Failure) -> None:
        self.status = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None) or -1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)


@attrs.define(eq=False)
class Children:
    """Every process the demo started, stopped together at the end."""

    reactor: Any
    workdir: Path
    _children: list[tuple[_Child, Any]] = attrs.Factory(list)

    def spawn_twistd(self, name: str, plugin_args: list[str]) -> None:
        twistd = str(Path(sys.executable).parent / "twistd")
        log = self.workdir / f"{name}.log"
        argv = [twistd, "--nodaemon", "--pidfile=", f"--logfile={log}", *plugin_args]
        child = _Child(name)
        transport = self.reactor.spawnProcess(
            child, twistd, argv, env=os.environ.copy(), path=str(self.workdir), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._children.append((child, transport))

    def pid(self, name: str) -> int:
        return next(transport.pid for child, transport in self._children if child.name == name)

    def check(self) -> None:
        """Raise DemoFailed naming the first child that has already exited."""
        for child, _ in self._children:
            if child.status is not None:
                raise DemoFailed(f"{child.name} exited with status {child.status}; see {self.workdir / child.name}.log")

    async def command(self, *args: str) -> str:
        """Run ``s2sgw ARGS`` and return its stdout, or raise DemoFailed with its stderr."""
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "s2sgw.cli", *args], env=os.environ.copy(), path=str(self.workdir), reactor=self.reactor
        )
        if code != 0:
            raise DemoFailed(f"s2sgw {args[0]} failed: {err.decode(errors='replace').strip()}")
        return out.decode()

    async def stop(self) -> None:
        """SIGTERM to every child still running, SIGKILL to those not gone within STOP_TIMEOUT."""
        running = [(child, transport) for child, transport in self._children if child.status is None]
        for _, transport in running:
            _signal(transport, "TERM")
        ended = DeferredList([child.when_ended() for child, _ in running])
        ended.addTimeout(STOP_TIMEOUT, self.reactor)
        try:
            await ended
        except Exception:
            for child, transport in running:
                if child.status is None:
                    _signal(transport, "KILL")
            await DeferredList([child.when_ended() for child, _ in running])
        self._children.clear()

    def kill_now(self) -> None:
        """After the reactor has stopped (Ctrl-C): no child may outlive the demo."""
        for child, transport in self._children:
            if child.status is None and transport.pid is not None:
                try:
                    os.kill(transport.pid, signal.SIGKILL)
                    os.waitpid(transport.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        self._children.clear()


def _signal(transport: Any, name: str) -> None:
    try:
        transport.signalProcess(name)
    except Exception:  # gone between the check and the signal
        pass
