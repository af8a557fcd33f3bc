"""status/ without gunicorn: the Board, the access rule, and the routes through Flask's client."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from errors import Forbidden, QueueFull, Unauthorized
from fakeollama import FakeOllama
from pipeline import Call, pipeline_of
from settings import Settings
from signals import call_finished
from status import access
from status.board import HISTORY_SECONDS, Board, Rolling, mask_client, reason_of
from status.probe import UpstreamProbe
from workqueue.core import LaneSnapshot, QueueSnapshot

# -- the Board ----------------------------------------------------------------------------


def test_rolling_sums_the_last_span_seconds_only() -> None:
    rolling = Rolling(60)
    rolling.add(100.2, ("jobs", "m"))
    rolling.add(100.9, ("jobs", "m"), 2)
    rolling.add(130.0, ("jobs", "m"))
    assert rolling.totals(130.5)[("jobs", "m")] == 4
    assert rolling.totals(130.5, span=10)[("jobs", "m")] == 1
    assert rolling.totals(160.5)[("jobs", "m")] == 1  # second 100 left the window
    rolling.add(500.0, ("jobs", "m"))
    assert len(rolling._buckets) == 1  # old buckets are dropped, memory stays bounded


@pytest.mark.parametrize(
    ("client", "shown"),
    [
        ("alice", "alice"),
        ("203.0.113.57", "203.0.113.x"),
        ("::ffff:198.51.100.7", "198.51.100.x"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
        ("2001:db8:abcd:12::/64", "2001:db8:abcd::/48"),  # the limiter's IPv6 identity
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.x"),
    ],
)
def test_clients_are_shown_by_key_name_or_masked_address(client: str, shown: str) -> None:
    assert mask_client(client) == shown


def test_reasons_of_gate_errors_and_werkzeug_errors() -> None:
    from werkzeug.exceptions import MethodNotAllowed

    assert reason_of(QueueFull()) == (503, "queue_full")
    assert reason_of(Unauthorized("no key")) == (401, "invalid_api_key")
    assert reason_of(MethodNotAllowed()) == (405, "method_not_allowed")


def snapshot(waiting: int, running: int, oldest: float = 0.0) -> QueueSnapshot:
    """A work queue snapshot as workqueue.WorkQueue.snapshot() writes it."""
    lane: LaneSnapshot = {
        "running": running,
        "slots": 1,
        "waiting": waiting,
        "oldest_wait": oldest,
        "clients_waiting": 1 if waiting else 0,
        "admitted": 7,
        "rejected": {"queue_full": 2},
        "avg_seconds": 1.5,
        "active": running > 0,
        "draining": False,
    }
    admin: LaneSnapshot = {**lane, "running": 0, "waiting": 0, "rejected": {}, "active": False}
    return {
        "models": {"m1:latest": lane},
        "admin": admin,
        "clients": {"203.0.113.5": {"waiting": waiting, "running": running}},
        "totals": {
            "running": running,
            "waiting": waiting,
            "admitted": 7,
            "rejected": {"queue_full": 2},
            "active_models": ["m1:latest"] if running else [],
            "max_active_models": 1,
            "queue_max": 512,
            "queue_max_per_client": 32,
            "activations": 1,
            "forced_switches": 0,
            "avg_seconds": 1.5,
            "reaped": 0,
            "counted_again": 0,
        },
        "switch": {"pending": False, "target": None, "waited": 0.0, "draining": []},
        "retry_after": 3.0,
        "closed": False,
        "shared": False,
        "fallback": False,
    }


def test_document_combines_queue_rates_upstream_and_rejections() -> None:
    board = Board(1000.0, 0.0)
    for i in range(3):
        board.finished(
            10.0 + i,
            model="m1:latest",
            client="203.0.113.9",
            queued=True,
            waited=0.5,
            prompt_tokens=10,
            completion_tokens=20,
        )
    board.finished(
        12.0, model=None, client="x", queued=False, waited=0, prompt_tokens=0, completion_tokens=0
    )
    board.rejected(12.0, 429, "rate_limit_exceeded")
    board.rejected(12.5, 503, "queue_full")
    board.rejected(12.5, 503, "queue_full")
    board.sample(1012.0, snapshot(waiting=2, running=1, oldest=4.25))

    upstream = {"healthy": True, "loaded": [{"name": "m2:latest", "size_vram": 1}]}
    doc = board.document(13.0, 1013.0, snapshot=snapshot(2, 1, 4.25), upstream=upstream, worker={})

    assert doc["queue"]["waiting"] == 2 and doc["queue"]["running"] == 1
    assert doc["queue"]["oldest_wait"] == 4.25
    m1 = doc["models"]["m1:latest"]
    assert (m1["running"], m1["slots"], m1["waiting"], m1["active"]) == (1, 1, 2, True)
    assert m1["jobs_per_minute"] == 3.0
    assert m1["tokens_per_minute"] == 90.0
    assert m1["wait_avg"] == 0.5
    assert doc["models"]["m2:latest"]["loaded"] is True  # loaded upstream, unknown to the queue
    assert doc["models"]["m2:latest"]["running"] is None
    # 203.0.113.5 (queue) and .9 (finished calls) are one masked client.
    client = {"waiting": 2, "running": 1, "jobs_per_minute": 3.0, "tokens_per_minute": 90.0}
    assert doc["clients"] == {"203.0.113.x": client}
    assert doc["rejections"]["recent"] == {
        "429": {"rate_limit_exceeded": 1},
        "503": {"queue_full": 2},
    }
    assert doc["totals"] == {"requests": 4, "tokens_in": 30, "tokens_out": 60}
    history = doc["history"]
    assert history["waiting"] == [2] and history["running"] == [1]
    assert history["oldest_wait"] == [4.25] and history["wait"] == [0.5]

    later = board.document(13.0 + 901, 1914.0, snapshot=None, upstream={}, worker={})
    assert later["rejections"]["recent"] == {}  # out of the 15-minute window
    assert later["rejections"]["total"]["503"] == {"queue_full": 2}
    assert later["queue"] is None
    assert later["models"] == {}  # no queue, nothing in the last minute, nothing loaded


def test_history_is_a_bounded_ring_of_one_sample_a_second() -> None:
    board = Board(0.0, 0.0)
    for second in range(HISTORY_SECONDS + 50):
        board.sample(float(second), snapshot(waiting=second % 3, running=1))
    history = board.history_document()
    assert len(history["t"]) == HISTORY_SECONDS
    assert history["t"][0] == 50.0 and history["t"][-1] == HISTORY_SECONDS + 49
    assert board.sample(1e6, None).waiting is None  # no work queue: no depth, not zero


# -- GATE_STATUS_ACCESS -------------------------------------------------------------------


@dataclass
class Key:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Keyring:
    """The interface of the limiter's keyring: lookup(secret) -> key or None."""

    def __init__(self, **secrets: Key) -> None:
        self.by_digest = {hashlib.sha256(s.encode()).hexdigest(): k for s, k in secrets.items()}

    def lookup(self, secret: str) -> Key | None:
        return self.by_digest.get(hashlib.sha256(secret.encode()).hexdigest())


