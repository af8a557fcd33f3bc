"""The light lane (proxy/lane.py): light GET/HEAD forwarded without Flask, answered as Flask would.

In process, the lane's own counter shows which path a request took; under gunicorn,
one gate takes the lane (no light limit) and one does not (a light limit to count),
and a client must not be able to tell their answers apart.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from fakeollama import FakeOllama
from pipeline import Call, pipeline_of
from proxy.lane import LightLane, lane_path
from settings import Settings
from signals import call_finished
from tests.support import Gate, client_requests

PEER = {"REMOTE_ADDR": "192.0.2.7"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def make_app(fake: FakeOllama) -> Iterator[Callable[..., Flask]]:
    made: list[Flask] = []

    def make(**changes: Any) -> Flask:
        changes.setdefault("limit_light", "off")
        app = create_app(Settings(upstream=fake.url, **changes))
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        pipeline_of(app).upstream.close()  # its keep-alive connections


def lane_of(app: Flask) -> LightLane:
    [lane] = [m for m in pipeline_of(app).middleware if isinstance(m, LightLane)]
    return lane


def warm(client: FlaskClient) -> None:
    """The first request of a worker goes through Flask (its before_request hooks run once)."""
    with client.get("/api/version", environ_base=PEER) as r:  # closed: the call ends
        assert r.status_code == 200


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def light_metric(app: Flask, client: FlaskClient) -> float:
    text = client.get("/metrics", environ_base=PEER).get_data(as_text=True)
    return sum(
        v for labels, v in samples(text, "gate_requests_total") if labels["class"] == "light"
    )


def test_light_reads_take_the_lane_once_warm(
    make_app: Callable[..., Flask], fake: FakeOllama
) -> None:
    app = make_app()
    lane = lane_of(app)
    client = app.test_client()
    warm(client)
    assert lane.served == 0
    before = light_metric(app, client)

    headers = {"X-Custom": "yes", "Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "5"}
    r = client.get("/api/tags?verbose=1", headers=headers, environ_base=PEER)
    assert r.status_code == 200
    direct = requests.get(fake.url + "/api/tags", timeout=5)
    assert r.json == direct.json()
    assert r.headers["Content-Type"] == direct.headers["Content-Type"]
    assert lane.served == 1
    seen = [rec for rec in client_requests(fake) if rec["query"] == "verbose=1"]
    assert len(seen) == 1
    assert seen[0]["headers"]["x-custom"] == "yes"
    assert seen[0]["headers"]["host"] == f"{fake.host}:{fake.port}"
    assert not {"x-hop", "keep-alive", "connection"} & set(seen[0]["headers"])

    r.close()  # the test client ends a call when its response is closed
    with client.get("/v1/models/llama3.2", environ_base=PEER) as r:
        assert r.status_code == 200 and r.json["id"] == "llama3.2"
    assert lane.served == 2
    # The lane's answers reach the metrics and the status page through call_finished.
    assert light_metric(app, client) == before + 2


def test_head_through_the_lane_has_no_body(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    warm(client)
    r = client.head("/", environ_base=PEER)
    assert r.status_code == 200 and r.data == b""
    assert lane_of(app).served == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/show", b"not json"),  # Flask answers the 400s
        ("POST", "/api/show", b'{"name": ""}'),
        ("POST", "/api/show", b"[" * 100_000 + b"]" * 100_000),
        ("POST", "/api/generate", b'{"model": ""}'),  # Flask answers the 400
        ("POST", "/api/chat", b'{"model": "a", "Model": "b"}'),
        ("POST", "/api/pull", b'{"model": "llama3.2"}'),  # admin: not the lane's
        ("GET", "/api/tags", b"{}"),  # a GET with a body
        ("GET", "/api//tags", None),  # Flask redirects it
        ("GET", "/v1/models/", None),
        ("GET", "/v1/models/café", None),  # Flask decodes UTF-8
        ("GET", "/api/other", None),  # the catch-all route
        ("DELETE", "/api/tags", None),
    ],
)
def test_what_the_lane_leaves_to_flask(
    make_app: Callable[..., Flask], method: str, path: str, body: bytes | None
) -> None:
    app = make_app()
    client = app.test_client()
    warm(client)
    with client.open(path, method=method, data=body, environ_base=PEER) as r:
        assert r.status_code < 500, r.data  # closed: a relayed answer frees its slot
    assert lane_of(app).served == 0


def test_light_posts_take_the_lane(make_app: Callable[..., Flask], fake: FakeOllama) -> None:
    app = make_app()
    lane = lane_of(app)
    client = app.test_client()
    warm(client)
    before = light_metric(app, client)
    body = b'{"model": "llama3.2", "verbose": false}'
    with client.post("/api/show", data=body, headers=JSON, environ_base=PEER) as r:
        assert r.status_code == 200, r.data
        direct = requests.post(fake.url + "/api/show", data=body, headers=JSON, timeout=5)
        assert r.json == direct.json()
    assert lane.served == 1
    seen = [rec for rec in client_requests(fake) if rec["path"] == "/api/show"]
    assert [rec["body_bytes"] for rec in seen] == [len(body), len(body)]
    assert light_metric(app, client) == before + 1
    # What the lane leaves to Flask gets Flask's answer, from the same bytes.
    with client.post("/api/show", data=b"{}", headers=JSON, environ_base=PEER) as r:
        assert r.status_code == 400 and r.json == {"error": "model is required"}
    with client.post("/api/show", data=b"x" * 100, environ_base=PEER) as r:
        assert r.status_code == 400 and r.json == {"error": "request body must be a JSON object"}
    assert lane.served == 1


def test_a_fleet_keeps_light_posts_in_flask(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    lane = lane_of(app)
    assert lane.posts  # one backend: the proxy's own pool
    lane.posts = {}
    client = app.test_client()
    warm(client)
    with client.post("/api/show", json={"model": "llama3.2"}, environ_base=PEER) as r:
        assert r.status_code == 200
    assert lane.served == 0


def test_lane_paths_come_from_the_contract() -> None:
    for path in ("/", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/v1/models/a:b"):
        assert lane_path(path), path


def test_a_light_limit_keeps_requests_in_flask(make_app: Callable[..., Flask]) -> None:
    app = make_app(limit_light="1000/minute")
    client = app.test_client()
    warm(client)
    r = client.get("/api/tags", environ_base=PEER)
    assert r.status_code == 200
    assert r.headers["X-RateLimit-Limit"] == "1000"  # Flask-Limiter counted it
    assert lane_of(app).served == 0


def keys_toml(tmp_path: Path, secrets: dict[str, str], extra: dict[str, str]) -> str:
    text = ""
    for name, secret in secrets.items():
        text += f'[keys.{name}]\nkey_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
        text += extra.get(name, "") + "\n"
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


def test_with_api_keys_only_a_valid_unlimited_key_takes_the_lane(
    make_app: Callable[..., Flask], fake: FakeOllama, tmp_path: Path
) -> None:
    secrets = {"alice": "og-alice-secret-1", "capped": "og-capped-secret-2"}
    path = keys_toml(tmp_path, secrets, {"capped": 'limit_light = "100/minute"'})
    app = make_app(api_keys_file=path)
    lane = lane_of(app)
    client = app.test_client()
    alice = {"Authorization": f"Bearer {secrets['alice']}"}
    assert client.get("/api/version", headers=alice, environ_base=PEER).status_code == 200

    r = client.get("/api/tags", headers={"X-Api-Key": secrets["alice"]}, environ_base=PEER)
    assert r.status_code == 200 and lane.served == 1
    (seen,) = [rec for rec in client_requests(fake) if rec["path"] == "/api/tags"]
    assert "x-api-key" not in seen["headers"]  # the gate's secret is not Ollama's

    r = client.get("/api/tags", environ_base=PEER)
    assert r.status_code == 401 and r.json == {
        "error": "missing API key: send Authorization: Bearer <key>"
    }
    r = client.get("/api/tags", headers={"Authorization": "Bearer og-nope"}, environ_base=PEER)
    assert r.status_code == 401 and r.json == {"error": "invalid API key"}
    capped = {"Authorization": f"Bearer {secrets['capped']}"}
    r = client.get("/api/tags", headers=capped, environ_base=PEER)
    assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "100"
    assert lane.served == 1  # only alice's
    assert len([rec for rec in client_requests(fake) if rec["path"] == "/api/tags"]) == 2


def test_upstream_failure_is_answered_in_the_contracts_shape(
    make_app: Callable[..., Flask], fake: FakeOllama
) -> None:
    app = make_app()
    client = app.test_client()
    warm(client)
    fake.stop()
    r = client.get("/api/tags", environ_base=PEER)
    assert r.status_code == 502
    assert r.json["error"].startswith(f"upstream {fake.url} unreachable (GET /api/tags)")
    r = client.get("/v1/models", environ_base=PEER)
    assert r.status_code == 502
    assert r.json["error"]["code"] == "upstream_unavailable"
    assert r.json["error"]["message"].startswith(
        f"upstream {fake.url} unreachable (GET /v1/models)"
    )
    assert lane_of(app).served == 0
    text = client.get("/metrics", environ_base=PEER).get_data(as_text=True)
    rejected = [(labels, v) for labels, v in samples(text, "gate_rejections_total") if v]
    assert rejected == [
        ({"status": "502", "reason": "upstream_unavailable", "class": "light"}, 2.0)
    ]


# -- under gunicorn: the lane and Flask answer alike ---------------------------------------

VARYING = {"date", "server"}
LIMIT_HEADERS = ("x-ratelimit-", "ratelimit")


def answer(
    gate: Gate, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[Any, ...]:
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        kept = sorted(
            (k.lower(), v)
            for k, v in resp.getheaders()
            if k.lower() not in VARYING and not k.lower().startswith(LIMIT_HEADERS)
        )
        return resp.status, resp.reason, kept, body
    finally:
        conn.close()


def test_the_lane_answers_as_flask_does(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    lane_gate = gate_factory(fake.url)  # no limits: light reads take the lane
    flask_gate = gate_factory(fake.url, {"GATE_LIMIT_LIGHT": "1000000/minute"})
    headers = {"X-Custom": "yes", "Connection": "keep-alive, X-Hop", "X-Hop": "1", "TE": "trailers"}
    show = b'{"model": "llama3.2"}'
    cases: list[tuple[str, str, bytes | None]] = [
        ("GET", "/api/tags", None),
        ("GET", "/api/tags?x=1&y=%20z", None),
        ("GET", "/api/version", None),
        ("GET", "/api/ps", None),
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("HEAD", "/api/tags", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/llama3.2", None),
        ("GET", "/v1/models/no-such-model", None),
        ("POST", "/api/show", show),
        ("POST", "/api/show?x=1", show),
        ("POST", "/api/show", b'{"model": "no-such-model"}'),
    ]
    for gate in (lane_gate, flask_gate):
        answer(gate, "GET", "/api/version", {})  # warm: each worker's first goes to Flask
    counted_before = [light_count(gate) for gate in (lane_gate, flask_gate)]
    for method, path, body in cases:
        fake.reset()
        via_lane = answer(lane_gate, method, path, headers, body)
        lane_seen = client_requests(fake)
        fake.reset()
        via_flask = answer(flask_gate, method, path, headers, body)
        flask_seen = client_requests(fake)
        assert via_lane == via_flask, (method, path)
        assert [
            (r["method"], r["path"], r["query"], r["headers"], r["body_bytes"]) for r in lane_seen
        ] == [
            (r["method"], r["path"], r["query"], r["headers"], r["body_bytes"]) for r in flask_seen
        ], (method, path)
    # Both gates counted every case they forwarded, each as answered in full.
    for gate, before in zip((lane_gate, flask_gate), counted_before, strict=True):
        assert light_count(gate) == before + len(cases)
        text = requests.get(gate.url + "/metrics", timeout=5).text
        outcomes = {labels["outcome"] for labels, v in samples(text, "gate_requests_total") if v}
        assert outcomes == {"ok"}


def light_count(gate: Gate) -> float:
    text = requests.get(gate.url + "/metrics", timeout=5).text
    return sum(
        v for labels, v in samples(text, "gate_requests_total") if labels["class"] == "light"
    )


# -- inference and embed POSTs ---------------------------------------------------------


def test_inference_and_embed_posts_take_the_lane(
    make_app: Callable[..., Flask], fake: FakeOllama
) -> None:
    app = make_app(limit_inference="off", limit_embed="off")
    lane = lane_of(app)
    client = app.test_client()
    warm(client)
    finished: list[Call] = []

    def note(sender: Flask, call: Call, **_: Any) -> None:
        finished.append(call)

    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/api/chat", chat),
        ("/api/chat", {**chat, "stream": True}),
        ("/api/generate", {"model": "m1", "prompt": "hi"}),
        ("/api/embed", {"model": "nomic-embed-text", "input": "hi"}),
        (
            "/v1/chat/completions",
            {**chat, "stream": True, "stream_options": {"include_usage": True}},
        ),
    ]
    with call_finished.connected_to(note, app):
        for path, body in cases:
            headers = {**JSON, "X-Gate-Priority": "batch", "X-Fake-Tokens": "3"}
            with client.post(path, json=body, headers=headers, environ_base=PEER) as r:
                assert r.status_code == 200, r.data
                assert float(r.headers["X-Gate-Queue-Wait"]) >= 0
                assert r.headers["X-Gate-Backend"] == f"{fake.host}:{fake.port}"
                r.get_data()
    assert lane.served == len(cases)
    assert [(c.cls, c.path, c.model, c.priority, c.outcome) for c in finished] == [
        ("inference", "/api/chat", "m1:latest", "batch", "ok"),
        ("inference", "/api/chat", "m1:latest", "batch", "ok"),
        ("inference", "/api/generate", "m1:latest", "batch", "ok"),
        ("embed", "/api/embed", "nomic-embed-text:latest", "batch", "ok"),
        ("inference", "/v1/chat/completions", "m1:latest", "batch", "ok"),
    ]
    assert [c.completion_tokens for c in finished if c.cls == "inference"] == [3, 3, 3, 3]
    assert all(c.prompt_tokens > 0 for c in finished)
    # X-Gate-Priority is the gate's own: never forwarded.
    assert not [r for r in client_requests(fake) if "x-gate-priority" in r["headers"]]
    queue = pipeline_of(app).queue
    assert queue is not None
    totals = queue.snapshot()["totals"]
    assert (totals["running"], totals["waiting"], totals["admitted"]) == (0, 0, len(cases))


@pytest.mark.parametrize(
    ("changes", "headers"),
    [
        ({"limit_inference": "1000/minute"}, {}),  # a limit to count
        ({"anon_tokens_per_minute": 1000}, {}),  # a token budget
        ({}, {"X-Gate-Priority": "urgent"}),  # a priority to refuse (400)
        ({}, {"Transfer-Encoding": "chunked"}),  # no Content-Length
    ],
)
def test_what_limits_an_inference_post_keeps_it_in_flask(
    make_app: Callable[..., Flask], changes: dict[str, Any], headers: dict[str, str]
) -> None:
    app = make_app(**{"limit_inference": "off", **changes})
    client = app.test_client()
    warm(client)
    body = b'{"model": "m1", "prompt": "hi", "stream": false}'
    with client.post("/api/generate", data=body, headers=headers, environ_base=PEER) as r:
        assert r.status_code in (200, 400), r.data
    assert lane_of(app).served == 0


# -- inference POSTs under gunicorn: the lane and Flask answer alike -----------------------
#
# Two gates differ in one thing only: in the lane's, the API keys have no model allow-list;
# in Flask's, they have one that allows every model ("*"), which keeps their requests in
# Flask (the limiter checks the models) and changes nothing else. No limit applies in
# either, so the answers carry the same headers.

SECRETS = {"alice": "og-alice-secret-1", "carol": "og-carol-secret-3", "bob": "og-bob-secret-2"}
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": False}
HOLD = {"X-Fake-Token-Interval": "0.2", "X-Fake-Tokens": "100"}  # 20 s unless cut


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}", "Content-Type": "application/json"}


def twin_gates(
    gate_factory: Callable[..., Gate], fake: FakeOllama, tmp_path: Path, env: dict[str, str]
) -> tuple[Gate, Gate]:
    """(the lane's gate, Flask's gate), alike but for the keys' allow-lists; both warm."""
    gates = []
    for via, models in (("lane", ""), ("flask", 'models = ["*"]')):
        folder = tmp_path / via
        folder.mkdir()
        extra = {"alice": models, "carol": models, "bob": 'models = ["m9"]'}
        keys = keys_toml(folder, SECRETS, extra)
        gate = gate_factory(
            fake.url, {"GATE_API_KEYS_FILE": keys, "GATE_ACCESS_LOG": "json", **env}
        )
        answer(gate, "GET", "/api/version", bearer("alice"))  # warm: the first goes to Flask
        gates.append(gate)
    return gates[0], gates[1]


