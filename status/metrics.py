"""GET /metrics: the gate's Prometheus metrics, in a registry of its own per app.

Histograms and counters are updated as calls end (the ``call_finished`` and
``call_rejected`` signals); the gauges of running and waiting jobs are read
from the work queue's snapshot at scrape time by a custom collector, so they
are never stale and cost nothing between scrapes. Each gunicorn worker keeps
its own registry: see docs/STATUS.md, "Several workers".

The counters and histograms are plain numbers (``Tallies``), written out at
scrape time as prometheus_client's Counter and Histogram would write them
(tests/test_status_units.py compares the two): a call's end updates a dozen
series, and prometheus_client's instruments take a lock and check their value on
each update, a tenth of the CPU a short proxied chat costs.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from endpoints import QUEUED_CLASSES
from workqueue.core import PRIORITIES

from .board import MAX_REASONS, Labels, names_a_model

# Each counter and histogram would carry a `_created` series beside it, doubling the
# lines of a scrape for a timestamp nobody graphs. (A switch of prometheus_client's own,
# global to the process; the gate's worker has no other registry.)
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: Model names come from request bodies: at most this many get series of their own;
#: past it, new ones are counted under model="other" until one has had no call and
#: no work-queue lane for MODEL_IDLE seconds, when its series are removed.
MAX_MODELS = 32
MODEL_IDLE = 600.0

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
        self.models = Labels(MAX_MODELS, MODEL_IDLE)
        self.reasons = Labels(MAX_REASONS)
        # The series of each model label, removed when the label expires: (instrument,
        # label values) -> the series' numbers, each looked up once.
        self._series: dict[str, dict[tuple[Any, tuple[str, ...]], list[float]]] = {}
        # The series of each kind of call ending, per model label (see _call_series):
        # (class, outcome, status) -> those series, dropped with the label's series.
        self._calls: dict[str, dict[tuple[str, str, int | None], list[Any]]] = {}
        self.queue = QueueCollector(self)
        self.registry.register(self.queue)
        labels = ("class", "model")
        self.queue_wait = HistogramTally(
            "gate_queue_wait_seconds",
            "Seconds a job waited in the work queue before it ran",
            labels,
            WAIT_BUCKETS,
        )
        self.ttfb = HistogramTally(
            "gate_upstream_ttfb_seconds",
            "Seconds from opening the upstream request to its response headers",
            labels,
            TTFB_BUCKETS,
        )
        self.duration = HistogramTally(
            "gate_request_duration_seconds",
            "Seconds from the start of a forwarded request to the end of its answer",
            labels,
            DURATION_BUCKETS,
        )
        # The work queue's class of each job: three values (workqueue.core.PRIORITIES).
        self.queue_wait_by_priority = HistogramTally(
            "gate_queue_wait_by_priority_seconds",
            "Seconds a job waited in the work queue before it ran, by its priority class",
            ("priority",),
            WAIT_BUCKETS,
        )
        self.requests = CounterTally(
            "gate_requests",
            "Forwarded requests whose answer ended, by outcome and upstream status",
            ("class", "model", "outcome", "code"),
        )
        self.rejections = CounterTally(
            "gate_rejections",
            "Requests the gate answered itself with an error, by status, reason and class",
            ("status", "reason", "class"),
        )
        self.tokens = CounterTally(
            "gate_tokens",
            "Tokens the upstream reported: in (prompt) and out (completion)",
            ("model", "direction"),
        )
        # Written out in this order, after the work queue's gauges.
        self.registry.register(
            Tallies(
                (
                    self.queue_wait,
                    self.ttfb,
                    self.duration,
                    self.queue_wait_by_priority,
                    self.requests,
                    self.rejections,
                    self.tokens,
                )
            )
        )

    def model_label(self, model: str, now: float, *, claim: bool = True) -> str:
        """The label ``model`` is counted under: itself, or OTHER past MAX_MODELS."""
        models = self.models
        if now >= models.due:
            for gone in models.expire(now):
                self._calls.pop(gone, None)
                for metric, labels in self._series.pop(gone, ()):
                    metric.remove(labels)
        return models.label(model, now, claim=claim)

    def _child(self, metric: Any, model: str, *labels: str) -> list[float]:
        """The numbers of ``metric``'s series ``labels``, remembered under ``model`` for
        removal on expiry."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = {}
        child = series.get((metric, labels))
        if child is None:
            child = series[(metric, labels)] = metric.child(labels)
        return child

    def _call_series(self, model: str, cls: str, outcome: str, code: str) -> list[Any]:
        """The series a call of ``cls`` on ``model`` ending in ``outcome`` and ``code`` counts
        in, found once per label values: its queue wait's (for a queued class, else None),
        its time to first byte's, its duration's, its request count's, its tokens' in and out.

        Those of the time to first byte and the tokens are left None until a call has
        some to count, so that the scrape has no series that never counted anything.
        """
        queued = cls in QUEUED_CLASSES
        return [
            self._child(self.queue_wait, model, cls, model) if queued else None,
            None,
            self._child(self.duration, model, cls, model),
            self._child(self.requests, model, cls, model, outcome, code),
            None,
            None,
        ]

    def call_finished(self, call: Any, now: float | None = None) -> None:
        """Count one forwarded call whose answer ended."""
        cls, status, outcome = call.cls, call.status, call.outcome
        now = time.monotonic() if now is None else now
        model = self.model_label(call.model or "", now, claim=names_a_model(status))
        calls = self._calls.get(model)
        if calls is None:
            calls = self._calls[model] = {}
        found = calls.get((cls, outcome, status))
        if found is None:
            code = str(status or "")
            found = calls[(cls, outcome, status)] = self._call_series(model, cls, outcome, code)
        if found[0] is not None:
            waited = call.waited
            self.queue_wait.observe(found[0], waited)
            priority = getattr(call, "priority", None)
            if priority in PRIORITIES:
                by_priority = self.queue_wait_by_priority
                by_priority.observe(by_priority.child((priority,)), waited)
        if call.ttfb is not None:
            if found[1] is None:
                found[1] = self._child(self.ttfb, model, cls, model)
            self.ttfb.observe(found[1], call.ttfb)
        self.duration.observe(found[2], call.duration)
        found[3][0] += 1
        if call.prompt_tokens:
            if found[4] is None:
                found[4] = self._child(self.tokens, model, model, "in")
            found[4][0] += call.prompt_tokens
        if call.completion_tokens:
            if found[5] is None:
                found[5] = self._child(self.tokens, model, model, "out")
            found[5][0] += call.completion_tokens

    def call_rejected(self, status: int, reason: str, cls: str | None, count: int = 1) -> None:
        reason = self.reasons.label(reason, 0.0)
        self.rejections.child((str(status), reason, cls or "none"))[0] += count

    def exposition(self, snapshot: Mapping[str, Any] | None, upstream: Mapping[str, Any]) -> bytes:
        """The text exposition, with the gauges read from ``snapshot`` and ``upstream``."""
        self.queue.snapshot, self.queue.upstream = snapshot, upstream
        try:
            return generate_latest(self.registry)
        finally:
            self.queue.snapshot, self.queue.upstream = None, {}


