"""Workers without processes: the configuration key, the shared sockets, the supervisor's
decisions (on a Clock, with recorded processes) and the merged metrics."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from s2sgw.config import ConfigError, load_config
from s2sgw.workers.admin import merge_metrics, render_metrics
from s2sgw.workers.child import listen_fds
from s2sgw.workers.renewal import RELOAD_WAIT, reload_everywhere
from s2sgw.workers.sockets import TCPListen, check_free, reuseport_sockets
from s2sgw.workers.supervisor import FIRST_RESTART_DELAY, MAX_RESTART_DELAY, Supervisor

CONFIG = """
trust = "bundle.pem"
{workers}
[status]
mode = "off"
[timeouts]
drain = 1
[[service]]
name = "orders"
cert = "orders.pem"
key = "orders.key"
  [[service.inbound]]
  name = "orders-in"
  listen = "{listen}"
  backend = "tcp:127.0.0.1:8080"
"""


def config_file(tmp_path: Path, workers: str = "workers = 2", listen: str = "tcp:0:interface=127.0.0.1") -> Path:
    for name in ("bundle.pem", "orders.pem", "orders.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(workers=workers, listen=listen))
    return path


# -- configuration -----------------------------------------------------------------------------


def test_workers_default_to_one_and_auto_means_the_cpus(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, "")).workers == 1
    assert load_config(config_file(tmp_path, "workers = 3")).workers == 3
    assert load_config(config_file(tmp_path, 'workers = "auto"')).workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("workers", "listen", "expected"),
    [
        ("workers = 0", "tcp:0", "workers: must be at least 1"),
        ('workers = "many"', "tcp:0", "workers: expected an integer"),
        ("workers = 2", "unix:/run/orders.sock", "service[0].inbound[0].listen: 'unix:/run/orders.sock': with more "
                                                 "than one worker, listen addresses must be tcp:"),
    ],
)  # fmt: skip
def test_bad_workers_settings_name_the_key(tmp_path: Path, workers: str, listen: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, workers, listen))
    assert expected in str(info.value)


def test_one_worker_may_listen_anywhere(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, "workers = 1", "unix:/run/orders.sock")).workers == 1


# -- sockets ---------------------------------------------------------------------------------------


def test_every_worker_gets_its_own_socket_on_one_port() -> None:
    made = reuseport_sockets(TCPListen(0, "127.0.0.1", 5), 3)
    try:
        ports = {sock.getsockname()[1] for sock in made}
        assert len(ports) == 1 and len({sock.fileno() for sock in made}) == 3
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass  # accepted into one of the queues
    finally:
        for sock in made:
            sock.close()


def test_an_address_something_listens_on_is_in_use_even_with_reuseport() -> None:
    """A second gateway must not quietly join the first one's SO_REUSEPORT group."""
    first = reuseport_sockets(TCPListen(0, "127.0.0.1", 5), 2)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(OSError) as info:
            reuseport_sockets(TCPListen(port, "127.0.0.1", 5), 2)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        for sock in first:
            sock.close()
    check_free(TCPListen(port, "127.0.0.1", 5))  # free again once closed


def test_a_worker_adopts_its_socket_as_an_eager_port_that_hears_of_descriptor_shortage() -> None:
    """The route's out-of-descriptors hook reaches the adopted port, as with its own endpoint."""
    from twisted.internet.protocol import Factory

    from s2sgw.reactor import DirectEventsReactor
    from s2sgw.transport import EagerPort
    from s2sgw.workers.sockets import AdoptedEndpoint

    reactor = DirectEventsReactor()
    (sock,) = reuseport_sockets(TCPListen(0, "127.0.0.1", 5), 1)
    fd = os.dup(sock.fileno())  # what the worker inherits
    heard: list = []
    try:
        ports: list = []
        AdoptedEndpoint(reactor, fd, "inet", heard.append).listen(Factory()).addCallback(ports.append)
        (port,) = ports
        assert isinstance(port, EagerPort) and port.on_no_descriptors == heard.append
        assert port.getHost().port == sock.getsockname()[1]
        with pytest.raises(OSError):
            os.fstat(fd)  # the inherited descriptor is closed once adopted: the port holds a duplicate
        port.stopListening()
    finally:
        sock.close()
        reactor._poller.close()


