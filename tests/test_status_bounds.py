"""Names that clients choose (models, addresses, reasons) never grow the gate's state unbounded.

The pure parts (the scheduler's idle models, the Board's labels, the metrics' model
labels) are driven with made-up times; the last test floods a real gunicorn gate
with 300 made-up model names and reads status.json and /metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from fakeollama import FakeOllama
from pipeline import Call
from status import board as board_module
from status import metrics as metrics_module
from status.board import LABEL_IDLE, MAX_MODELS, OTHER, Board, Labels
from status.metrics import Metrics
from tests.support import Gate
from workqueue.core import IDLE_MODEL_SECONDS, MAX_IDLE_MODELS, Scheduler

# -- Labels -------------------------------------------------------------------------------


def test_labels_fold_past_the_cap_and_free_places_when_idle() -> None:
    labels = Labels(2, idle=10.0)
    assert labels.label("a", 0.0) == "a"
    assert labels.label("b", 1.0) == "b"
    assert labels.label("c", 2.0) == OTHER  # full
    assert labels.label("a", 5.0) == "a"  # seen again: stays, and its idle clock restarts
    assert labels.label("c", 11.5) == "c"  # "b" was idle 10 s: its place went to "c"
    assert "b" not in labels and len(labels) == 2
    assert labels.label("d", 12.0, claim=False) == OTHER  # room or not, no place without claim
    assert labels.expire(100.0) == ["a", "c"]


# -- the scheduler's idle models ----------------------------------------------------------


def test_scheduler_forgets_idle_models_after_a_while_and_keeps_few() -> None:
    s = Scheduler(max_active_models=4)
    for i in range(300):  # a flood of made-up names, one job each
        s.submit(i, f"junk{i}", "x", i * 0.01)
        s.finish(i, i * 0.01)
    s.submit("real", "real", "y", 3.0)
    models = s.snapshot(3.0)["models"]
    assert len(models) <= MAX_IDLE_MODELS + 1
    assert "real:latest" in models
    s.finish("real", 4.0)
    # Idle models expire: after IDLE_MODEL_SECONDS none is left.
    assert s.snapshot(4.0 + IDLE_MODEL_SECONDS)["models"] == {}


def test_scheduler_never_forgets_a_model_with_jobs() -> None:
    s = Scheduler(max_active_models=1, queue_timeout=10_000.0)
    s.submit("a", "a", "x", 0.0)  # runs for ever
    s.submit("b", "b", "x", 0.0)  # waits for ever (no switch: the first never finishes)
    for i in range(100):
        s.submit(i, f"junk{i}", "x", 1.0)
        s.finish(i, 1.0)
    models = s.snapshot(IDLE_MODEL_SECONDS * 3)["models"]
    assert models["a:latest"]["running"] == 1
    assert models["b:latest"]["waiting"] == 1
    assert s.finish("a", IDLE_MODEL_SECONDS * 3) == ["b"]


# -- the Board ----------------------------------------------------------------------------


def finished(board: Board, now: float, model: str, client: str, *, ok: bool = True) -> None:
    board.finished(
        now,
        model=model,
        client=client,
        queued=True,
        waited=0.1,
        prompt_tokens=1,
        completion_tokens=2,
        ok=ok,
    )


def test_board_keeps_at_most_max_models_and_folds_the_rest_into_other() -> None:
    board = Board(0.0, 0.0)
    for i in range(300):
        finished(board, 10.0, f"junk{i}:latest", f"key-{i}")
    doc = board.document(10.5, 10.5, snapshot=None, upstream={}, worker={})
    models = doc["models"]
    assert len(models) == MAX_MODELS + 1
    assert models[OTHER]["jobs_per_minute"] == 300 - MAX_MODELS
    assert sum(m["jobs_per_minute"] for m in models.values()) == 300
    assert len(doc["clients"]) == board_module.MAX_CLIENTS + 1
    assert sum(c["jobs_per_minute"] for c in doc["clients"].values()) == 300
    # A minute later the rates are gone, and after LABEL_IDLE the places are free again.
    later = board.document(10 + LABEL_IDLE + 1, 0.0, snapshot=None, upstream={}, worker={})
    assert later["models"] == {} and later["clients"] == {}
    finished(board, 10 + LABEL_IDLE + 1, "real:latest", "alice")
    doc = board.document(10 + LABEL_IDLE + 2, 0.0, snapshot=None, upstream={}, worker={})
    assert list(doc["models"]) == ["real:latest"]


def test_board_folds_clients_past_max_clients(monkeypatch: Any) -> None:
    monkeypatch.setattr(board_module, "MAX_CLIENTS", 5)
    board = Board(0.0, 0.0, mask_clients=False)
    for i in range(20):
        finished(board, 10.0, "m:latest", f"203.0.113.{i}")
    clients = board.document(10.5, 0.0, snapshot=None, upstream={}, worker={})["clients"]
    assert len(clients) == 6 and list(clients)[-1] == OTHER
    assert clients[OTHER]["jobs_per_minute"] == 15
    assert "203.0.113.0" in clients  # masking off: the address as it is


def test_board_refused_models_take_no_place() -> None:
    board = Board(0.0, 0.0)
    for i in range(MAX_MODELS + 10):
        finished(board, 10.0, f"nosuch{i}:latest", "x", ok=False)  # the upstream said 404
    finished(board, 10.0, "real:latest", "x")
    models = board.document(10.5, 0.0, snapshot=None, upstream={}, worker={})["models"]
    assert set(models) == {"real:latest", OTHER}


# A lane of the work queue's snapshot (workqueue.core.LaneSnapshot) with nothing in it.
IDLE_LANE = {
    "running": 0,
    "slots": 1,
    "waiting": 0,
    "oldest_wait": 0.0,
    "clients_waiting": 0,
    "admitted": 0,
    "rejected": {},
    "avg_seconds": None,
    "active": False,
    "draining": False,
}


def test_board_folds_queue_lanes_past_max_models_and_says_waiting_not_idle() -> None:
    lane = {**IDLE_LANE, "admitted": 1}
    lanes = {f"m{i}:latest": dict(lane) for i in range(MAX_MODELS + 8)}
    lanes["busy:latest"] = {**lane, "running": 1, "active": True}
    lanes["queued:latest"] = {**lane, "waiting": 2, "clients_waiting": 1}
    snap = Scheduler().snapshot(1.0)  # a real snapshot, with these lanes
    snap["models"] = lanes  # type: ignore[typeddict-item]
    models = Board(0.0, 0.0).document(1.0, 1.0, snapshot=snap, upstream={}, worker={})["models"]
    assert len(models) == MAX_MODELS + 1
    assert models["busy:latest"]["state"] == "active"
    assert models["queued:latest"]["state"] == "waiting"  # jobs waiting: not "idle"
    assert models["m0:latest"]["state"] == "idle"
    assert models[OTHER]["admitted"] == 10 and models[OTHER]["state"] == "idle"


def test_board_reasons_are_bounded() -> None:
    board = Board(0.0, 0.0)
    for i in range(100):
        board.rejected(1.0, 400, f"reason{i}")
    total = board.document(2.0, 2.0, snapshot=None, upstream={}, worker={})["rejections"]["total"]
    assert len(total["400"]) == board_module.MAX_REASONS + 1
    assert total["400"][OTHER] == 100 - board_module.MAX_REASONS


# -- the metrics --------------------------------------------------------------------------


def call(model: str, status: int = 200) -> Call:
    c = Call("inference", "POST", "/api/chat", "alice", model=model)
    c.status, c.ttfb, c.ended = status, 0.01, c.started + 0.1
    c.prompt_tokens, c.completion_tokens = 1, 2
    return c


def samples(metrics: Metrics, snapshot: Any = None) -> list[Any]:
    text = metrics.exposition(snapshot, {}).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def models_in(found: list[Any]) -> set[str]:
    return {s.labels["model"] for s in found if "model" in s.labels}


def test_metrics_model_labels_are_capped_and_expire() -> None:
    metrics = Metrics()
    for i in range(300):
        metrics.call_finished(call(f"junk{i}:latest"), now=1.0)
    found = samples(metrics)
    assert models_in(found) == {f"junk{i}:latest" for i in range(MAX_MODELS)} | {OTHER}
    other = [s for s in found if s.name == "gate_requests_total" and s.labels["model"] == OTHER]
    assert sum(s.value for s in other) == 300 - MAX_MODELS
    assert not [s for s in found if s.name.endswith("_created")]
    # After MODEL_IDLE without a call their series go, and a new model gets a place.
    metrics.call_finished(call("real:latest"), now=2.0 + metrics_module.MODEL_IDLE)
    assert models_in(samples(metrics)) == {"real:latest", OTHER}


def test_metrics_models_the_upstream_refused_take_no_place() -> None:
    metrics = Metrics()
    for i in range(50):
        metrics.call_finished(call(f"nosuch{i}:latest", status=404), now=1.0)
    metrics.call_finished(call("real:latest"), now=1.0)
    assert models_in(samples(metrics)) == {"real:latest", OTHER}


def test_metrics_queue_gauges_fold_lanes_past_the_cap() -> None:
    lane = {**IDLE_LANE, "waiting": 1, "clients_waiting": 1, "rejected": {"queue_full": 1}}
    snap = {
        "models": {f"m{i}:latest": dict(lane) for i in range(MAX_MODELS + 10)},
        "admin": {},
    }
    found = samples(Metrics(), snap)
    waiting = {s.labels["model"]: s.value for s in found if s.name == "gate_jobs_waiting"}
    assert len(waiting) == MAX_MODELS + 1
    assert waiting[OTHER] == 10
    assert sum(waiting.values()) == MAX_MODELS + 10


# -- a junk flood under gunicorn ----------------------------------------------------------


def flood(gate: Gate, names: list[str]) -> list[int]:
    quick = {"X-Fake-Tokens": "1", "X-Fake-Token-Interval": "0"}

    def ask(name: str) -> int:
        body = {"model": name, "prompt": "x", "stream": False}
        with requests.post(gate.url + "/api/generate", json=body, headers=quick, timeout=30) as r:
            return r.status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, names))


def generated(found: list[Any]) -> float:
    """Forwarded /api/generate calls, from gate_requests_total."""
    return sum(
        s.value
        for s in found
        if s.name == "gate_requests_total" and s.labels["class"] == "inference"
    )


def read_bounds(gate: Gate) -> tuple[dict[str, Any], list[Any], int]:
    """status.json, the /metrics samples, and the number of sample lines."""
    doc = requests.get(gate.url + "/gate/status.json", timeout=10).json()
    text = requests.get(gate.url + "/metrics", timeout=10).text
    found = [s for f in text_string_to_metric_families(text) for s in f.samples]
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [s for s in found if s.name.endswith("_created")]
    return doc, found, len(lines)


def test_a_flood_of_made_up_model_names_leaves_status_and_metrics_bounded(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_MAX_ACTIVE_MODELS": "8"})
    assert flood(gate, ["m1"]) == [200]
    _, _, baseline = read_bounds(gate)

    # Names Ollama does not have (404): they take no place at all, only "other".
    assert flood(gate, [f"junk-{i}" for i in range(300)]) == [404] * 300
    doc, found, lines = read_bounds(gate)
    assert set(doc["models"]) <= {"m1:latest", OTHER} | {f"junk-{i}:latest" for i in range(300)}
    assert len(doc["models"]) <= MAX_IDLE_MODELS + 2  # the queue's idle models, m1, other
    assert models_in(found) == {"m1:latest", "", OTHER}  # "": requests that name no model
    assert generated(found) == 301
    assert lines < baseline * 3, (baseline, lines)

    # The worst case: 300 names the upstream has. Still at most MAX_MODELS each.
    names = [f"real-{i}" for i in range(300)]
    fake.configure(models=["m1", *names])
    try:
        assert flood(gate, names) == [200] * 300
    finally:
        fake.configure(models=None)
    doc, found, lines = read_bounds(gate)
    assert len(doc["models"]) <= MAX_MODELS + 1 and OTHER in doc["models"]
    assert sum(m["jobs_per_minute"] for m in doc["models"].values()) == 601
    assert len(models_in(found)) <= metrics_module.MAX_MODELS + 1
    assert generated(found) == 601
    # What the bound means in lines: a few dozen series per model label, whatever the flood.
    assert lines < 100 * (metrics_module.MAX_MODELS + 2), (baseline, lines)
    print(f"\n/metrics: {baseline} sample lines before, {lines} after 600 names")


def test_metrics_reasons_are_bounded() -> None:
    metrics = Metrics()
    for i in range(100):
        metrics.call_rejected(400, f"reason{i}", "inference")
    reasons = {s.labels["reason"] for s in samples(metrics) if s.name == "gate_rejections_total"}
    assert len(reasons) == board_module.MAX_REASONS + 1 and OTHER in reasons
