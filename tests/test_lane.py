"""The light lane (proxy/lane.py): light GET/HEAD forwarded without Flask, answered as Flask would.

In process, the lane's own counter shows which path a request took; under gunicorn,
one gate takes the lane (no light limit) and one does not (a light limit to count),
and a client must not be able to tell their answers apart.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from fakeollama import FakeOllama
from pipeline import pipeline_of
from proxy.lane import LightLane, lane_path
from settings import Settings
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
        ("POST", "/api/generate", b'{"model": "llama3.2"}'),  # not light
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
    r = client.open(path, method=method, data=body, environ_base=PEER)
    assert r.status_code < 500, r.data
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
    lane.posts = False
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