def test_tcp_listen_descriptions_are_read_like_twisteds() -> None:
    assert TCPListen.parse("tcp:8443:interface=\\:\\:1:backlog=7") == TCPListen(8443, "::1", 7)
    assert TCPListen.parse("tcp:8443:interface=\\:\\:1").family == "inet6"
    assert TCPListen.parse("tcp:8443").family == "inet"
    assert listen_fds(["orders-in=3:inet", "b=4:inet6"]) == {"orders-in": (3, "inet"), "b": (4, "inet6")}


# -- the supervisor --------------------------------------------------------------------------------


@attrs.define
class RecordedProcess:
    protocol: Any
    argv: list[str]
    env: dict[str, str]
    child_fds: dict[int, Any]
    pid: int
    signals: list[str] = attrs.Factory(list)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(code, signal)))


@attrs.define
class _Port:
    stopped: bool = False

    def stopListening(self) -> None:
        self.stopped = True


class ProcessReactor(Clock):
    """A Clock that records spawned processes and notification sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[RecordedProcess] = []
        self.notify_ports: dict[str, Any] = {}

    def spawnProcess(self, protocol, executable, args, env, childFDs):  # noqa: N802, N803
        process = RecordedProcess(protocol, args, env, childFDs, 1000 + len(self.processes))
        protocol.makeConnection(process)
        self.processes.append(process)
        return process

    def listenUNIXDatagram(self, path, protocol):  # noqa: N802
        self.notify_ports[path] = protocol
        return _Port()

    def callFromThread(self, f, *args):  # noqa: N802
        f(*args)


@attrs.define
class RecordedNotifier:
    sent: list[dict] = attrs.Factory(list)

    def send(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def supervised(tmp_path: Path):
    reactor = ProcessReactor()
    notifier = RecordedNotifier()
    supervisor = Supervisor(load_config(config_file(tmp_path)), reactor, notifier=notifier, python="python-x")
    supervisor.privilegedStartService()
    supervisor.startService()
    yield supervisor, reactor, notifier
    if supervisor.running:
        supervisor.stopService()
        for process in reactor.processes:
            if process.protocol.worker.process is process:
                process.exit()


def notify(supervisor: Supervisor, index: int, text: str) -> None:
    supervisor.notified(supervisor.workers[index], dict(line.split("=", 1) for line in text.splitlines()))


def test_workers_start_with_their_own_socket_and_notify_socket(supervised) -> None:
    supervisor, reactor, _ = supervised
    assert len(reactor.processes) == 2
    for index, process in enumerate(reactor.processes):
        assert process.argv[:3] == ["python-x", "-m", "s2sgw.workers.child"]
        assert process.argv[process.argv.index("--listen") + 1] == "orders-in=3:inet"
        assert process.child_fds[3] == supervisor.workers[index].fds["orders-in"][0]
        assert process.env["NOTIFY_SOCKET"].endswith(f"worker-{index}.notify")
    assert reactor.processes[0].child_fds[3] != reactor.processes[1].child_fds[3]


def test_systemd_hears_ready_only_once_every_worker_is(supervised) -> None:
    supervisor, _, notifier = supervised
    notify(supervisor, 0, "READY=1\nSTATUS=ready")
    assert not any("READY" in sent for sent in notifier.sent)
    notify(supervisor, 1, "READY=1\nSTATUS=ready")
    assert [sent for sent in notifier.sent if "READY" in sent] == [{"READY": 1, "STATUS": "2 of 2 workers ready"}]


def test_a_worker_that_exits_is_started_again_with_growing_delays(supervised) -> None:
    supervisor, reactor, _ = supervised
    for expected_delay in (FIRST_RESTART_DELAY * 2, FIRST_RESTART_DELAY * 4):
        reactor.processes[-2 if len(reactor.processes) == 2 else -1].exit(signal=9)
        assert supervisor.workers[0].process is None
        reactor.advance(expected_delay - 0.01)
        assert supervisor.workers[0].process is None
        reactor.advance(0.01)
        assert supervisor.workers[0].process is reactor.processes[-1]
    assert supervisor.workers[0].restarts == 2
    assert supervisor.workers[1].process is reactor.processes[1]  # the other one is untouched
    sample = supervisor.metrics.restarts.labels("0")._value.get()
    assert sample == 2


def test_the_restart_delay_is_bounded_and_resets_after_a_long_life(supervised) -> None:
    supervisor, reactor, _ = supervised
    worker = supervisor.workers[1]
    for _ in range(10):
        worker.process.exit(1)
        reactor.advance(MAX_RESTART_DELAY)
    assert worker.delay == MAX_RESTART_DELAY
    reactor.advance(60)
    worker.process.exit(1)
    assert worker.delay == FIRST_RESTART_DELAY


def test_a_reload_reaches_ready_workers_now_and_starting_ones_once_ready(supervised) -> None:
    supervisor, reactor, notifier = supervised
    notify(supervisor, 0, "READY=1")
    supervisor.reload()
    assert reactor.processes[0].signals == ["HUP"]
    assert reactor.processes[1].signals == []
    assert "RELOADING" in notifier.sent[-1]
    notify(supervisor, 1, "READY=1")  # started: now it reloads
    assert reactor.processes[1].signals == ["HUP"]
    notify(supervisor, 0, "RELOADING=1")
    notify(supervisor, 0, "READY=1")
    assert not supervisor.ready
    notify(supervisor, 1, "READY=1")
    assert supervisor.ready
    assert notifier.sent[-1] == {"READY": 1, "STATUS": "2 of 2 workers ready"}


@attrs.define
class ReloadingStore:
    """The parent's trust store as the supervisor sees it: a reload that fires a generation."""

    generation: int = 1
    pending: list[Deferred] = attrs.Factory(list)

    def reload(self) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def finish(self) -> None:
        self.generation += 1
        self.pending.pop(0).callback(self.generation)