KEYS = Keyring(boss=Key("ops", "admin"), pleb=Key("alice", "user"))


def test_public_lets_everyone_in() -> None:
    access.check("public", "203.0.113.9", {}, None)


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_local_lets_loopback_in(addr: str) -> None:
    access.check("local", addr, {}, None)


@pytest.mark.parametrize("addr", ["203.0.113.9", "10.0.0.1", "2001:db8::1", "", None])
def test_local_refuses_other_addresses(addr: str | None) -> None:
    with pytest.raises(Forbidden):
        access.check("local", addr, {}, None)


def test_local_refuses_a_request_forwarded_by_a_proxy_it_does_not_trust() -> None:
    # nginx on the same host connects from 127.0.0.1; with GATE_TRUSTED_PROXIES=0 the gate
    # cannot tell who is behind it, so a forwarded request is not a local one.
    headers = {"X-Forwarded-For": "203.0.113.9"}
    with pytest.raises(Forbidden, match="a proxy"):
        access.check("local", "127.0.0.1", headers, None)
    # With trusted proxies the limiter's ProxyFix has put the client's address in remote_addr.
    access.check("local", "127.0.0.1", headers, None, trusted_proxies=1)
    with pytest.raises(Forbidden):
        access.check("local", "203.0.113.9", headers, None, trusted_proxies=1)


def test_admin_without_api_keys_refuses_everyone_and_says_why() -> None:
    with pytest.raises(Unauthorized, match="GATE_API_KEYS_FILE") as info:
        access.check("admin", "127.0.0.1", {"Authorization": "Bearer boss"}, None)
    assert "WWW-Authenticate" not in info.value.headers  # no key could help: no prompt


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer boss"},
        {"X-Api-Key": "boss"},
        {"Authorization": basic("anyone", "boss")},  # a browser's login prompt
        {"Authorization": basic("boss", "")},  # curl -u boss:
    ],
)
def test_admin_lets_an_admin_key_in(headers: dict[str, str]) -> None:
    access.check("admin", "203.0.113.9", headers, KEYS)


