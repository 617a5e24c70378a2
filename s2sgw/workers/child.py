"""One worker process: the whole gateway on sockets its parent made, logging to the parent.

    python -m s2sgw.workers.child --config FILE --index N --listen ROUTE=FD:FAMILY ... --admin unix:PATH
        [--log-level LEVEL] [--log-format text|json]

Started only by :class:`~s2sgw.workers.supervisor.Supervisor`. The worker runs the same
gateway as a single process (:func:`s2sgw.service.build_gateway`, :mod:`s2sgw.reactor`): it
follows the revocation feed itself, reloads on SIGHUP and drains on SIGTERM. Its routes adopt
the inherited sockets; its admin endpoint listens on a private unix socket the parent asks for
metrics and status; it reports readiness through the ``NOTIFY_SOCKET`` the parent gives it;
its log lines go to stdout already formatted, and the parent copies them into its own log.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import signal
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from s2sgw.ops.logs import FORMATS, LEVELS

PR_SET_PDEATHSIG = 1
LOG_FLUSH_INTERVAL = 0.05  # seconds: log records reach the parent in batches at most this old


class BatchedOutput:
    """The worker's stdout for finished log lines, flushed on a timer instead of after each line.

    Why: a record per pipe write costs the parent a wake-up and a read per log event (several
    per connection); batching them costs at most ``LOG_FLUSH_INTERVAL`` of delay, and the
    records of the last interval if the worker is killed with SIGKILL.
    """

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> None:
        self._out.write(text)

    def flush(self) -> None:
        """Called by the log observer after every record: left to :meth:`flush_now`."""

    def flush_now(self) -> None:
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass  # the parent is gone: nothing to tell it


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m s2sgw.workers.child")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="ROUTE=FD:FAMILY (inet or inet6)")
    parser.add_argument("--admin", required=True, help="the private admin endpoint, unix:PATH")
    parser.add_argument("--log-level", default="info", choices=LEVELS)
    parser.add_argument("--log-format", default="text", choices=FORMATS)
    return parser.parse_args(argv)


def listen_fds(items: Sequence[str]) -> dict[str, tuple[int, str]]:
    """``ROUTE=FD:FAMILY`` arguments -> {route: (fd, family)}."""
    found = {}
    for item in items:
        route, _, where = item.partition("=")
        fd, _, family = where.partition(":")
        found[route] = (int(fd), family)
    return found


def die_with_parent() -> None:
    """SIGTERM this worker if its parent dies (Linux), so no worker outlives its supervisor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def build(args: argparse.Namespace, reactor: Any) -> Any:
    """The gateway service of this worker, on its inherited sockets."""
    from s2sgw.config import AdminConfig, load_config
    from s2sgw.service import build_gateway
    from s2sgw.truststore import TrustStore
    from s2sgw.workers.sockets import AdoptedEndpoint

    config = load_config(args.config)
    # The trust store keeps the file's configuration, so that a reload compares like with like.
    trust_store = TrustStore.load(config)
    probe = config.admin.probe_interval if config.admin is not None else 5.0
    # The parent renews the certificates (s2sgw.workers.renewal); a worker takes them on SIGHUP.
    worker_config = attrs.evolve(
        config, workers=1, admin=AdminConfig(args.admin, probe_interval=probe), enrollment=None
    )
    endpoints = {
        route: functools.partial(AdoptedEndpoint, reactor, fd, family)
        for route, (fd, family) in listen_fds(args.listen).items()
    }
    service, _ = build_gateway(worker_config, trust_store, reactor, listen_endpoints=endpoints)
    return service


def stop_once_on_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop the worker once. A worker usually hears SIGTERM twice, from its
    parent and from systemd's control-group kill; Twisted's own handler would stop a stopping
    reactor on the second and log ReactorNotRunning."""
    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signum)
            reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: Sequence[str] | None = None) -> int:
    # Until the reload service takes SIGHUP over, a reload request must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent()
    args = parse_args(argv)
    from twisted.internet.task import LoopingCall
    from twisted.logger import Logger, globalLogBeginner

    from s2sgw.ops.logs import worker_observer
    from s2sgw.reactor import install

    reactor = install()
    output = BatchedOutput(open(sys.stdout.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False))
    observer = worker_observer(output, args.log_level, args.log_format, args.index)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    log = Logger(namespace="s2sgw.workers")
    try:
        try:
            service = build(args, reactor)
            service.privilegedStartService()
        except Exception:
            log.failure("worker {index} could not start", index=args.index)
            return 3
        flushing = LoopingCall(output.flush_now)
        flushing.clock = reactor
        flushing.start(LOG_FLUSH_INTERVAL)
        reactor.callWhenRunning(service.startService)
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        stop_once_on_signals(reactor)
        reactor.run(installSignalHandlers=False)
        return 0
    finally:
        output.flush_now()


if __name__ == "__main__":
    sys.exit(main())
