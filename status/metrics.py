"""GET /metrics: the gate's Prometheus metrics, in a registry of its own per app.

Histograms and counters are updated as calls end (the ``call_finished`` and
``call_rejected`` signals); the gauges of running and waiting jobs are read
from the work queue's snapshot at scrape time by a custom collector, so they
are never stale and cost nothing between scrapes. Each gunicorn worker keeps
its own registry: see docs/STATUS.md, "Several workers".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from endpoints import QUEUED_CLASSES

#: The content type of the text exposition format prometheus_client writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Queue waits run from nothing to GATE_QUEUE_TIMEOUT (300 s by default); time to first
# byte includes a cold model load; a generation may stream for minutes.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The metrics of one app: instruments updated per call and a collector read per scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue = QueueCollector()
        self.registry.register(self.queue)
        labels = ("class", "model")
        self.queue_wait = Histogram(
            "gate_queue_wait_seconds",
            "Seconds a job waited in the work queue before it ran",
            labels,
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "gate_upstream_ttfb_seconds",
            "Seconds from opening the upstream request to its response headers",
            labels,
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "gate_request_duration_seconds",
            "Seconds from the start of a forwarded request to the end of its answer",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "gate_requests",
            "Forwarded requests whose answer ended, by outcome and upstream status",
            ("class", "model", "outcome", "code"),
            registry=self.registry,
        )
        self.rejections = Counter(
            "gate_rejections",
            "Requests the gate answered itself with an error, by status, reason and class",
            ("status", "reason", "class"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "gate_tokens",
            "Tokens the upstream reported: in (prompt) and out (completion)",
            ("model", "direction"),
            registry=self.registry,
        )

    def call_finished(self, call: Any) -> None:
        """Count one forwarded call whose answer ended."""
        cls = call.cls
        model = call.model or ""
        if cls in QUEUED_CLASSES:
            self.queue_wait.labels(cls, model).observe(call.waited)
        if call.ttfb is not None:
            self.ttfb.labels(cls, model).observe(call.ttfb)
        self.duration.labels(cls, model).observe(call.duration)
        self.requests.labels(cls, model, call.outcome, str(call.status or "")).inc()
        if call.prompt_tokens:
            self.tokens.labels(model, "in").inc(call.prompt_tokens)
        if call.completion_tokens:
            self.tokens.labels(model, "out").inc(call.completion_tokens)

    def call_rejected(self, status: int, reason: str, cls: str | None, count: int = 1) -> None:
        self.rejections.labels(str(status), reason, cls or "none").inc(count)

    def exposition(self, snapshot: Mapping[str, Any] | None, upstream: Mapping[str, Any]) -> bytes:
        """The text exposition, with the gauges read from ``snapshot`` and ``upstream``."""
        self.queue.snapshot, self.queue.upstream = snapshot, upstream
        try:
            return generate_latest(self.registry)
        finally:
            self.queue.snapshot, self.queue.upstream = None, {}


class QueueCollector(Collector):
    """Gauges and counters read from the work queue's snapshot and the probe's cache."""

    def __init__(self) -> None:
        self.snapshot: Mapping[str, Any] | None = None
        self.upstream: Mapping[str, Any] = {}

    def describe(self) -> Iterator[Any]:
        # Names only, so that registering never asks for a snapshot.
        yield from self._families()

    def _families(self) -> tuple[Any, ...]:
        model = ["model"]
        return (
            GaugeMetricFamily("gate_jobs_running", "Jobs of each model running now", labels=model),
            GaugeMetricFamily(
                "gate_jobs_waiting", "Jobs of each model waiting in the queue now", labels=model
            ),
            GaugeMetricFamily("gate_model_slots", "Jobs each model may run at once", labels=model),
            GaugeMetricFamily(
                "gate_queue_oldest_wait_seconds",
                "Seconds the oldest waiting job of each model has waited",
                labels=model,
            ),
            GaugeMetricFamily(
                "gate_model_active", "1 when the model holds a place to run jobs", labels=model
            ),
            CounterMetricFamily(
                "gate_jobs_admitted", "Jobs the work queue let run, by model", labels=model
            ),
            CounterMetricFamily(
                "gate_queue_rejected",
                "Jobs the work queue turned away, by model and reason",
                labels=["model", "reason"],
            ),
            GaugeMetricFamily("gate_admin_jobs_running", "Admin jobs (pull, push, create) running"),
            GaugeMetricFamily("gate_admin_jobs_waiting", "Admin jobs waiting"),
            GaugeMetricFamily(
                "gate_upstream_up",
                "1 when the upstream answered its last probe, 0 when not (cached, never probed "
                "at scrape time)",
            ),
            GaugeMetricFamily(
                "gate_upstream_model_loaded", "1 per model the upstream has loaded", labels=model
            ),
        )

    def collect(self) -> Iterator[Any]:
        (
            running,
            waiting,
            slots,
            oldest,
            active,
            admitted,
            rejected,
            admin_running,
            admin_waiting,
            up,
            loaded,
        ) = self._families()
        snapshot = self.snapshot
        if snapshot is not None:
            for name, lane in (snapshot.get("models") or {}).items():
                running.add_metric([name], lane.get("running") or 0)
                waiting.add_metric([name], lane.get("waiting") or 0)
                slots.add_metric([name], lane.get("slots") or 0)
                oldest.add_metric([name], lane.get("oldest_wait") or 0.0)
                active.add_metric([name], 1 if lane.get("active") else 0)
                admitted.add_metric([name], lane.get("admitted") or 0)
                for reason, count in (lane.get("rejected") or {}).items():
                    rejected.add_metric([name, reason], count)
            admin = snapshot.get("admin") or {}
            admin_running.add_metric([], admin.get("running") or 0)
            admin_waiting.add_metric([], admin.get("waiting") or 0)
        healthy = self.upstream.get("healthy")
        if healthy is not None:
            up.add_metric([], 1 if healthy else 0)
        for model in self.upstream.get("loaded") or ():
            loaded.add_metric([model["name"]], 1)
        families = [running, waiting, slots, oldest, active, admitted, rejected]
        if snapshot is not None:
            families += [admin_running, admin_waiting]
        families += [up, loaded]
        yield from families
