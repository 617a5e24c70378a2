"""The admin endpoint of a parent of workers: every worker's answers, gathered on request.

Each worker serves the ordinary admin endpoint (:mod:`s2sgw.ops.admin`) on a private unix socket;
the parent asks each one and answers for the whole:

- ``/metrics``: the workers' metrics merged. Counters, histograms and summaries are summed
  (so are gauges listed in :data:`SUMMED_GAUGES`, such as open connections); every other gauge
  describes one worker's state (certificate expiry, cache size, memory) and is kept per worker
  with a ``worker`` label. The parent's own metrics (restarts, workers alive) come with them.
- ``/status``: one entry per worker (pid, restarts, ready) with that worker's status document,
  beside the parent's own sections (``enrollment`` and each service's ``renewal``, when the
  parent renews certificates).
- ``/readyz``: 200 only when every worker is running and answers ready, and the parent's own
  parts see no problem.
- ``/healthz``: 200 while the parent answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.logger import Logger
from twisted.web import http, resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from s2sgw.ops.admin import AdminSite, HealthzResource
from s2sgw.workers.renewal import ParentReport
from s2sgw.workers.supervisor import Supervisor, Worker

SUMMED_GAUGES = frozenset({"s2sgw_active_connections", "s2sgw_workers_alive"})
ASK_TIMEOUT = 5.0


def merge_metrics(texts: dict[int, str], own: Iterable[Metric] = ()) -> list[Metric]:
    """Families of every worker's text exposition merged (see the module docstring)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            summed = family.type in ("counter", "histogram", "summary") or family.name in SUMMED_GAUGES
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a start time per worker: no sum means anything
                labels = dict(sample.labels)
                if not summed:
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                values[family.name][key] = values[family.name].get(key, 0.0) + sample.value
    for name, family in list(merged.items()):
        if not values[name]:
            del merged[name]  # e.g. the "_created" families the text format shows as gauges
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    for family in own:
        merged.setdefault(family.name, family)
    return list(merged.values())


class _Families:
    """A collector that hands out already-merged families (to render them with prometheus_client)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def render_metrics(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _WorkerSockets:
    """``http://worker-N/...`` -> worker N's private admin socket."""

    supervisor: Supervisor
    reactor: Any

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        index = int(uri.host.decode("ascii").rpartition("-")[2])
        return UNIXClientEndpoint(self.reactor, str(self.supervisor.admin_path(self.supervisor.workers[index])))


@attrs.define(eq=False)
class WorkerAsker:
    """Asks each worker's admin endpoint; a worker down or slow answers None."""

    supervisor: Supervisor
    reactor: Any
    _agent: Any = attrs.field(default=None, init=False)

    def ask(self, worker: Worker, path: str) -> Deferred[tuple[int, bytes] | None]:
        if not worker.alive:
            return succeed(None)
        if self._agent is None:
            pool = HTTPConnectionPool(self.reactor)  # one kept-alive connection per worker
            pool.maxPersistentPerHost = 1
            self._agent = Agent.usingEndpointFactory(
                self.reactor, _WorkerSockets(self.supervisor, self.reactor), pool=pool
            )
        d = self._agent.request(b"GET", f"http://worker-{worker.index}{path}".encode("ascii"))
        d.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
        d.addTimeout(ASK_TIMEOUT, self.reactor)
        d.addErrback(lambda failure: None)
        return d

    def ask_all(self, path: str) -> Deferred[list[tuple[Worker, tuple[int, bytes] | None]]]:
        workers = list(self.supervisor.workers)
        d = DeferredList([self.ask(worker, path) for worker in workers])
        return d.addCallback(lambda results: [(w, answer) for w, (_, answer) in zip(workers, results)])


