"""The parent of ``workers = N``: sockets, worker processes, restarts, signals and readiness.

Why a parent: one Python process uses one core. The parent runs no gateway itself; it binds
every route's sockets (:mod:`s2sgw.workers.sockets`) before twistd drops privileges, spawns N
workers (:mod:`s2sgw.workers.child`) that adopt them, and then only supervises:

- a worker that exits is started again on the same sockets (after 0.1 s, doubling up to 5 s
  while it keeps dying young), while the others keep serving;
- SIGHUP is passed to every worker (each reloads its trust material and re-checks its live
  connections, as a single process does); with ``[enrollment]`` the parent, which renews the
  certificates (:mod:`s2sgw.workers.renewal`), reloads its own copy of the trust material
  first. SIGTERM stops the parent, which closes its copies of the sockets, passes SIGTERM on
  and waits for every worker to drain;
- each worker reports READY/RELOADING/STOPPING over a private ``NOTIFY_SOCKET``; the parent
  tells systemd READY=1 once every worker is ready, and frames a reload with RELOADING=1 and
  READY=1 when every worker has finished it.

Workers write finished log lines (the parent's level and format, :func:`s2sgw.ops.logs.worker_observer`)
to their stdout; the parent copies whole lines into its own log files as they are, without
parsing them again. A worker's stderr is logged as warnings.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sgw.config import GatewayConfig
from s2sgw.ops.logs import PREFORMATTED
from s2sgw.ops.metrics import MetricSet
from s2sgw.ops.notify import Notifier, monotonic_usec
from s2sgw.workers.sockets import TCPListen, reuseport_sockets

FIRST_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 5.0
YOUNG = 10.0  # a worker that dies sooner than this after starting backs off further
STOP_GRACE = 15.0  # beyond the drain timeout, before a worker that will not stop is killed


class WorkerMetrics(MetricSet):
    """The parent's own metrics, served beside the workers' sums."""

    def __init__(self) -> None:
        self.restarts = Counter(
            "s2sgw_worker_restarts", "Worker processes started again after they exited.", ["worker"], registry=None
        )
        self.alive = Gauge("s2sgw_workers_alive", "Worker processes running now.", registry=None)
        self.members = (self.restarts, self.alive)


@attrs.define(eq=False)
class Worker:
    """One worker slot: its sockets, its current process and what it last reported."""

    index: int
    fds: dict[str, tuple[int, str]]  # route -> (parent's fd, family)
    process: Any = None  # IProcessTransport while running
    pid: int | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = FIRST_RESTART_DELAY
    ready: bool = False
    reloading: bool = False
    reload_pending: bool = False
    status: str = "starting"
    restart_call: Any = None
    ended: Deferred[None] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None


class _WorkerOutput(ProcessProtocol):
    """A worker's stdout (finished log lines) and stderr, and its exit."""

    _log = Logger(namespace="s2sgw.workers")

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        whole, newline, self._buffer = (self._buffer + data).rpartition(b"\n")
        if newline:
            self._emit(whole + newline)

    def _emit(self, lines: bytes) -> None:
        text = lines.decode("utf-8", "replace")
        self._log.info("{worker_lines}", worker_lines=text.rstrip("\n"), worker=self.worker.index, **{PREFORMATTED: text})

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self._log.warn("worker {worker} stderr: {line}", worker=self.worker.index, line=line)

    def processEnded(self, reason: Failure) -> None:
        if self._buffer.strip():
            self._emit(self._buffer + b"\n")
        self.supervisor.ended(self.worker, reason)