def alike(reply: tuple[Any, ...]) -> tuple[Any, ...]:
    """An answer with what varies between two runs of the same request masked: numbers in
    the upstream's bodies (timestamps, durations, ids), the queue wait, Retry-After's
    estimate (from the jobs' measured durations) and hence Content-Length."""
    status, reason, headers, body = reply
    masked = {"content-length", "x-gate-queue-wait", "retry-after"}
    headers = [(k, "*" if k in masked else v) for k, v in headers]
    return status, reason, headers, re.sub(rb"[0-9]+", b"0", body)


def lane_served(gate: Gate) -> int:
    text = requests.get(
        gate.url + "/gate/status.json?history=0", headers=bearer("alice"), timeout=5
    )
    return int(text.json()["worker"]["lane_served"])


def access_lines(gate: Gate) -> list[dict[str, Any]]:
    """The access log's lines for the clients' requests, without what varies between runs."""
    lines = []
    for line in gate.logs().splitlines():
        if line.startswith("{") and '"outcome"' in line:
            record = json.loads(line)
            if record["path"].startswith("/gate/"):
                continue
            for varies in ("time", "wait", "ttfb", "duration"):
                record[varies] = record[varies] is not None
            lines.append(record)
    return sorted(lines, key=json.dumps)


def test_inference_posts_through_the_lane_answer_as_flask_does(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    lane_gate, flask_gate = twin_gates(gate_factory, fake, tmp_path, {})
    v1 = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[str, str, dict[str, str], dict[str, Any] | bytes]] = [
        ("alice", "/api/chat", {}, CHAT),
        ("alice", "/api/chat?x=1", {}, {**CHAT, "stream": True}),
        ("alice", "/api/generate", {}, {"model": "m1", "prompt": "hi"}),
        ("alice", "/api/generate", {}, {"model": "m1", "prompt": "hi", "stream": False}),
        ("alice", "/api/embed", {}, {"model": "nomic-embed-text", "input": "hi"}),
        ("alice", "/api/embeddings", {}, {"model": "nomic-embed-text", "prompt": "hi"}),
        ("alice", "/v1/chat/completions", {}, v1),
        ("alice", "/v1/chat/completions", {}, {**v1, "stream": True}),
        ("alice", "/v1/completions", {}, {"model": "m1", "prompt": "hi"}),
        ("alice", "/v1/embeddings", {}, {"model": "nomic-embed-text", "input": "hi"}),
        ("alice", "/api/chat", {"X-Gate-Priority": "batch"}, CHAT),
        ("alice", "/api/chat", {"X-Custom": "yes", "Connection": "X-Hop", "X-Hop": "1"}, CHAT),
        ("alice", "/api/chat", {"X-Fake-Status": "500"}, CHAT),  # the upstream's error
        ("alice", "/v1/chat/completions", {"X-Fake-Status": "404"}, v1),
        ("alice", "/api/generate", {"X-Fake-Die-After": "2"}, {"model": "m1", "prompt": "x"}),
        # Refusals: Flask answers them in both gates. (Bodies Flask must refuse are left
        # out: in Flask's gate the allow-list refuses them before the key is known.)
        ("alice", "/api/chat", {"X-Gate-Priority": "urgent"}, CHAT),
        ("bob", "/api/chat", {}, CHAT),  # a model outside bob's list: 403
        ("nobody", "/api/chat", {}, CHAT),  # no key: 401
    ]
    served_before = [lane_served(gate) for gate in (lane_gate, flask_gate)]
    for who, path, extra, body in cases:
        headers = {**bearer(who), **extra} if who in SECRETS else {**extra}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        fake.reset()
        via_lane = answer(lane_gate, "POST", path, headers, data)
        lane_seen = client_requests(fake)
        fake.reset()
        via_flask = answer(flask_gate, "POST", path, headers, data)
        flask_seen = client_requests(fake)
        assert alike(via_lane) == alike(via_flask), (path, extra, via_lane, via_flask)
        assert [
            (r["method"], r["path"], r["query"], r["headers"], r["body_bytes"]) for r in lane_seen
        ] == [
            (r["method"], r["path"], r["query"], r["headers"], r["body_bytes"]) for r in flask_seen
        ], (path, extra)
    forwarded = 15  # the cases before the refusals
    assert lane_served(lane_gate) == served_before[0] + forwarded
    assert lane_served(flask_gate) == served_before[1]
    for gate in (lane_gate, flask_gate):
        gate.assert_idle()
    # The same token counts, status board, metrics and access log lines.
    docs = [status_doc(gate) for gate in (lane_gate, flask_gate)]
    assert docs[0] == docs[1]
    assert metric_lines(lane_gate) == metric_lines(flask_gate)
    assert access_lines(lane_gate) == access_lines(flask_gate)
    # A body cut short (the client stops sending before Content-Length bytes): Flask's 400
    # (gunicorn ends such a body early without an error: what came is not JSON).
    # (Last: in Flask's gate the allow-list's check reads the body before the key is known,
    # so the access line of this refusal names the address.)
    cut = [cut_short(gate, bearer("alice")) for gate in (lane_gate, flask_gate)]
    assert cut[0] == cut[1]
    assert cut[0][0].startswith(b"HTTP/1.1 400 ")
    assert json.loads(cut[0][1]) == {"error": "request body must be a JSON object"}
    assert lane_served(lane_gate) == served_before[0] + forwarded