def with_parents_copy(supervisor: Supervisor) -> ReloadingStore:
    """Both workers ready, and a trust store of the parent's own that reloads first."""
    store = ReloadingStore()
    supervisor.trust_store = store
    notify(supervisor, 0, "READY=1")
    notify(supervisor, 1, "READY=1")
    return store


def test_a_reload_fires_once_the_parents_copy_and_then_every_worker_have_reloaded(supervised) -> None:
    """What a renewal in the parent waits for before its new certificate counts as in force."""
    supervisor, reactor, _ = supervised
    store, reloaded = with_parents_copy(supervisor), []
    supervisor.on_trust_reloaded = reloaded.append
    fired: list = []
    supervisor.reload().addCallback(fired.append)
    assert [p.signals for p in reactor.processes] == [[], []]  # the parent's copy first
    store.finish()
    assert reloaded == [2] and [p.signals for p in reactor.processes] == [["HUP"], ["HUP"]]
    notify(supervisor, 0, "RELOADING=1")
    notify(supervisor, 0, "READY=1")
    assert not fired
    reactor.processes[1].exit(signal=9)  # a worker that dies reads the new files when it starts again
    assert fired == [None]


def test_a_renewal_counts_as_in_force_once_every_worker_reloaded_or_fails_after_the_wait(supervised) -> None:
    supervisor, reactor, _ = supervised
    store = with_parents_copy(supervisor)
    done: list = []
    reload_everywhere(supervisor, store, reactor).addCallback(done.append)
    store.finish()
    notify(supervisor, 0, "READY=1")
    notify(supervisor, 1, "READY=1")
    assert done == [2]  # the parent's generation, once both workers have reloaded

    stuck: list = []
    reload_everywhere(supervisor, store, reactor).addErrback(stuck.append)
    store.finish()
    notify(supervisor, 0, "READY=1")  # worker 1 never finishes its reload
    reactor.advance(RELOAD_WAIT)
    assert len(stuck) == 1 and stuck[0].check(defer.TimeoutError)
    notify(supervisor, 1, "READY=1")  # finishing late is no error, and the parent keeps supervising
    assert supervisor.ready


