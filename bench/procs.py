"""Child processes of one benchmark run: started with raised fd limits, measured from /proc, always stopped.

Every process gets its own session so that a proxy's workers and threads are stopped with it; only
the process groups started here are ever signalled.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import attrs

NOFILE = 65536


class BenchError(Exception):
    """A process or a measurement did not behave; the message says which and why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise this process's open-file limit as far as allowed (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, target), target))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_nofile()


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (nginx workers, forked helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes (all their threads), children that were waited for excluded."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (loopback, IPv4)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def wait_port(port: int, process: subprocess.Popen | None = None, what: str = "", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what or process.args[0]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} ({what}) after {timeout:g} s")


@attrs.define(eq=False)
class Fleet:
    """The processes of one run, each logging to ``directory/NAME.out``."""

    directory: Path
    running: dict[str, subprocess.Popen] = attrs.Factory(dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        if name in self.running:
            raise BenchError(f"{name} started twice")
        with open(self.directory / f"{name}.out", "wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        self.running[name] = process
        return process

    def output(self, name: str) -> str:
        path = self.directory / f"{name}.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def pids(self, name: str) -> list[int]:
        return descendants(self.running[name].pid)

    def check(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise BenchError(f"{name} exited with {process.returncode}:\n{self.output(name)}")

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        _stop([process])

    def stop_all(self) -> None:
        processes = list(self.running.values())
        self.running.clear()
        _stop(processes)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # our own session: the process and its workers
    except (ProcessLookupError, PermissionError):
        pass


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)  # workers that outlived their master, too
        if process.poll() is None:
            process.wait(timeout=10)