def test_admin_refuses_missing_unknown_and_user_keys() -> None:
    with pytest.raises(Unauthorized) as missing:
        access.check("admin", "127.0.0.1", {}, KEYS)
    assert missing.value.headers["WWW-Authenticate"].startswith("Basic")
    with pytest.raises(Unauthorized, match="invalid"):
        access.check("admin", "127.0.0.1", {"Authorization": "Bearer nope"}, KEYS)
    with pytest.raises(Forbidden, match="'alice' has role user"):
        access.check("admin", "127.0.0.1", {"Authorization": "Bearer pleb"}, KEYS)


def test_healthz_is_open_to_loopback_in_every_mode() -> None:
    for mode in ("public", "local", "admin"):
        access.check(mode, "127.0.0.1", {}, None, loopback_ok=True)
    with pytest.raises(Unauthorized):
        access.check("admin", "203.0.113.9", {}, KEYS, loopback_ok=True)


# -- the routes, through Flask's test client ----------------------------------------------

REMOTE = {"REMOTE_ADDR": "203.0.113.9"}
LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}
ROUTES = ["/gate/status", "/gate/status.json", "/metrics", "/gate/static/status.js"]


@pytest.fixture
def make_app(fake: FakeOllama) -> Iterator[Any]:
    made: list[Flask] = []

    def make(**changes: Any) -> Flask:
        app = create_app(Settings(upstream=fake.url, **changes))
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        pipeline_of(app).upstream.close()  # healthz probes through its keep-alive pool


@pytest.fixture
def client(make_app: Any) -> FlaskClient:
    return make_app().test_client()  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ROUTES)
def test_routes_in_public_mode(client: FlaskClient, path: str) -> None:
    with client.get(path, environ_base=REMOTE) as resp:  # closes the static file
        assert resp.status_code == 200
        assert resp.headers["Cache-Control"] in ("no-store", "no-cache")


@pytest.mark.parametrize("path", [*ROUTES, "/gate/healthz"])
def test_routes_in_local_mode(make_app: Any, path: str) -> None:
    client = make_app(status_access="local").test_client()
    with client.get(path, environ_base=LOOPBACK) as resp:
        assert resp.status_code == 200
    resp = client.get(path, environ_base=REMOTE)
    assert resp.status_code == 403
    assert "loopback" in resp.get_json()["error"]


@pytest.mark.parametrize("path", ROUTES)
def test_routes_in_admin_mode(make_app: Any, path: str) -> None:
    app = make_app(status_access="admin")
    client = app.test_client()
    resp = client.get(path, environ_base=LOOPBACK)
    assert resp.status_code == 401
    assert "GATE_API_KEYS_FILE" in resp.get_json()["error"]
    pipeline_of(app).keys = KEYS  # what create_app puts there when keys are configured
    resp = client.get(path, environ_base=REMOTE)
    assert resp.status_code == 401 and "WWW-Authenticate" in resp.headers
    user = {"Authorization": "Bearer pleb"}
    assert client.get(path, environ_base=REMOTE, headers=user).status_code == 403
    admin = {"Authorization": "Bearer boss"}
    with client.get(path, environ_base=REMOTE, headers=admin) as resp:
        assert resp.status_code == 200


def test_healthz_in_admin_mode_answers_loopback_without_a_key(make_app: Any) -> None:
    app = make_app(status_access="admin")
    pipeline_of(app).keys = KEYS
    client = app.test_client()
    assert client.get("/gate/healthz", environ_base=LOOPBACK).status_code == 200
    assert client.get("/gate/healthz", environ_base=REMOTE).status_code == 401


def test_the_gate_endpoints_are_never_forwarded(client: FlaskClient, fake: FakeOllama) -> None:
    assert client.post("/gate/status").status_code == 405
    assert client.delete("/metrics").status_code == 405
    assert client.put("/gate/healthz").status_code == 405
    assert client.get("/gate/nothing-here").status_code == 404
    assert client.post("/gate/status.json/x").status_code == 404
    assert client.get("/gate/").status_code == 302
    assert client.get("/gate/healthz").status_code == 200  # asks the upstream itself
    paths = [r["path"] for r in fake.stats()["requests"]]
    assert not [p for p in paths if p.startswith("/gate") or p == "/metrics"], paths


def test_status_json_without_a_work_queue(make_app: Any) -> None:
    app = make_app()
    pipeline_of(app).queue = None  # as in a gate built without workqueue/
    client = app.test_client()
    doc = client.get("/gate/status.json").get_json()
    assert doc["version"] == 1
    assert doc["queue"] is None
    assert doc["worker"]["sampling"] is False  # no gevent worker here: no background greenlets
    assert doc["upstream"]["healthy"] is None  # the page never probes; only healthz does
    assert set(doc["history"]) >= {"t", "waiting", "running", "oldest_wait", "wait"}
    assert "history" not in client.get("/gate/status.json?history=0").get_json()