class CounterTally:
    """A labelled counter kept as plain numbers: one ``[value]`` per series.

    Written out as prometheus_client's ``Counter`` writes one (``NAME_total``, float
    values, the series in the order they were first counted).
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def child(self, labels: tuple[str, ...]) -> list[float]:
        """The series of ``labels`` (one value each), made at zero when new."""
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = [0.0]
        return found

    def remove(self, labels: tuple[str, ...]) -> None:
        self.series.pop(labels, None)

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (value,) in list(self.series.items()):
            family.add_metric(labels, value)
        return family


class HistogramTally:
    """A labelled histogram kept as plain numbers: per series, the count of each bucket
    (not cumulative; +Inf last) and the sum last.

    Written out as prometheus_client's ``Histogram`` writes one: cumulative
    ``_bucket`` samples with ``le`` as it formats the bounds, then ``_count`` and ``_sum``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = [float(bound) for bound in buckets] + [math.inf]
        self.les = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def child(self, labels: tuple[str, ...]) -> list[float]:
        """The series of ``labels``, made empty when new."""
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = [0.0] * (len(self.bounds) + 1)
        return found

    def observe(self, child: list[float], value: float) -> None:
        """Count ``value`` in ``child``: in the first bucket whose bound is not below it."""
        if value == value:  # not NaN, which no bucket holds (Histogram.observe alike)
            child[bisect_left(self.bounds, value)] += 1
        child[-1] += value

    def remove(self, labels: tuple[str, ...]) -> None:
        self.series.pop(labels, None)

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, child in list(self.series.items()):
            total = 0.0
            buckets = []
            for le, count in zip(self.les, child[:-1], strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(labels, buckets, sum_value=child[-1])
        return family


class Tallies(Collector):
    """The counters and histograms of one app, written out in the order given."""

    def __init__(self, tallies: Sequence[CounterTally | HistogramTally]) -> None:
        self.tallies = tuple(tallies)

    def collect(self) -> Iterator[Any]:
        for tally in self.tallies:
            yield tally.family()


class QueueCollector(Collector):
    """Gauges and counters read from the work queue's snapshot and the probe's cache."""

    def __init__(self, metrics: Metrics) -> None:
        self.snapshot: Mapping[str, Any] | None = None
        self.upstream: Mapping[str, Any] = {}
        self.metrics = metrics

    def lanes(self, snapshot: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The snapshot's lanes by model label: at most MAX_MODELS, the rest added up as OTHER."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        lanes = (snapshot.get("models") or {}).items()
        # Busy lanes first, so that they take the places that are free.
        for name, lane in sorted(lanes, key=lambda item: not _busy(item[1])):
            # An idle lane shows under its own name only if a call already gave it one.
            label = self.metrics.model_label(name, now, claim=_busy(lane))
            into = out.get(label)
            if into is None:
                out[label] = {**lane, "rejected": dict(lane.get("rejected") or {})}
                continue
            for field in ("running", "waiting", "slots", "admitted"):
                into[field] = (into.get(field) or 0) + (lane.get(field) or 0)
            into["oldest_wait"] = max(into.get("oldest_wait") or 0, lane.get("oldest_wait") or 0)
            into["active"] = bool(into.get("active") or lane.get("active"))
            rejected = Tally(into["rejected"])
            rejected.update(lane.get("rejected") or {})
            into["rejected"] = dict(rejected)
        return out

    def describe(self) -> Iterator[Any]:
        # Names only, so that registering never asks for a snapshot.
        yield from self._families()
        yield from self._priority_families()
        yield from self._backend_families()

    def _priority_families(self) -> tuple[Any, ...]:
        priority = ["priority"]  # three values: workqueue.core.PRIORITIES
        return (
            GaugeMetricFamily(
                "gate_priority_jobs_running",
                "Jobs of each priority class running now",
                labels=priority,
            ),
            GaugeMetricFamily(
                "gate_priority_jobs_waiting",
                "Jobs of each priority class waiting in the queue now",
                labels=priority,
            ),
        )

    def _backend_families(self) -> tuple[Any, ...]:
        # Several backends only; the backend label's values come from the configuration.
        backend = ["backend"]
        return (
            GaugeMetricFamily(
                "gate_backend_up",
                "1 when the backend is up (probes and passive signals)",
                labels=backend,
            ),
            GaugeMetricFamily(
                "gate_backend_jobs_running", "Jobs running on each backend now", labels=backend
            ),
            GaugeMetricFamily(
                "gate_backend_models_loaded",
                "Models each backend has loaded (/api/ps)",
                labels=backend,
            ),
            GaugeMetricFamily(
                "gate_backend_vram_used_bytes",
                "VRAM the backend's loaded models use",
                labels=backend,
            ),
            CounterMetricFamily(
                "gate_backend_loads", "Models each backend loaded, seen by /api/ps", labels=backend
            ),
            CounterMetricFamily(
                "gate_backend_evictions",
                "Models each backend unloaded, seen by /api/ps",
                labels=backend,
            ),
        )

    def _collect_backends(self, rows: Any) -> Iterator[Any]:
        up, running, loaded, vram, loads, evictions = self._backend_families()
        for row in rows:
            label = [str(row.get("name"))]
            up.add_metric(label, 1 if row.get("health") == "up" else 0)
            running.add_metric(label, row.get("running") or 0)
            loaded.add_metric(label, len(row.get("loaded") or {}))
            vram.add_metric(label, row.get("vram_used") or 0)
            loads.add_metric(label, row.get("loads") or 0)
            evictions.add_metric(label, row.get("evictions") or 0)
        yield from (up, running, loaded, vram, loads, evictions)

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
                "gate_upstream_model_loaded",
                "Models the upstream has loaded: 1 per model label (OTHER counts the rest)",
                labels=model,
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
            for name, lane in self.lanes(snapshot).items():
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
        # Loaded models come from the upstream, which loads what clients name: counted
        # under the same bounded labels as the queue's models (the rest under OTHER).
        now = time.monotonic()
        per_label = Tally(
            self.metrics.model_label(model["name"], now, claim=False)
            for model in self.upstream.get("loaded") or ()
        )
        for label, count in per_label.items():
            loaded.add_metric([label], count)
        families = [running, waiting, slots, oldest, active, admitted, rejected]
        if snapshot is not None:
            families += [admin_running, admin_waiting]
        families += [up, loaded]
        yield from families
        if snapshot is not None and snapshot.get("priorities"):
            by_running, by_waiting = self._priority_families()
            for name, row in snapshot["priorities"].items():
                by_running.add_metric([name], row.get("running") or 0)
                by_waiting.add_metric([name], row.get("waiting") or 0)
            yield from (by_running, by_waiting)
        if snapshot is not None and snapshot.get("backends"):
            yield from self._collect_backends(snapshot.get("backends"))


def _busy(lane: Mapping[str, Any]) -> bool:
    return bool(lane.get("running") or lane.get("waiting"))