def cut_short(gate: Gate, headers: dict[str, str]) -> tuple[bytes, bytes]:
    """POST /api/chat announcing 100 bytes, sending 10, then no more: (status line, body)."""
    head = [f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{gate.port}\r\nContent-Length: 100"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + b'{"model": ')
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    return head_bytes.split(b"\r\n")[0], body


def status_doc(gate: Gate) -> dict[str, Any]:
    """What status.json counts of the clients' calls: admitted, refused, tokens, per model
    and per client."""
    doc = requests.get(
        gate.url + "/gate/status.json?history=0", headers=bearer("alice"), timeout=5
    ).json()
    counts = ("running", "waiting", "admitted", "rejected", "tokens_per_minute")
    return {
        "queue": {k: doc["queue"][k] for k in ("running", "waiting", "admitted", "rejected")},
        "models": {
            name: {k: v for k, v in row.items() if k in counts}
            for name, row in doc["models"].items()
        },
        "clients": {
            name: {k: v for k, v in row.items() if k in counts}
            for name, row in doc["clients"].items()
        },
        "totals": doc["totals"],
        "rejections": doc["rejections"]["total"],
    }


def metric_lines(gate: Gate) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The counters of the clients' calls (requests, refusals, tokens) from /metrics."""
    text = requests.get(gate.url + "/metrics", headers=bearer("alice"), timeout=5).text
    names = ("gate_requests_total", "gate_rejections_total", "gate_tokens_total")
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in names and s.value
    )


