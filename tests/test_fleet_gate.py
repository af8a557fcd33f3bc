"""The gate in front of several fake Ollamas under real gunicorn: placement, the catalogue's
404, pins, a backend that dies and comes back."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from tests.support import Gate, client_requests

Fakes = dict[str, FakeOllama]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Three fake Ollamas with their own installed models.

    Tests name this fixture before gate_factory, so that their gates stop (and their
    pollers let go of the fakes' connections) before the fakes do.
    """
    servers = {
        "big": FakeOllama(
            token_interval=0.01, models="llama3.2=2GB,qwen2.5:7b=4GB,nomic-embed-text"
        ),
        "small": FakeOllama(token_interval=0.01, models="llama3.2=2GB,nomic-embed-text"),
        "solo": FakeOllama(token_interval=0.01, models="llama3.2=2GB,phi3=2GB"),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def backends_file(tmp_path: Path, fakes: Fakes, **extra: str) -> str:
    path = tmp_path / "backends.toml"
    text = ""
    for name, server in fakes.items():
        text += f'[backends.{name}]\nurl = "{server.url}"\n{extra.get(name, "")}\n'
    path.write_text(text)
    return str(path)


def start(gate_factory: Callable[..., Gate], tmp_path: Path, fakes: Fakes, **extra: str) -> Gate:
    path = backends_file(tmp_path, fakes, **extra)
    gate = gate_factory("http://127.0.0.1:9", {"GATE_BACKENDS_FILE": path})
    # The catalogue has read every backend once the first request is answered.
    assert requests.post(gate.url + "/api/generate", json=_gen("llama3.2"), timeout=30).ok
    return gate


def _gen(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "hi", "stream": False}


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_start_up_logs_the_backends_and_answers_name_their_backend(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    assert "fleet: 3 backends: big " in gate.logs()
    resp = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert resp.status_code == 200
    assert resp.headers["X-Gate-Backend"] == "solo"  # the only backend with phi3
    assert [r["model"] for r in client_requests(fakes["solo"])][-1] == "phi3:latest"
    metrics = requests.get(gate.url + "/metrics", timeout=10).text
    for name in fakes:
        assert f'gate_backend_up{{backend="{name}"}} 1.0' in metrics

    def solo_loaded() -> bool:  # the /api/ps poll after the job ended reaches /metrics
        text = requests.get(gate.url + "/metrics", timeout=10).text
        return 'gate_backend_models_loaded{backend="solo"} 0.0' not in text

    wait_for(solo_loaded)
    rows = {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]
    assert rows["solo"]["health"] == "up" and rows["solo"]["installed"] == 2


def test_placement_prefers_the_backend_with_the_model_loaded(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    # qwen2.5:7b runs only on big; after it, llama3.2 is loaded on whichever took it
    # first. Load nomic-embed-text on small directly, then ask the gate for it.
    requests.post(
        fakes["small"].url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"}
    ).raise_for_status()
    wait_for(lambda: "nomic-embed-text" in json.dumps(_status(gate)["backends"]))
    for _ in range(3):
        resp = requests.post(
            gate.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"}, timeout=30
        )
        assert resp.status_code == 200
        assert resp.headers["X-Gate-Backend"] == "small"
    assert fakes["big"].stats()["loads"].get("nomic-embed-text:latest", 0) == 0


def _status(gate: Gate) -> dict[str, object]:
    with requests.get(gate.url + "/gate/status.json", timeout=10) as resp:
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]


def test_a_model_installed_nowhere_is_ollamas_404_at_once_and_leaves_no_trace(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    before = {name: len(client_requests(server)) for name, server in fakes.items()}
    resp = requests.post(gate.url + "/api/chat", json={"model": "junk-1", "messages": []})
    assert resp.status_code == 404
    assert resp.json() == {"error": "model 'junk-1' not found"}
    resp = requests.post(
        gate.url + "/v1/chat/completions", json={"model": "junk-2", "messages": []}
    )
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "model 'junk-2' not found"
    assert resp.json()["error"]["code"] == "model_not_found"
    assert resp.json()["error"]["type"] == "not_found_error"  # Ollama's /v1 type for a 404
    # The refusals' own series exist now (one per status and reason, whatever the name).
    metrics = requests.get(gate.url + "/metrics", timeout=10).text
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda i: (
                    requests.post(
                        gate.url + "/api/generate", json=_gen(f"junk-{i}"), timeout=10
                    ).status_code
                ),
                range(300),
            )
        )
    assert set(codes) == {404}
    after = {name: len(client_requests(server)) for name, server in fakes.items()}
    assert after == before  # nothing forwarded
    models = _status(gate)["models"]
    assert not [name for name in models if name.startswith("junk")]
    later = requests.get(gate.url + "/metrics", timeout=10).text
    assert "junk" not in later
    # No new series, but the upstream probe's own, which it adds once it has polled.
    new = _series(later) - _series(metrics)
    assert all(name.startswith("gate_upstream_") for name in new), new


def _series(metrics: str) -> set[str]:
    return {line.rpartition(" ")[0] for line in metrics.splitlines() if not line.startswith("#")}


def test_a_pinned_model_only_runs_where_it_is_allowed(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(
        gate_factory,
        tmp_path,
        fakes,
        big='models = ["qwen*"]',
        small='models = ["nomic-embed-text"]',
    )
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda _: requests.post(gate.url + "/api/generate", json=_gen("llama3.2")),
                range(12),
            )
        )
    assert {resp.headers["X-Gate-Backend"] for resp in answers} == {"solo"}
    for name in ("big", "small"):
        assert "llama3.2:latest" not in [r["model"] for r in client_requests(fakes[name])]
    # phi3 is installed on solo only, nomic-embed-text allowed on small only.
    resp = requests.post(gate.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    assert resp.headers["X-Gate-Backend"] == "small"


def test_a_model_only_on_a_down_backend_is_503_and_the_backend_rejoins(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    fakes["solo"].kill()
    # The next phi3 request fails to connect (502: solo is down; the job has nowhere else to
    # go), unless solo's prober saw it down first, in which case it is already the 503.
    resp = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert resp.status_code in (502, 503)
    resp = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert resp.status_code == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert "down" in resp.json()["error"]
    # llama3.2 still runs elsewhere.
    resp = requests.post(gate.url + "/api/generate", json=_gen("llama3.2"), timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] != "solo"
    fakes["solo"].start()

    def back() -> bool:
        r = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
        return r.status_code == 200

    wait_for(back, timeout=30)


def test_queued_jobs_finish_elsewhere_when_their_backend_dies(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    for server in fakes.values():
        server.configure(token_interval=0.05, tokens=20)
    with ThreadPoolExecutor(12) as pool:
        futures = [
            pool.submit(
                requests.post,
                gate.url + "/api/generate",
                json={"model": "llama3.2", "prompt": "hi"},
                timeout=60,
            )
            for _ in range(12)
        ]
        wait_for(lambda: sum(len(s.stats()["requests"]) for s in fakes.values()) >= 4)
        fakes["small"].kill()
        answers = [future.result() for future in futures]
    for resp in answers:
        assert resp.status_code in (200, 502)
        if resp.headers.get("X-Gate-Backend") == "small":
            # Started on small before it died: the stream ends with the error line.
            assert '"error"' in resp.text.strip().splitlines()[-1]
    finished_elsewhere = [
        resp for resp in answers if resp.headers.get("X-Gate-Backend") in ("big", "solo")
    ]
    assert len(finished_elsewhere) >= 12 - 3
    fakes["small"].start()


def test_a_job_waiting_for_a_model_whose_only_backend_dies_gets_503_model_unavailable(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    # phi3 is only on solo, which holds one model at a time; llama3.2 runs only there too.
    two = {"solo": fakes["solo"], "small": fakes["small"]}
    path = backends_file(
        tmp_path, two, solo="max_models = 1", small='models = ["nomic-embed-text"]'
    )
    gate = gate_factory(
        "http://127.0.0.1:9", {"GATE_BACKENDS_FILE": path, "GATE_SWITCH_AFTER": "600"}
    )
    first = requests.post(gate.url + "/api/generate", json=_gen("llama3.2"), timeout=30)
    assert first.ok and first.headers["X-Gate-Backend"] == "solo"

    def solo_row() -> dict[str, object]:
        rows = {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]
        return rows["solo"]  # type: ignore[no-any-return]

    # llama3.2 stays loaded on solo and keeps its place there for switch_after (600 s),
    # so a phi3 job waits; the only event left that could place it is solo going down.
    wait_for(lambda: "llama3.2:latest" in solo_row()["loaded"])  # type: ignore[operator]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            requests.post,
            gate.url + "/v1/chat/completions",
            json={"model": "phi3", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,  # far below the queue timeout (300 s): it must not be what ends it
        )
        wait_for(lambda: _status(gate)["queue"]["waiting"] == 1)  # type: ignore[index]
        fakes["solo"].kill()
        resp = waiting.result()
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert "down" in resp.json()["error"]["message"]
    assert solo_row()["health"] == "down"
    assert not [r for r in client_requests(fakes["solo"]) if r["model"] == "phi3:latest"]
    queue = _status(gate)["queue"]
    assert queue["waiting"] == 0 and queue["running"] == 0  # type: ignore[index]
    rejected = queue["rejected"]  # type: ignore[index]
    assert rejected.get("model_unavailable") == 1 and rejected["queue_timeout"] == 0
    # A new request for phi3 is answered so by admission, as before.
    again = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert again.status_code == 503 and "down" in again.json()["error"]
    fakes["solo"].start()


def test_tags_ps_and_models_are_unions_and_show_asks_a_backend_with_the_model(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    tags = requests.get(gate.url + "/api/tags", timeout=10)
    assert tags.status_code == 200
    names = sorted(entry["model"] for entry in tags.json()["models"])
    assert names == ["llama3.2:latest", "nomic-embed-text:latest", "phi3:latest", "qwen2.5:7b"]
    assert tags.headers["X-Gate-Backend"] == "big,small,solo"
    models = requests.get(gate.url + "/v1/models", timeout=10).json()
    assert sorted(entry["id"] for entry in models["data"]) == names
    requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30).raise_for_status()
    loaded = [entry["model"] for entry in requests.get(gate.url + "/api/ps").json()["models"]]
    assert "phi3:latest" in loaded and "llama3.2:latest" in loaded
    show = requests.post(gate.url + "/api/show", json={"model": "qwen2.5:7b"}, timeout=10)
    assert show.status_code == 200 and show.headers["X-Gate-Backend"] == "big"
    # A backend that is down drops out of the union.
    fakes["solo"].kill()
    requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)  # solo: down
    names = sorted(
        entry["model"] for entry in requests.get(gate.url + "/api/tags").json()["models"]
    )
    assert "phi3:latest" not in names and "qwen2.5:7b" in names
    fakes["solo"].start()


def test_a_model_pulled_or_copied_through_the_gate_is_usable_through_it(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes)
    assert requests.post(gate.url + "/api/generate", json=_gen("mistral")).status_code == 404
    pulled = requests.post(gate.url + "/api/pull", json={"model": "mistral", "stream": False})
    assert pulled.status_code == 200
    where = pulled.headers["X-Gate-Backend"]

    def usable() -> bool:
        resp = requests.post(gate.url + "/api/generate", json=_gen("mistral"), timeout=30)
        return resp.status_code == 200 and resp.headers["X-Gate-Backend"] == where

    wait_for(usable)
    copied = requests.post(
        gate.url + "/api/copy", json={"source": "mistral", "destination": "mistral-copy"}
    )
    assert copied.status_code == 200 and copied.headers["X-Gate-Backend"] == where
    # A copy goes where its source is: phi3 is on solo only.
    copied = requests.post(gate.url + "/api/copy", json={"source": "phi3", "destination": "p2"})
    assert copied.status_code == 200 and copied.headers["X-Gate-Backend"] == "solo"
    wait_for(lambda: requests.post(gate.url + "/api/generate", json=_gen("mistral-copy")).ok)
    deleted = requests.delete(gate.url + "/api/delete", json={"model": "mistral-copy"})
    assert deleted.status_code == 200
    wait_for(
        lambda: (
            requests.post(gate.url + "/api/generate", json=_gen("mistral-copy")).status_code == 404
        )
    )


def test_one_upstream_is_named_in_x_gate_backend(gate: Gate, fake: FakeOllama) -> None:
    name = fake.url.removeprefix("http://")  # host:port
    resp = requests.post(gate.url + "/api/generate", json=_gen("llama3.2"), timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == name
    for _ in range(2):  # through Flask, then the light lane
        assert requests.get(gate.url + "/api/tags").headers["X-Gate-Backend"] == name


def test_healthz_is_ok_while_any_backend_is_up(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    two = {name: fakes[name] for name in ("big", "solo")}
    gate = start(gate_factory, tmp_path, two)

    def health() -> tuple[int, dict[str, Any]]:
        resp = requests.get(gate.url + "/gate/healthz", timeout=10)
        return resp.status_code, resp.json()

    status, doc = health()
    assert status == 200 and set(doc["backends"]) == set(two)
    fakes["big"].kill()  # the first backend: healthz once looked at it alone
    wait_for(lambda: health()[1]["backends"]["big"]["health"] == "down")
    assert health()[0] == 200  # solo still serves
    fakes["solo"].kill()
    wait_for(lambda: health()[0] == 503)
    assert health()[1]["error"] == "cannot forward: no backend is up"
    fakes["solo"].start()
    wait_for(lambda: health()[0] == 200)


def test_timeouts_in_a_row_take_a_backend_down(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    path = backends_file(tmp_path, fakes)
    gate = gate_factory(
        "http://127.0.0.1:9", {"GATE_BACKENDS_FILE": path, "GATE_UPSTREAM_TIMEOUT": "1"}
    )
    # The first request, answered as soon as solo's models are known, goes to solo even
    # while the others' lists are still being read (it once went to one of them: 404).
    first = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert first.ok, (first.status_code, first.headers, first.text)
    assert first.headers["X-Gate-Backend"] == "solo"
    codes = [
        requests.post(
            gate.url + "/api/generate",
            json=_gen("phi3"),
            headers={"X-Fake-Stall": "2"},
            timeout=30,
        ).status_code
        for _ in range(3)
    ]
    assert codes == [504, 504, 504]
    resp = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert resp.status_code == 503 and "down" in resp.json()["error"]  # solo is down
    rows = {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]
    assert rows["solo"]["health"] == "down" and "in time" in str(rows["solo"]["last_error"])
    # Its probes still answer: it rejoins after two good ones.
    wait_for(
        lambda: requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30).ok,
        timeout=30,
    )


@pytest.fixture
def pair() -> Iterator[Fakes]:
    """Two fake Ollamas with the same model: ``slow`` first in the backends file."""
    servers = {
        "slow": FakeOllama(token_interval=0.01, models="phi3=2GB"),
        "fast": FakeOllama(token_interval=0.01, models="phi3=2GB"),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def _generations(server: FakeOllama) -> list[dict[str, Any]]:
    return [r for r in client_requests(server) if r["path"] == "/api/generate"]


def test_a_job_whose_backend_sent_no_headers_in_time_is_placed_again_once(
    pair: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    path = backends_file(tmp_path, pair)
    gate = gate_factory(
        "http://127.0.0.1:9", {"GATE_BACKENDS_FILE": path, "GATE_UPSTREAM_TIMEOUT": "1"}
    )

    # Both backends are empty: the job goes to the first one, which holds every model
    # request (its health probe still answers) past the gate's header timeout. Once the
    # gate has read both backends' models, that is: on a busy machine the first request
    # may come before it has read the slow one's, and go to the fast one at once.
    def both_read() -> bool:
        rows = _status(gate)["backends"]
        return all(row["installed"] == 1 for row in rows)  # type: ignore[union-attr, index]

    wait_for(both_read)
    pair["slow"].configure(stall=30)
    resp = requests.post(
        gate.url + "/api/generate", json={"model": "phi3", "prompt": "hi"}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Gate-Backend"] == "fast"
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert lines[-1]["done"] is True and not [line for line in lines if "error" in line]
    assert len(_generations(pair["slow"])) == 1 and len(_generations(pair["fast"])) == 1
    # The gate gave the stalled request up: the slow backend saw its client leave.
    wait_for(lambda: pair["slow"].stats()["disconnects"] >= 1)
    queue = _status(gate)["queue"]
    assert queue["admitted"] == 1  # type: ignore[index]  # counted once, placed twice
    assert queue["running"] == 0 and queue["waiting"] == 0  # type: ignore[index]
    rows = {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]
    assert rows["slow"]["health"] == "up"  # one timeout does not take a backend down

    # Placed again once only: when the second backend stalls too, the client gets the 504.
    pair["fast"].configure(stall=30)
    resp = requests.post(gate.url + "/api/generate", json=_gen("phi3"), timeout=30)
    assert resp.status_code == 504, resp.text
    assert len(_generations(pair["slow"])) + len(_generations(pair["fast"])) == 4
    for server in pair.values():
        server.configure(stall=0)


def _unloads(server: FakeOllama) -> list[tuple[str, float]]:
    """The keep_alive: 0 requests that reached ``server``: (model, when)."""
    return [
        (r["model"], r["time"])
        for r in server.stats()["requests"]
        if isinstance(r["json"], dict) and r["json"].get("keep_alive") == 0
    ]


def test_a_new_place_unloads_the_idle_model_it_replaces_never_a_running_one(
    gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    one = FakeOllama(token_interval=0.01, models="qwen2.5=2GB,phi3=2GB,llama3.2=2GB").start()
    two = FakeOllama(token_interval=0.01, models="nomic-embed-text").start()
    try:
        path = backends_file(tmp_path, {"one": one, "two": two}, one="max_models = 2")
        gate = gate_factory(
            "http://127.0.0.1:9",
            {
                "GATE_BACKENDS_FILE": path,
                "GATE_UNLOAD_ON_SWITCH": "1",
                "GATE_SWITCH_AFTER": "0",  # an idle model keeps no place
            },
        )

        def loaded() -> list[str]:
            rows = {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]
            return sorted(rows["one"]["loaded"])  # type: ignore[arg-type]

        assert requests.post(gate.url + "/api/generate", json=_gen("qwen2.5"), timeout=30).ok
        wait_for(lambda: loaded() == ["qwen2.5:latest"])
        # phi3 streams beside the idle qwen2.5 (two places: nothing replaced) for as long as
        # this test reads it: its end is the test's to choose, never the clock's
        running = requests.post(
            gate.url + "/api/generate",
            json={"model": "phi3", "prompt": "hi"},
            headers={"X-Fake-Tokens": "100000", "X-Fake-Token-Interval": "0.05"},
            stream=True,
            timeout=60,
        )
        try:
            assert running.status_code == 200
            wait_for(lambda: one.stats()["in_flight"].get("phi3:latest") == 1)
            wait_for(lambda: sorted(loaded()) == ["phi3:latest", "qwen2.5:latest"])
            assert _unloads(one) == []
            # llama3.2 needs a place: the idle qwen2.5 makes way, never the running phi3
            resp = requests.post(gate.url + "/api/generate", json=_gen("llama3.2"), timeout=30)
            assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == "one"
            assert one.stats()["in_flight"].get("phi3:latest") == 1  # still streaming
            first = json.loads(next(running.iter_lines()))
            assert first["model"] == "phi3" and first["done"] is False
        finally:
            running.close()
        # the client left: the gate ends phi3's upstream call too
        wait_for(lambda: not one.stats()["in_flight"].get("phi3:latest"))
        unloads = _unloads(one)
        assert [model for model, _ in unloads] == ["qwen2.5:latest"]
        (llama,) = [r for r in client_requests(one) if r["model"] == "llama3.2:latest"]
        assert unloads[0][1] < llama["time"]  # sent before the job that took its place
        stats = one.stats()
        assert stats["unloads"] == {"qwen2.5:latest": 1}
        assert stats["evictions"] == {}  # Ollama had nothing left to evict
        assert _unloads(two) == []
    finally:
        one.stop()
        two.stop()


CAP_SECRETS = {name: new_secret() for name in ("batch", "alice")}
SLOW = {"X-Fake-Token-Interval": "0.15", "X-Fake-Tokens": "10"}  # about 1.5 s each


def unanswered(fake: FakeOllama, client: str) -> set[int]:
    """``client``'s requests (by their prompt) that reached ``fake`` and have no answer yet.

    A record's status is set before the fake sends the answer, so the gate holds the job's
    slot for at least as long as its record is unanswered."""
    return {
        number
        for number, record in enumerate(client_requests(fake))
        if record["status"] is None
        and str((record["json"] or {}).get("prompt", "")).startswith(client)
    }


class RunningPeak:
    """While open, samples the most jobs of one client seen running at once: by the gate's
    status.json, and at the fakes, without ever counting one too many (a job at the
    first fake counts only if it is still unanswered after the second was read)."""

    def __init__(self, gate: Gate, fakes: list[FakeOllama], client: str) -> None:
        self.gate, self.fakes, self.client = gate, fakes, client
        self.at_gate = self.at_fakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> RunningPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        first, second = self.fakes
        while not self._stop.is_set():
            try:
                row = _status(self.gate)["clients"].get(self.client, {})  # type: ignore[attr-defined]
                seen = unanswered(first, self.client)
                now = len(unanswered(second, self.client))
                now += len(seen & unanswered(first, self.client))
            except requests.RequestException:
                continue  # the gate stops when the test failed: its error tells
            self.at_gate = max(self.at_gate, row.get("running", 0))
            self.at_fakes = max(self.at_fakes, now)


def test_a_keys_running_cap_holds_across_backends_and_a_reload_changes_it(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    alice = stanza("alice", CAP_SECRETS["alice"])
    keys.write_text(stanza("batch", CAP_SECRETS["batch"], max_running=1) + alice)
    # Two models, each on its own backend, with two slots there: a slot is free for
    # alice on each while batch runs one job.
    two = {name: fakes[name] for name in ("big", "solo")}
    path = backends_file(
        tmp_path,
        two,
        big='models = ["llama3.2"]\nmodel_concurrency = 2',
        solo='models = ["phi3"]\nmodel_concurrency = 2',
    )
    gate = gate_factory(
        "http://127.0.0.1:9",
        {"GATE_BACKENDS_FILE": path, "GATE_API_KEYS_FILE": str(keys)},
    )
    models = {"llama3.2": "big", "phi3": "solo"}

    def send(name: str, model: str, number: int, headers: dict[str, str]) -> requests.Response:
        body = {"model": model, "prompt": f"{name} {number}", "stream": False}
        auth = {**headers, "Authorization": f"Bearer {CAP_SECRETS[name]}"}
        return requests.post(gate.url + "/api/generate", json=body, headers=auth, timeout=60)

    def batch() -> dict[str, int]:
        rows: dict[str, dict[str, int]] = _status(gate)["clients"]  # type: ignore[assignment]
        return {k: v for k, v in rows.get("batch", {}).items() if k in ("running", "waiting")}

    with ThreadPoolExecutor(8) as pool, RunningPeak(gate, list(two.values()), "batch") as peak:
        flood = [pool.submit(send, "batch", model, n, SLOW) for n in range(2) for model in models]
        wait_for(lambda: batch() == {"running": 1, "waiting": 3})
        # alice's jobs take the free slots on both backends while batch's wait.
        for n, (model, backend) in enumerate(models.items()):
            resp = send("alice", model, n, {"X-Fake-Tokens": "1"})
            assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == backend
        arrived = sum(len(client_requests(fake)) for fake in two.values()) - 2
        assert arrived < 4  # batch's flood was still queued at the gate (jobs of 1.5 s)
        answers = [future.result() for future in flood]
    assert (peak.at_gate, peak.at_fakes) == (1, 1)  # one batch job at a time, anywhere
    assert [resp.status_code for resp in answers] == [200] * 4
    assert {resp.headers["X-Gate-Backend"] for resp in answers} == {"big", "solo"}

    # A reload raises batch's cap to 2: its next jobs run two at a time, never three.
    keys.write_text(stanza("batch", CAP_SECRETS["batch"], max_running=2) + alice)
    gate.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: 2 keys" in gate.logs())
    with ThreadPoolExecutor(8) as pool, RunningPeak(gate, list(two.values()), "batch") as peak:
        flood = [
            pool.submit(send, "batch", model, n, SLOW) for n in range(2, 4) for model in models
        ]
        wait_for(lambda: batch() == {"running": 2, "waiting": 2})
        answers = [future.result() for future in flood]
    assert [resp.status_code for resp in answers] == [200] * 4
    assert peak.at_gate == 2 and peak.at_fakes <= 2
