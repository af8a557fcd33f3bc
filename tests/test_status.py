"""The gate's own endpoints end to end: real gunicorn with the gevent worker, the fake Ollama.

status.json under load, /metrics moving with traffic, /gate/healthz following the
upstream, and GATE_STATUS_ACCESS over real sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fakeollama import FakeOllama
from tests.status_support import Answer, Load, fetch, wait_until
from tests.support import Gate


def status(gate: Gate, **params: str) -> dict[str, Any]:
    resp = requests.get(gate.url + "/gate/status.json", params=params, timeout=5)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def metric_samples(gate: Gate) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(gate.url + "/metrics", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture
def queued_gate(fake: FakeOllama, gate_factory: Callable[..., Gate]) -> Iterator[Gate]:
    """A gate whose model runs one job at a time, so that a few requests make a queue."""
    yield gate_factory(fake.url, {"GATE_MODEL_CONCURRENCY": "1", "GATE_MAX_ACTIVE_MODELS": "1"})


def test_status_json_shows_running_and_waiting_jobs_then_zero(queued_gate: Gate) -> None:
    assert status(queued_gate)["queue"] is not None, "the work queue is not installed"
    with Load(queued_gate, 4) as load:
        busy = wait_until(
            lambda: (
                (doc := status(queued_gate, history="0"))["queue"]["running"] == 1
                and doc["queue"]["waiting"] == 3
                and doc
            )
        )
        m1 = busy["models"]["m1:latest"]
        assert (m1["running"], m1["slots"], m1["waiting"]) == (1, 1, 3)
        assert m1["active"] is True
        assert busy["clients"]["127.0.0.x"]["waiting"] == 3
        assert busy["clients"]["127.0.0.x"]["running"] == 1
    assert load.results == [200] * 4
    idle = wait_until(lambda: (d := status(queued_gate))["queue"]["running"] == 0 and d)
    assert idle["queue"]["waiting"] == 0
    assert idle["models"]["m1:latest"]["jobs_per_minute"] == 4.0
    assert idle["models"]["m1:latest"]["wait_avg"] > 0.5  # three of the four waited ~1.5 s+
    # The sampler saw the queue once a second.
    assert max(v for v in idle["history"]["waiting"] if v is not None) >= 2
    assert idle["history"]["waiting"][-1] == 0
    assert max(v for v in idle["history"]["oldest_wait"] if v is not None) > 0.5


def test_metrics_counters_move_with_traffic(gate: Gate) -> None:
    before = metric_samples(gate)
    for _ in range(3):
        resp = fetch(
            gate.url + "/api/generate", "POST", json={"model": "m2", "prompt": "hi"}, timeout=10
        )
        assert resp.status == 200
    bad = fetch(gate.url + "/api/chat", "POST", data=b"{", timeout=5)
    assert bad.status == 400
    assert fetch(gate.url + "/gate/healthz", timeout=10).status == 200  # probes the upstream
    after = metric_samples(gate)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    m2 = {"model": "m2:latest"}
    assert moved("gate_requests_total", outcome="ok", code="200", **m2) == 3
    assert moved("gate_request_duration_seconds_count", **m2) == 3
    assert moved("gate_upstream_ttfb_seconds_count", **m2) == 3
    assert moved("gate_queue_wait_seconds_count", **m2) == 3
    assert moved("gate_tokens_total", direction="out", **m2) == 3 * 8  # the fake's 8 tokens
    assert moved("gate_tokens_total", direction="in", **m2) > 0
    assert moved("gate_rejections_total", status="400", reason="invalid_request") == 1
    # Present once probed (healthz above), and 1: the upstream answered.
    assert after[("gate_upstream_up", ())] == 1
    assert not [name for name, _ in after if name.endswith("_created")]


def test_metrics_gauges_follow_the_queue(queued_gate: Gate) -> None:
    if status(queued_gate)["queue"] is None:
        pytest.fail("the work queue is not installed")
    with Load(queued_gate, 3):
        wait_until(
            lambda: (
                total(s := metric_samples(queued_gate), "gate_jobs_waiting", model="m1:latest") == 2
                and total(s, "gate_jobs_running", model="m1:latest") == 1
            )
        )
    wait_until(
        lambda: (
            total(s := metric_samples(queued_gate), "gate_jobs_running") == 0
            and total(s, "gate_jobs_waiting") == 0
        )
    )
    assert total(metric_samples(queued_gate), "gate_jobs_admitted_total", model="m1:latest") >= 3


def test_refusals_are_counted_by_status_and_reason(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(
        fake.url,
        {"GATE_LIMIT_EMBED": "2/minute", "GATE_MODEL_CONCURRENCY": "1", "GATE_QUEUE_MAX": "1"},
    )
    # The limiter: two embeds pass, the third gets Flask-Limiter's 429, and the rest the
    # limiter's fast path, which answers before Flask (no signal): all four are counted.
    codes = [
        fetch(
            gate.url + "/api/embed",
            "POST",
            json={"model": "nomic-embed-text", "input": "x"},
            timeout=10,
        ).status
        for _ in range(6)
    ]
    assert codes == [200, 200, 429, 429, 429, 429]
    # The work queue: one job runs, one waits, the next finds the queue full.
    with Load(gate, 1):
        wait_until(lambda: status(gate, history="0")["queue"]["running"] == 1)
        with Load(gate, 1):
            wait_until(lambda: status(gate, history="0")["queue"]["waiting"] == 1)
            full = fetch(
                gate.url + "/api/generate", "POST", json={"model": "m1", "prompt": "x"}, timeout=10
            )
            assert full.status == 503

    doc = status(gate, history="0")
    assert doc["rejections"]["recent"] == {
        "429": {"rate_limit_exceeded": 4},
        "503": {"queue_full": 1},
    }
    assert doc["rejections"]["total"] == doc["rejections"]["recent"]
    assert doc["limiter"] == {"storage": "memory://", "storage_fallback": False, "auth_guard": None}
    samples = metric_samples(gate)
    assert total(samples, "gate_rejections_total", status="429", **{"class": "embed"}) == 4
    assert (
        total(samples, "gate_rejections_total", reason="queue_full", **{"class": "inference"}) == 1
    )
    assert total(samples, "gate_queue_rejected_total", reason="queue_full") == 1


def test_healthz_follows_the_upstream(gate: Gate, fake: FakeOllama) -> None:
    def health() -> int:
        return fetch(gate.url + "/gate/healthz", timeout=10).status

    assert health() == 200
    fake.stop()
    try:
        wait_until(lambda: health() == 503, timeout=5, interval=0.2)
        body = fetch(gate.url + "/gate/healthz", timeout=10).json()
        assert body["status"] == "unavailable" and "refused" in body["error"]
        assert status(gate)["upstream"]["healthy"] is False  # the page reads the same cache
    finally:
        fake.start()
    wait_until(lambda: health() == 200, timeout=5, interval=0.2)


def test_healthz_is_cheap_for_the_upstream(gate: Gate, fake: FakeOllama) -> None:
    started = time.monotonic()
    answers = [fetch(gate.url + "/gate/healthz", timeout=5).status for _ in range(40)]
    elapsed = time.monotonic() - started
    assert answers == [200] * 40
    probes = [r for r in fake.stats()["requests"] if r["path"] == "/api/version"]
    # At most one probe a second (plus one for the window edges), whatever the call rate.
    assert len(probes) <= elapsed + 2, (len(probes), elapsed)


def test_background_sampling_and_api_ps_polling(gate: Gate, fake: FakeOllama) -> None:
    fetch(gate.url + "/api/generate", "POST", json={"model": "m3", "prompt": "x"}, timeout=10)

    def loaded(doc: dict[str, Any]) -> list[str]:
        return [m["name"] for m in doc["upstream"]["loaded"]]

    # The poller asks /api/ps every 5 s: the model shows up within one round.
    doc = wait_until(
        lambda: "m3:latest" in loaded(d := status(gate)) and len(d["history"]["t"]) >= 2 and d,
        timeout=12,
        interval=0.3,
    )
    assert doc["worker"]["sampling"] is True
    assert doc["models"]["m3:latest"]["loaded"] is True
    # Page views never reach the upstream: only the one poller asks /api/ps.
    before = len([r for r in fake.stats()["requests"] if r["path"] == "/api/ps"])
    for _ in range(20):
        fetch(gate.url + "/gate/status.json", timeout=5)
        fetch(gate.url + "/gate/status", timeout=5)
    after = len([r for r in fake.stats()["requests"] if r["path"] == "/api/ps"])
    assert after - before <= 1


def test_local_access_over_real_sockets(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_STATUS_ACCESS": "local"})
    for path in ("/gate/status", "/gate/status.json", "/gate/healthz", "/metrics"):
        assert fetch(gate.url + path, timeout=5).status == 200, path
    # Through a proxy the gate does not trust (GATE_TRUSTED_PROXIES=0) nobody is local.
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    resp = fetch(gate.url + "/gate/status.json", headers=forwarded, timeout=5)
    assert resp.status == 403
    assert "loopback" in resp.json()["error"]
    assert fetch(gate.url + "/metrics", headers=forwarded, timeout=5).status == 403


def test_local_access_behind_a_trusted_proxy(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    # GATE_TRUSTED_PROXIES=1: the limiter's ProxyFix takes the client from X-Forwarded-For,
    # as behind deploy/nginx.conf, so a remote client through the proxy is not local.
    gate = gate_factory(fake.url, {"GATE_STATUS_ACCESS": "local", "GATE_TRUSTED_PROXIES": "1"})

    def get(path: str, client: str) -> int:
        headers = {"X-Forwarded-For": client}
        return fetch(gate.url + path, headers=headers, timeout=5).status

    assert get("/gate/status.json", "127.0.0.1") == 200
    assert get("/gate/status.json", "203.0.113.9") == 403
    assert get("/metrics", "2001:db8::1") == 403
    assert get("/gate/healthz", "203.0.113.9") == 403
    assert get("/gate/healthz", "::1") == 200


def test_admin_access_with_api_keys(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[keys.ops]\nkey_sha256 = "{sha256(b"ops-secret").hexdigest()}"\nrole = "admin"\n'
        f'[keys.alice]\nkey_sha256 = "{sha256(b"alice-secret").hexdigest()}"\nrole = "user"\n'
    )
    gate = gate_factory(fake.url, {"GATE_STATUS_ACCESS": "admin", "GATE_API_KEYS_FILE": str(keys)})

    def get(path: str, **kwargs: Any) -> Answer:
        return fetch(gate.url + path, timeout=5, **kwargs)

    anonymous = get("/gate/status")
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")  # a browser asks
    assert get("/metrics", headers={"Authorization": "Bearer nope"}).status == 401
    assert get("/metrics", headers={"Authorization": "Bearer alice-secret"}).status == 403
    assert get("/metrics", headers={"Authorization": "Bearer ops-secret"}).status == 200
    assert get("/gate/status", auth=("anyone", "ops-secret")).status == 200
    assert get("/gate/status.json", headers={"X-Api-Key": "ops-secret"}).status == 200
    assert get("/gate/healthz").status == 200  # loopback needs no key
    # The keys name the clients on the page.
    fetch(
        gate.url + "/api/generate",
        "POST",
        json={"model": "m1", "prompt": "x"},
        headers={"Authorization": "Bearer alice-secret"},
        timeout=10,
    )
    doc = get("/gate/status.json", auth=("", "ops-secret")).json()
    assert doc["clients"]["alice"]["jobs_per_minute"] == 1.0


def test_admin_access_without_keys_refuses_and_says_why(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_STATUS_ACCESS": "admin"})
    resp = fetch(gate.url + "/gate/status.json", timeout=5)
    assert resp.status == 401
    assert "GATE_API_KEYS_FILE" in resp.json()["error"]
    assert fetch(gate.url + "/metrics", timeout=5).status == 401
    assert fetch(gate.url + "/gate/healthz", timeout=5).status == 200  # loopback


def test_queue_refusals_have_one_name_everywhere(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(
        fake.url,
        {
            "GATE_MODEL_CONCURRENCY": "1",
            "GATE_QUEUE_MAX_PER_CLIENT": "1",
            "GATE_QUEUE_TIMEOUT": "1",
        },
    )
    long = {"X-Fake-Tokens": "40", "X-Fake-Token-Interval": "0.15"}  # holds the slot ~6 s
    with Load(gate, 1, headers=long) as running:
        wait_until(lambda: status(gate, history="0")["queue"]["running"] == 1)
        with Load(gate, 1) as waiting:  # waits, then gives up after GATE_QUEUE_TIMEOUT
            wait_until(lambda: status(gate, history="0")["queue"]["waiting"] == 1)
            share = fetch(
                gate.url + "/api/generate", "POST", json={"model": "m1", "prompt": "x"}, timeout=10
            )
            assert share.status == 429
            assert "too many waiting requests" in share.json()["error"]
            openai = fetch(
                gate.url + "/v1/chat/completions",
                "POST",
                json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                timeout=10,
            )
            assert openai.json()["error"]["code"] == "client_queue_full"  # what a client reads
    assert running.results == [200] and waiting.results == [503]

    doc = status(gate, history="0")
    by_status = {"429": {"client_queue_full": 2}, "503": {"queue_timeout": 1}}
    assert doc["rejections"]["total"] == by_status
    assert doc["queue"]["rejected"] == {
        "queue_full": 0,
        "client_queue_full": 2,
        "queue_timeout": 1,
        "cancelled": 0,
    }
    assert doc["models"]["m1:latest"]["rejected"] == doc["queue"]["rejected"]
    samples = metric_samples(gate)
    for reason, count in (("client_queue_full", 2), ("queue_timeout", 1)):
        assert total(samples, "gate_rejections_total", reason=reason) == count
        assert total(samples, "gate_queue_rejected_total", reason=reason) == count
    reasons = {dict(labels)["reason"] for name, labels in samples if "rejected" in name}
    assert reasons == {"queue_full", "client_queue_full", "queue_timeout", "cancelled"}
