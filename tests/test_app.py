"""create_app: one typed Pipeline joins the layers, and the WSGI middleware run in request order."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request, request_started
from werkzeug.middleware.proxy_fix import ProxyFix

from app import create_app
from fakeollama import FakeOllama
from limiter.extension import GateLimiter
from limiter.fastpath import RejectCache
from limiter.keys import hash_secret
from pipeline import EXTENSION, Call, Pipeline, pipeline_of
from proxy.lane import LightLane
from settings import Settings
from signals import call_finished
from tests.support import ROOT
from workqueue import Admitter, WorkQueue

# Nothing listens there: forwarded requests answer 502 at once.
NOWHERE = "http://127.0.0.1:9"
OFF = dict(limit_inference="off", limit_embed="off", limit_admin="off", limit_light="off")


@pytest.fixture
def make_app() -> Iterator[Any]:
    made: list[Flask] = []

    def make(**changes: Any) -> Flask:
        app = create_app(Settings(**{"upstream": NOWHERE, **OFF, **changes}))
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        pipeline_of(app).upstream.close()


def test_the_layers_meet_in_one_typed_pipeline(make_app: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.alice]\nkey_sha256 = "{hash_secret("s3cret")}"\n')
    app = make_app(api_keys_file=str(keys))
    gate = app.extensions[EXTENSION]
    assert isinstance(gate, Pipeline) and gate is pipeline_of(app)
    assert not [name for name in app.extensions if name.startswith("gate.")]
    assert isinstance(gate.limiter, GateLimiter)
    assert gate.identify == gate.limiter.identify_lane
    assert gate.keys is gate.limiter.keyring and gate.keys is not None
    assert gate.keys.lookup("s3cret").name == "alice"
    assert isinstance(gate.admit, Admitter) and gate.queue is gate.admit.queue
    assert isinstance(gate.queue, WorkQueue)
    assert gate.shutdown == [gate.admit.close]
    assert gate.upstream.url == NOWHERE


def test_the_middleware_wrap_flask_in_request_order(make_app: Any) -> None:
    app = make_app(trusted_proxies=1, limit_inference="10/minute")
    stack = pipeline_of(app).middleware
    assert [type(m) for m in stack] == [ProxyFix, RejectCache, LightLane]
    proxy_fix, cache, lane = stack
    assert app.wsgi_app is proxy_fix
    assert proxy_fix.app is cache and cache.app is lane
    assert lane.wsgi_app == Flask.wsgi_app.__get__(app)  # Flask's own, innermost


def test_without_limits_or_trusted_proxies_only_the_lane_remains(make_app: Any) -> None:
    app = make_app()
    assert [type(m) for m in pipeline_of(app).middleware] == [LightLane]


def test_proxyfix_runs_before_the_reject_cache(make_app: Any) -> None:
    # The reject cache must see the client's address from X-Forwarded-For, as Flask does:
    # behind ProxyFix it turns away the one client over its limit, and only that one.
    app = make_app(trusted_proxies=1, limit_light="1/minute")
    reached: list[str] = []

    def note(sender: Flask, **_: Any) -> None:
        reached.append(request.remote_addr or "")

    client = app.test_client()
    first, second = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    with request_started.connected_to(note, app):
        codes = [client.get("/api/tags", headers=first).status_code for _ in range(3)]
        assert codes == [502, 429, 429]
        assert client.get("/api/tags", headers=second).status_code == 502
    # The third request never reached Flask: the reject cache answered it.
    assert reached == ["203.0.113.1", "203.0.113.1", "203.0.113.2"]


def test_proxyfix_runs_before_the_light_lane(make_app: Any, fake: FakeOllama) -> None:
    # The lane counts a light read under the address ProxyFix found, as Flask does.
    app = make_app(upstream=fake.url, trusted_proxies=1)
    [lane] = [m for m in pipeline_of(app).middleware if isinstance(m, LightLane)]
    clients: list[str] = []

    def note(sender: Flask, call: Call, **_: Any) -> None:
        clients.append(call.client)

    client = app.test_client()
    with call_finished.connected_to(note, app):
        for _ in range(2):  # the first goes through Flask (the lane waits for a warm worker)
            with client.get("/api/version", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
                assert r.status_code == 200
    assert lane.served == 1
    assert clients == ["203.0.113.7", "203.0.113.7"]


def test_a_gate_without_redis_storage_does_not_import_redis() -> None:
    # redis-py is about a tenth of a second of CPU to import in every gate process (and
    # the suite starts a hundred gates): only a gate whose storage is a Redis loads it.
    code = (
        "import sys, app, settings; "
        f"app.create_app(settings.Settings(upstream={NOWHERE!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stdout + proc.stderr