def test_status_json_backends_for_a_fleet_of_one_follow_the_probe(
    make_app: Any, fake: FakeOllama
) -> None:
    client = make_app().test_client()
    (row,) = client.get("/gate/status.json").get_json()["backends"]
    assert row["health"] == "unknown" and row["probe_age"] is None
    assert client.get("/gate/healthz").status_code == 200  # probes the upstream
    (row,) = client.get("/gate/status.json").get_json()["backends"]
    assert row["health"] == "up" and row["url"] == fake.url
    assert row["probe_age"] >= 0 and row["version"] and row["last_error"] is None


class StubQueue:
    """Stands in for workqueue.WorkQueue: only snapshot() is read."""

    def __init__(self, snap: QueueSnapshot) -> None:
        self.snap = snap

    def snapshot(self) -> QueueSnapshot:
        return self.snap


def test_metrics_parse_and_count_calls(make_app: Any) -> None:
    app = make_app()
    pipeline_of(app).queue = StubQueue(snapshot(waiting=3, running=1, oldest=2.0))
    client = app.test_client()
    call = Call("inference", "POST", "/api/chat", "alice", model="m1:latest")
    call.waited, call.ttfb, call.status = 0.2, 0.05, 200
    call.prompt_tokens, call.completion_tokens = 11, 22
    call.ended = call.started + 1.5
    call_finished.send(app, call=call)
    client.post("/gate/status", environ_base=REMOTE)  # the gate's own 405: not counted
    client.post("/api/chat", data=b"not json")  # 400 from the proxy: counted

    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    m1 = (("model", "m1:latest"),)
    assert samples[("gate_jobs_waiting", m1)] == 3
    assert samples[("gate_jobs_running", m1)] == 1
    assert samples[("gate_jobs_admitted_total", m1)] == 7
    assert samples[("gate_queue_oldest_wait_seconds", m1)] == 2.0
    labels = (("class", "inference"), ("model", "m1:latest"))
    assert samples[("gate_queue_wait_seconds_count", labels)] == 1
    assert samples[("gate_queue_wait_seconds_sum", labels)] == pytest.approx(0.2)
    assert samples[("gate_upstream_ttfb_seconds_count", labels)] == 1
    assert samples[("gate_request_duration_seconds_sum", labels)] == pytest.approx(1.5)
    assert samples[("gate_tokens_total", (("direction", "in"), *m1))] == 11
    assert samples[("gate_tokens_total", (("direction", "out"), *m1))] == 22
    rejected = (("class", "inference"), ("reason", "invalid_request"), ("status", "400"))
    assert samples[("gate_rejections_total", rejected)] == 1
    assert not [k for k in samples if k[0] == "gate_rejections_total" and ("status", "405") in k[1]]


def test_each_app_has_its_own_registry(make_app: Any) -> None:
    one, two = make_app(), make_app()
    call = Call("embed", "POST", "/api/embed", "bob", model="e:latest")
    call_finished.send(one, call=call)
    assert b'model="e:latest"' in one.test_client().get("/metrics").data
    assert b'model="e:latest"' not in two.test_client().get("/metrics").data


# -- the upstream probe -------------------------------------------------------------------


def test_probe_caches_health_and_flips_with_the_upstream(fake: FakeOllama) -> None:
    now = [0.0]
    probe = UpstreamProbe(fake.url, timeout=1.0, max_age=1.0, clock=lambda: now[0])
    assert probe.check() is True and probe.probes == 1
    assert probe.version
    now[0] = 0.5
    assert probe.check() is True and probe.probes == 1  # fresh: answered from the cache
    fake.stop()
    try:
        now[0] = 0.9
        assert probe.check() is True  # still cached
        now[0] = 1.6
        assert probe.check() is False and probe.probes == 2
        assert probe.state()["error"] == "connection refused"
    finally:
        fake.start()
    now[0] = 3.0
    assert probe.check() is True


def test_probe_reads_loaded_models_from_api_ps(fake: FakeOllama) -> None:
    import requests

    requests.post(fake.url + "/api/generate", json={"model": "m2", "prompt": "x"}, timeout=10)
    probe = UpstreamProbe(fake.url)
    assert probe.probe("/api/ps") is True
    assert [m["name"] for m in probe.state()["loaded"]] == ["m2:latest"]