def test_a_reload_the_parents_copy_refuses_still_reaches_the_workers(supervised) -> None:
    supervisor, reactor, _ = supervised
    store = with_parents_copy(supervisor)
    fired: list = []
    supervisor.reload().addCallback(fired.append)
    store.pending.pop(0).errback(ValueError("bad key file"))
    assert [p.signals for p in reactor.processes] == [["HUP"], ["HUP"]]  # each keeps its trust, and says so
    notify(supervisor, 0, "READY=1")
    notify(supervisor, 1, "READY=1")
    assert fired == [None]


def test_stopping_passes_sigterm_on_and_waits_for_every_worker(supervised) -> None:
    supervisor, reactor, notifier = supervised
    done = supervisor.stopService()
    assert [p.signals for p in reactor.processes] == [["TERM"], ["TERM"]]
    assert "STOPPING" in notifier.sent[-1]
    fired: list = []
    done.addCallback(fired.append)
    reactor.processes[0].exit()
    assert not fired
    reactor.processes[1].exit()
    assert fired
    assert len(reactor.processes) == 2  # nothing restarted while stopping
    assert not supervisor.run_dir.exists()


def test_a_worker_that_will_not_stop_is_killed(supervised) -> None:
    supervisor, reactor, _ = supervised
    supervisor.stopService()
    reactor.processes[0].exit()
    reactor.advance(supervisor.config.timeouts.drain + 15)
    assert reactor.processes[1].signals == ["TERM", "KILL"]
    reactor.processes[1].exit(signal=9)


# -- metrics ---------------------------------------------------------------------------------------


def exposition(handshakes: float, active: float, expiry: float) -> str:
    registry = CollectorRegistry()
    Counter("s2sgw_handshakes", "h", ["route"], registry=registry).labels("in").inc(handshakes)
    Gauge("s2sgw_active_connections", "a", ["route"], registry=registry).labels("in").set(active)
    Gauge("s2sgw_certificate_expiry_seconds", "e", ["service"], registry=registry).labels("users").set(expiry)
    return generate_latest(registry).decode()


def test_metrics_of_workers_are_summed_and_state_gauges_kept_per_worker() -> None:
    own = CollectorRegistry()
    Gauge("s2sgw_workers_alive", "w", registry=own).set(2)
    text = render_metrics(merge_metrics({0: exposition(3, 1, 100), 1: exposition(4, 2, 101)}, own.collect())).decode()
    lines = set(text.splitlines())
    assert 's2sgw_handshakes_total{route="in"} 7.0' in lines
    assert 's2sgw_active_connections{route="in"} 3.0' in lines
    assert 's2sgw_certificate_expiry_seconds{service="users",worker="0"} 100.0' in lines
    assert 's2sgw_certificate_expiry_seconds{service="users",worker="1"} 101.0' in lines
    assert "s2sgw_workers_alive 2.0" in lines
    assert "_created" not in text
    one = exposition(1, 1, 1)
    assert [t for t in text.splitlines() if t.startswith("# TYPE") and "alive" not in t] == [
        t for t in one.splitlines() if t.startswith("# TYPE") and "_created" not in t
    ]  # the families a single process shows, once each


def test_a_worker_that_did_not_answer_is_left_out_of_the_sums() -> None:
    text = render_metrics(merge_metrics({1: exposition(4, 2, 101)})).decode()
    assert 's2sgw_handshakes_total{route="in"} 4.0' in text.splitlines()