def send_generate(gate: Gate, who: str, extra: dict[str, str]) -> socket.socket:
    """A streamed /api/generate for m1 sent on a raw socket, its answer left unread."""
    payload = json.dumps({"model": "m1", "prompt": who}).encode()
    head = ["POST /api/generate HTTP/1.1", f"Host: 127.0.0.1:{gate.port}"]
    head += [f"{k}: {v}" for k, v in {**bearer(who), **extra}.items()]
    head.append(f"Content-Length: {len(payload)}")
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    return sock


def queue_state(gate: Gate) -> dict[str, Any]:
    doc = requests.get(
        gate.url + "/gate/status.json?history=0", headers=bearer("alice"), timeout=5
    ).json()
    queue: dict[str, Any] = doc["queue"]
    return queue


def wait_for(gate: Gate, running: int, waiting: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        queue = queue_state(gate)
        if (queue["running"], queue["waiting"]) == (running, waiting):
            return queue
        assert time.monotonic() < deadline, queue
        time.sleep(0.02)


def test_work_queue_refusals_through_the_lane_answer_as_flask_does(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    lane_gate, flask_gate = twin_gates(
        gate_factory, fake, tmp_path, {"GATE_QUEUE_MAX": "1", "GATE_QUEUE_MAX_PER_CLIENT": "1"}
    )
    replies: list[list[tuple[Any, ...]]] = []
    for gate in (lane_gate, flask_gate):
        got = []
        holder = send_generate(gate, "carol", HOLD)  # runs: m1's one slot
        wait_for(gate, running=1, waiting=0)
        waiter = send_generate(gate, "carol", {})
        wait_for(gate, running=1, waiting=1)
        # carol's share (1) is full: 429; the queue (1) is full for alice: 503.
        got.append(answer(gate, "POST", "/api/chat", bearer("carol"), json.dumps(CHAT).encode()))
        for path in ("/api/chat", "/v1/chat/completions", "/api/embed"):
            body = {**CHAT, "input": "x"} if path == "/api/embed" else CHAT
            got.append(answer(gate, "POST", path, bearer("alice"), json.dumps(body).encode()))
        # A waiting job whose client leaves gives its place up, and never reaches Ollama.
        waiter.close()
        queue = wait_for(gate, running=1, waiting=0)
        assert queue["rejected"]["cancelled"] == 1
        # At SIGTERM a waiting job gets 503.
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(
                answer, gate, "POST", "/v1/completions", bearer("alice"), b'{"model": "m1"}'
            )
            wait_for(gate, running=1, waiting=1)
            gate.proc.send_signal(signal.SIGTERM)
            got.append(late.result(timeout=10))
        holder.close()
        assert gate.proc.wait(15) == 0
        replies.append(got)
        posts = [(r["path"], r["json"]) for r in client_requests(fake) if r["method"] == "POST"]
        assert posts == [("/api/generate", {"model": "m1", "prompt": "carol"})], posts
        fake.reset()
    via_lane, via_flask = replies
    assert [r[0] for r in via_lane] == [429, 503, 503, 503, 503]
    assert [alike(r) for r in via_lane] == [alike(r) for r in via_flask]
    # The refusals' access lines (the holder's, written when the stopping worker notices
    # its client gone, may come too late for the log).
    refused = [
        [line for line in access_lines(gate) if line["outcome"] == "refused"]
        for gate in (lane_gate, flask_gate)
    ]
    assert refused[0] == refused[1]
    assert sorted(line["reason"] for line in refused[0] if line["method"] == "POST") == [
        "client_queue_full",
        "queue_full",
        "queue_full",
        "queue_full",
        "shutting_down",
    ]


def test_a_queue_timeout_through_the_lane_answers_as_flask_does(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    lane_gate, flask_gate = twin_gates(gate_factory, fake, tmp_path, {"GATE_QUEUE_TIMEOUT": "0.5"})
    replies = []
    for gate in (lane_gate, flask_gate):
        holder = send_generate(gate, "carol", HOLD)
        wait_for(gate, running=1, waiting=0)
        replies.append(
            answer(gate, "POST", "/api/chat", bearer("alice"), json.dumps(CHAT).encode())
        )
        holder.close()
        wait_for(gate, running=0, waiting=0)
        fake.reset()
    assert replies[0][0] == 503
    assert json.loads(replies[0][3]) == {
        "error": "no slot became free within 0.5 s; try again later"
    }
    assert alike(replies[0]) == alike(replies[1])
    access = [access_lines(gate) for gate in (lane_gate, flask_gate)]
    assert access[0] == access[1]
    (refused,) = [line for line in access[0] if line["path"] == "/api/chat"]
    assert refused["reason"] == "queue_timeout" and refused["client"] == "alice"
    # Its duration counts from when the lane began the call, the wait included.
    (line,) = [line for line in lane_gate.logs().splitlines() if '"queue_timeout"' in line]
    assert json.loads(line)["duration"] >= 0.5