def test_poller_stops_when_nobody_watches(fake: FakeOllama) -> None:
    probe = UpstreamProbe(fake.url, ps_interval=0.02)
    probe.touch()
    started = time.monotonic()
    probe.run(idle=0.3)  # returns once no status request came for 0.3 s
    assert 0.3 <= time.monotonic() - started < 3
    assert probe.probes >= 3 and probe.healthy is True
    assert probe.state()["loaded_checked"] is not None


def test_history_wait_is_the_mean_of_the_last_ten_seconds() -> None:
    board = Board(0.0, 0.0)
    for waited in (1.0, 3.0):
        board.finished(
            0.5, model="m", client="c", queued=True, waited=waited, prompt_tokens=0,
            completion_tokens=0,
        )  # fmt: skip
    waits = [board.sample(float(second), None).wait for second in range(12)]
    assert waits[:10] == [2.0] * 10  # the two jobs count for ten seconds
    assert waits[10:] == [None, None]


def test_status_mask_clients_is_a_setting() -> None:
    assert Settings.from_env({}).status_mask_clients is True
    assert Settings.from_env({"GATE_STATUS_MASK_CLIENTS": "0"}).status_mask_clients is False
    assert Settings.from_env({"GATE_STATUS_MASK_CLIENTS": "on"}).status_mask_clients is True
    with pytest.raises(ValueError, match="GATE_STATUS_MASK_CLIENTS='maybe'"):
        Settings.from_env({"GATE_STATUS_MASK_CLIENTS": "maybe"})


def test_clients_unmasked_when_masking_is_off(make_app: Any) -> None:
    app = make_app(status_mask_clients=False)
    call = Call("inference", "POST", "/api/chat", "203.0.113.57", model="m1:latest")
    call.status = 200
    call_finished.send(app, call=call)
    doc = app.test_client().get("/gate/status.json").get_json()
    assert list(doc["clients"]) == ["203.0.113.57"]
    assert doc["worker"]["clients_masked"] is False
    assert doc["caps"]["queue_max"] == 512


# -- one set of refusal reasons ------------------------------------------------------------


def test_queue_reasons_are_the_error_codes_clients_get() -> None:
    from errors import ClientShareFull, QueueTimeout
    from workqueue.core import REASONS

    assert REASONS == (QueueFull.code, ClientShareFull.code, QueueTimeout.code, "cancelled")


def test_docs_name_every_reason_the_code_uses() -> None:
    import errors
    from workqueue.core import REASONS

    text = (Path(__file__).parent.parent / "docs" / "STATUS.md").read_text()
    section = text.split("## Refusal reasons")[1].split("\n## ")[0]
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GateError) and cls.code
    }
    assert codes, "no error codes found"
    for reason in codes | set(REASONS):
        assert f"`{reason}`" in section, reason
    assert "client_share" not in text and '"timeout"' not in text


# -- the metrics' counters and histograms ---------------------------------------------------


def test_tallies_write_what_prometheus_clients_instruments_write() -> None:
    """CounterTally and HistogramTally keep plain numbers: a scrape must read exactly what
    prometheus_client's Counter and Histogram would have written for the same updates,
    series removed on expiry included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from status.metrics import WAIT_BUCKETS, CounterTally, HistogramTally, Tallies

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    hist = HistogramTally("t_wait_seconds", "Waits", ("class", "model"), WAIT_BUCKETS)
    count = CounterTally("t_requests", "Requests", ("model", "code"))
    ours.register(Tallies((hist, count)))
    real_hist = Histogram(
        "t_wait_seconds", "Waits", ("class", "model"), buckets=WAIT_BUCKETS, registry=theirs
    )
    real_count = Counter("t_requests", "Requests", ("model", "code"), registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)  # no series yet: HELP and TYPE

    # Values on, below, between and past the bounds, and negative ones.
    values = [0.0, 0.005, 0.0051, 1, 1.5, 300, 300.1, 1e9, -2.0, 0.1 + 0.2]
    for i, value in enumerate(values):
        labels = ("inference", f"m{i % 3}")
        hist.observe(hist.child(labels), value)
        real_hist.labels(*labels).observe(value)
        count.child((f"m{i % 3}", "200"))[0] += i
        real_count.labels(f"m{i % 3}", "200").inc(i)
    assert generate_latest(ours) == generate_latest(theirs)

    hist.remove(("inference", "m1"))
    real_hist.remove("inference", "m1")
    count.remove(("m0", "200"))
    real_count.remove("m0", "200")
    hist.remove(("inference", "never"))  # removing a series never counted is a no-op
    assert generate_latest(ours) == generate_latest(theirs)
