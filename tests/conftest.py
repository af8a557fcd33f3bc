"""Shared fixtures: a fake Ollama on a real socket, and the gate under real gunicorn.

The fake runs in a thread of the test process (so tests read what it saw
directly); each gate is a gunicorn process with the gevent worker, started the
way `make run` starts it, on a free loopback port.
"""

from __future__ import annotations

import os
import sys
import unittest
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import settings

from fakeollama import FakeOllama
from tests.nginx_support import Edits, Nginx, start_nginx
from tests.redis_support import RedisServer, start_redis
from tests.support import Gate, compile_ahead, hypothesis_profile, start_gate

# The suite writes bytecode even where PYTHONDONTWRITEBYTECODE is set (as `make test` does):
# each of the hundred and more gunicorn processes it starts would otherwise compile the
# gate's modules again, about a tenth of a second of CPU per gate. Set here, before
# pytest-xdist starts its workers, it reaches them and every process the tests start.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Property tests (hypothesis) state their full example count through
# tests.support.example_count(). The "ci" profile runs that count; it is loaded where CI is
# set (CI=true, as CI services set it) or with HYPOTHESIS_PROFILE=ci. Elsewhere the
# "dev" profile runs a fifth of it, for a quicker local suite.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(hypothesis_profile(os.environ))


# The suite runs in parallel under pytest-xdist (`make test`: -n 4 --dist loadgroup): each
# test is a unit of work a free worker takes, except that the tests of a module with a
# module-scoped fixture form one group that one worker runs, building the fixture once.
# Long tests (hypothesis state machines, Chromium, the bench and demo subprocesses, the
# fleet's backends going down and up) are started first, so that none of them starts last
# and keeps the run going while the other workers idle.
LONG_FILES = frozenset(
    {
        "test_status_browser.py",
        "test_status_fleet_browser.py",
        "test_bench_fleet.py",
        "test_demo.py",
        "test_fleet_gate.py",
    }
)


def _long(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    machine = isinstance(cls, type) and issubclass(cls, unittest.TestCase)  # hypothesis' stateful
    return machine or item.path.name in LONG_FILES


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist declares the marker too; declared here, a run without it (-p no:xdist) works.
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        try:
            compile_ahead(config)  # once, before the workers start
        except Exception as exc:  # a pytest whose private rewrite API moved: each worker's own
            print(
                f"conftest: compiling ahead failed ({exc!r}); the workers compile", file=sys.stderr
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope == "module" for chain in defs for d in chain):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=lambda item: not _long(item))  # stable: the order within each part stays


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeOllama]:
    """One fake Ollama for the session; reset before every test."""
    server = FakeOllama(token_interval=0.01)
    server.start()
    yield server
    server.stop()


FAKE_DEFAULTS = dict(
    token_interval=0.01,
    tokens=8,
    load_time=0.0,
    vram=None,
    vram_bytes=None,
    keep_alive=300,
    max_queue=None,
    on_overflow="queue",
    num_parallel=None,
    stall=0,
    die_after=None,
    fail_status=None,
)


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give every test a fake in its default state, and check it was left idle."""
    if "fake" not in request.fixturenames:
        yield
        return
    server: FakeOllama = request.getfixturevalue("fake")
    server.start_if_stopped()
    server.configure(**FAKE_DEFAULTS)
    server.reset()
    yield
    # Leak check: nothing the gate forwarded is still running at the upstream.
    server.wait_for(lambda s: not any(s["in_flight"].values()), timeout=5)


@pytest.fixture(autouse=True)
def _session_gate_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used a gate fixture: no slot held, no job waiting."""
    # Requested here, so that a test module's own ``gate`` is torn down after this check.
    used = request.getfixturevalue("gate") if "gate" in request.fixturenames else None
    yield
    if isinstance(used, Gate):
        used.assert_idle()


@pytest.fixture(scope="session")
def gate(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    """The gate in front of the session's fake Ollama, with default settings but no limits."""
    g = start_gate(fake.url, tmp_path_factory.mktemp("gate"))
    yield g
    g.stop()


@pytest.fixture
def gate_factory(tmp_path: Path) -> Iterator[Callable[..., Gate]]:
    """Start extra gates with their own settings; all are stopped after the test."""
    started: list[Gate] = []

    def factory(upstream: str, env: Mapping[str, str] | None = None, wait: bool = True) -> Gate:
        g = start_gate(upstream, tmp_path, env, wait=wait)
        started.append(g)
        return g

    yield factory
    try:
        for g in started:
            g.assert_idle()  # leak check, while the gates still run
    finally:
        for g in started:
            g.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session (tests flush it); see tests/redis_support.py."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start nginx with deploy/nginx.conf in front of a gate; stopped after the test.

    ``edits`` changes lines of the site file (see tests/nginx_support.py)."""
    started: list[Nginx] = []

    def factory(gate: Gate, edits: Edits = ()) -> Nginx:
        server = start_nginx(f"127.0.0.1:{gate.port}", tmp_path, edits=edits)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