class _Gathering(resource.Resource):
    """A GET answered once every worker has answered (or failed to)."""

    isLeaf = True
    path = "/"
    _log = Logger(namespace="s2sgw.workers")

    def __init__(self, asker: WorkerAsker, registry: CollectorRegistry, report: ParentReport | None = None) -> None:
        super().__init__()
        self.asker = asker
        self.registry = registry
        self.report = report if report is not None else ParentReport()

    def render_GET(self, request: server.Request) -> Any:
        d = self.asker.ask_all(self.path).addCallback(self.answer, request)
        d.addErrback(lambda failure: self._log.failure("admin {path}", failure, path=self.path) or (500, b"", b""))
        d.addCallback(lambda result: _finish(request, *result))
        return server.NOT_DONE_YET

    def answer(self, answers: list, request: server.Request) -> tuple[int, bytes, bytes]:
        raise NotImplementedError


def _finish(request: server.Request, code: int, content_type: bytes, body: bytes) -> None:
    if request.finished or request._disconnected:
        return
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    request.write(body)
    request.finish()


def _json(document: object) -> bytes:
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"


class MetricsResource(_Gathering):
    path = "/metrics"

    def answer(self, answers: list, request: server.Request) -> tuple[int, bytes, bytes]:
        texts = {w.index: body.decode("utf-8") for w, a in answers if a is not None and a[0] == 200 for body in [a[1]]}
        own = list(self.registry.collect())
        return 200, b"text/plain; version=0.0.4; charset=utf-8", render_metrics(merge_metrics(texts, own))


class StatusResource(_Gathering):
    path = "/status"

    def answer(self, answers: list, request: server.Request) -> tuple[int, bytes, bytes]:
        entries = []
        for worker, answer in answers:
            entry: dict[str, Any] = {
                "index": worker.index, "pid": worker.pid, "alive": worker.alive, "ready": worker.ready,
                "restarts": worker.restarts, "state": worker.status,
            }  # fmt: skip
            if answer is not None and answer[0] == 200:
                entry["status"] = json.loads(answer[1])
            else:
                entry["status"] = None
            entries.append(entry)
        services = [service.name for service in self.asker.supervisor.config.services]
        return 200, b"application/json", _json({**self.report.status(services), "workers": entries})


class ReadyzResource(_Gathering):
    path = "/readyz"

    def answer(self, answers: list, request: server.Request) -> tuple[int, bytes, bytes]:
        reasons = []
        for worker, answer in answers:
            if answer is None:
                reasons.append(f"worker {worker.index}: not running" if not worker.alive else
                               f"worker {worker.index}: no answer")  # fmt: skip
            elif answer[0] != 200:
                try:
                    said = json.loads(answer[1]).get("reasons", [])
                except ValueError:
                    said = [f"answered {answer[0]}"]
                reasons.extend(f"worker {worker.index}: {reason}" for reason in said or ["not ready"])
        reasons.extend(self.report.problems())
        ready = not reasons
        code = http.OK if ready else http.SERVICE_UNAVAILABLE
        return code, b"application/json", _json({"ready": ready, "reasons": reasons})


def build_parent_admin_root(
    asker: WorkerAsker, registry: CollectorRegistry, report: ParentReport | None = None
) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"healthz", HealthzResource())
    root.putChild(b"readyz", ReadyzResource(asker, registry, report))
    root.putChild(b"status", StatusResource(asker, registry, report))
    root.putChild(b"metrics", MetricsResource(asker, registry, report))
    return root


@attrs.define(eq=False)
class ParentAdminService(Service):
    """The configured admin endpoint, bound before privileges drop, answering for every worker."""

    listen: str
    supervisor: Supervisor
    reactor: Any
    registry: CollectorRegistry
    report: ParentReport | None = None  # the parent's own /status sections and readiness checks
    port: Any = attrs.field(default=None, init=False)
    _log = Logger(namespace="s2sgw.workers")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        asker = WorkerAsker(self.supervisor, self.reactor)
        site = AdminSite(build_parent_admin_root(asker, self.registry, self.report))
        failures: list = []
        serverFromString(self.reactor, self.listen).listen(site).addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: Any) -> None:
        self.port = port
        self._log.info("admin endpoint listening on {address}", address=str(port.getHost()))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return succeed(None) if port is None else maybeDeferred(port.stopListening)