class _WorkerNotifications(DatagramProtocol):
    """sd_notify datagrams of one worker: ``KEY=value`` lines."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines())
        self.supervisor.notified(self.worker, fields)


@attrs.define(eq=False)
class Supervisor(Service):
    """Runs ``config.workers`` worker processes on shared sockets (see the module docstring)."""

    config: GatewayConfig
    reactor: Any
    metrics: WorkerMetrics = attrs.Factory(WorkerMetrics)
    log_level: str = "info"
    log_format: str = "text"
    trust_store: Any = None  # the parent's own copy, reloaded first when it renews certificates
    on_trust_reloaded: Callable[[int], None] | None = None  # after the parent's copy reloaded
    notifier: Notifier | None = attrs.Factory(lambda: Notifier.from_environ(os.environ))
    python: str = sys.executable
    workers: list[Worker] = attrs.field(factory=list, init=False)
    run_dir: Path | None = attrs.field(default=None, init=False)
    stopping: bool = attrs.field(default=False, init=False)
    _sockets: list[socket.socket] = attrs.field(factory=list, init=False)
    _listeners: list[Any] = attrs.field(factory=list, init=False)
    _announced: bool = attrs.field(default=False, init=False)
    _previous_hup: Any = attrs.field(default=None, init=False)
    _reload_waiters: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _log = Logger(namespace="s2sgw.workers")

    # -- start -------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every route's sockets now, before privileges drop: one per route and worker."""
        super().privilegedStartService()
        per_route: dict[str, tuple[list[socket.socket], str]] = {}
        try:
            for service in self.config.services:
                for route in (*service.inbound, *service.outbound):
                    listen = TCPListen.parse(route.listen)
                    made = reuseport_sockets(listen, self.config.workers)
                    self._sockets.extend(made)
                    per_route[route.name] = (made, listen.family)
                    self._log.info(
                        "route {route} listening on {address} in {count} workers",
                        route=route.name, address=_address(made[0]), count=self.config.workers,
                    )  # fmt: skip
        except Exception:
            self._close_sockets()
            raise
        self.workers = [
            Worker(index, {route: (made[index].fileno(), family) for route, (made, family) in per_route.items()})
            for index in range(self.config.workers)
        ]

    def startService(self) -> None:
        super().startService()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self.run_dir = Path(tempfile.mkdtemp(prefix="s2sgw-workers-"))  # 0700: ours alone
        for worker in self.workers:
            port = self.reactor.listenUNIXDatagram(str(self._notify_path(worker)), _WorkerNotifications(self, worker))
            self._listeners.append(port)
            self._spawn(worker)

    def admin_path(self, worker: Worker) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"worker-{worker.index}.sock"

    def _notify_path(self, worker: Worker) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"worker-{worker.index}.notify"

    def _spawn(self, worker: Worker) -> None:
        worker.restart_call = None
        admin = self.admin_path(worker)
        admin.unlink(missing_ok=True)  # a dead predecessor's socket file
        argv = [self.python, "-m", "s2sgw.workers.child", "--config", str(self.config.path),
                "--index", str(worker.index), "--admin", f"unix:{admin}",
                "--log-level", self.log_level, "--log-format", self.log_format]  # fmt: skip
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for number, (route, (fd, family)) in enumerate(sorted(worker.fds.items()), start=3):
            child_fds[number] = fd
            argv += ["--listen", f"{route}={number}:{family}"]
        env = dict(os.environ, NOTIFY_SOCKET=str(self._notify_path(worker)))
        worker.ready = worker.reloading = worker.reload_pending = False
        worker.status = "starting"
        worker.ended = Deferred()
        worker.process = self.reactor.spawnProcess(
            _WorkerOutput(self, worker), self.python, argv, env=env, childFDs=child_fds
        )
        worker.pid = worker.process.pid
        worker.started = self.reactor.seconds()
        self.metrics.alive.set(sum(w.alive for w in self.workers))
        self._log.info("worker {worker} started (pid {pid})", worker=worker.index, pid=worker.pid)

    # -- what workers report ---------------------------------------------------------------------

    def notified(self, worker: Worker, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
        if fields.get("RELOADING") == "1":
            worker.reloading = True
        if fields.get("READY") == "1":
            worker.ready, worker.reloading = True, False
            if worker.reload_pending and worker.process is not None:
                worker.reload_pending, worker.reloading = False, True
                worker.process.signalProcess("HUP")
        if fields.get("STOPPING") == "1":
            worker.ready = False
        self._report()
        self._settle_reloads()

    def ended(self, worker: Worker, reason: Failure) -> None:
        worker.process = None
        worker.ready = False
        # Started again, it loads the files as they are then: no reload of its own is owed.
        worker.reloading = worker.reload_pending = False
        self.metrics.alive.set(sum(w.alive for w in self.workers))
        ended, worker.ended = worker.ended, None
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            self._log.info("worker {worker} (pid {pid}) stopped", worker=worker.index, pid=worker.pid)
            return
        lived = self.reactor.seconds() - worker.started
        worker.delay = min(worker.delay * 2, MAX_RESTART_DELAY) if lived < YOUNG else FIRST_RESTART_DELAY
        worker.restarts += 1
        self.metrics.restarts.labels(str(worker.index)).inc()
        self._log.warn(
            "worker {worker} (pid {pid}) exited ({reason}); starting it again in {delay:.1f} s",
            worker=worker.index, pid=worker.pid, reason=reason.getErrorMessage(), delay=worker.delay,
        )  # fmt: skip
        worker.status = "restarting"
        worker.restart_call = self.reactor.callLater(worker.delay, self._spawn, worker)
        self._report()
        self._settle_reloads()

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(w.ready and not w.reloading for w in self.workers)

    def summary(self) -> str:
        ready = sum(w.ready and not w.reloading for w in self.workers)
        return f"{ready} of {len(self.workers)} workers ready"

    def _report(self) -> None:
        """Tell systemd: READY=1 the first time every worker is ready and after each reload."""
        if self.notifier is None or self.stopping:
            return
        if self.ready and not self._announced:
            self._announced = True
            self.notifier.send(READY=1, STATUS=self.summary())
        else:
            self.notifier.send(STATUS=self.summary())

    # -- signals ---------------------------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """Reload the parent's trust material (if it holds any), then pass a reload to every
        worker (one still starting gets it once it is ready). Fires once no worker has a reload
        running or owed: files written before the call are then in force in every worker."""
        if self.stopping:
            return succeed(None)
        if self.notifier is not None:
            self._announced = False
            self.notifier.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading trust material")
        first = succeed(None) if self.trust_store is None else self.trust_store.reload()
        first.addCallbacks(self._own_reloaded, self._own_refused)
        done: Deferred[None] = Deferred()
        first.addCallback(lambda _: self._pass_reload(done))
        return done

    def _own_reloaded(self, generation: int) -> None:
        self._log.info("reload: parent's trust material at generation {generation}", generation=generation)
        if self.on_trust_reloaded is not None:
            self.on_trust_reloaded(generation)

    def _own_refused(self, failure: Failure) -> None:
        # The workers read the same files and will refuse them too, each keeping its trust.
        self._log.warn("reload: the parent keeps its trust material: {error}", error=failure.getErrorMessage())

    def _pass_reload(self, done: Deferred[None]) -> None:
        self._reload_waiters.append(done)
        if self.stopping:
            self._settle_reloads()
            return
        self._log.info("reload: passing SIGHUP to {count} workers", count=len(self.workers))
        for worker in self.workers:
            if worker.process is not None and worker.ready:
                worker.reloading = True
                worker.process.signalProcess("HUP")
            elif worker.process is not None:
                worker.reload_pending = True
        self._settle_reloads()

    def _settle_reloads(self) -> None:
        """Fire the waiting reloads once no worker is reloading or owed a reload."""
        if not self._reload_waiters:
            return
        if not self.stopping and any(w.reloading or w.reload_pending for w in self.workers):
            return
        waiters, self._reload_waiters = self._reload_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- stop ------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.stopping = True
        self._settle_reloads()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        if self.notifier is not None:
            self.notifier.send(STOPPING=1, STATUS="stopping: workers draining connections")
        # New connections are refused once the workers close theirs too.
        self._close_sockets()
        waits = []
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            if worker.process is not None and worker.ended is not None:
                waits.append(worker.ended)
                worker.process.signalProcess("TERM")
        killer = self.reactor.callLater(self.config.timeouts.drain + STOP_GRACE, self._kill_all)
        done = DeferredList(waits) if waits else succeed(None)

        def finished(result: object) -> None:
            if killer.active():
                killer.cancel()
            self._cleanup()

        return done.addBoth(finished)

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                self._log.warn("worker {worker} (pid {pid}) did not stop; killing it", worker=worker.index, pid=worker.pid)
                worker.process.signalProcess("KILL")

    def _close_sockets(self) -> None:
        while self._sockets:
            self._sockets.pop().close()

    def _cleanup(self) -> None:
        for port in self._listeners:
            port.stopListening()
        self._listeners.clear()
        if self.notifier is not None:
            self.notifier.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"
