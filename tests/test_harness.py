"""The test harness itself: gates stop at once, ports of parallel workers, and the hypothesis
profiles."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import settings

import tests.nginx_support
import tests.redis_support
import tests.support
from fakeollama import FakeOllama
from tests.nginx_support import start_nginx
from tests.redis_support import start_redis
from tests.support import (
    PORT_BASE,
    PORT_SLICE,
    Gate,
    alive,
    example_count,
    free_port,
    hypothesis_profile,
    listens_on,
    rewrite_ahead,
    start_gate,
)


def test_a_gate_stops_at_once_with_its_workers(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url)
    workers = gate.worker_pids()
    assert workers
    assert gate.stop() == -9  # SIGKILL to the group: no graceful drain
    assert [pid for pid in workers if alive(pid)] == []


@pytest.mark.parametrize(
    "environ, profile",
    [
        ({"CI": "true"}, "ci"),
        ({"CI": "1"}, "ci"),
        ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
        ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"),
        ({}, "dev"),
        ({"CI": "false"}, "dev"),
        ({"CI": ""}, "dev"),
    ],
)
def test_ci_loads_the_ci_profile(environ: dict[str, str], profile: str) -> None:
    assert hypothesis_profile(environ) == profile


@pytest.mark.parametrize("profile, count", [("ci", 500), ("dev", 100)])
def test_ci_runs_every_example_and_local_runs_a_fifth(profile: str, count: int) -> None:
    loaded = settings.get_current_profile_name()
    settings.load_profile(profile)
    try:
        assert example_count(500) == count
        assert example_count(20) == (20 if profile == "ci" else 10)
    finally:
        settings.load_profile(loaded)


@pytest.mark.parametrize("worker", ["gw0", "gw3"])
def test_each_xdist_worker_hands_out_ports_of_its_own_slice(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setattr(tests.support, "_given", set())
    first = PORT_BASE + int(worker[2:]) * PORT_SLICE
    ports = [free_port() for _ in range(50)]
    assert all(first <= port < first + PORT_SLICE for port in ports)
    assert len(set(ports)) == 50  # none handed out twice


def taken_first(port: int) -> Iterator[int]:
    """Ports as free_port hands them: ``port`` (which some other process holds) first."""
    yield port
    while True:
        yield free_port()


def test_a_gate_whose_port_another_gate_took_starts_on_another(
    gate: Gate, fake: FakeOllama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = taken_first(gate.port)  # the session's gate answers there: it must not pass for ours
    monkeypatch.setattr(tests.support, "free_port", lambda: next(ports))
    ours = start_gate(fake.url, tmp_path)
    try:
        assert ours.port != gate.port
        assert listens_on(ours.proc.pid, ours.port) and not listens_on(gate.proc.pid, ours.port)
        assert requests.get(ours.url + "/api/version", timeout=10).ok
        assert len(list(tmp_path.glob("gate-*.log"))) == 2  # the first try, stopped
    finally:
        ours.stop()


def test_redis_and_nginx_whose_port_was_taken_start_on_another(
    gate: Gate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = taken_first(taken)
        monkeypatch.setattr(tests.redis_support, "free_port", lambda: next(ports))
        server = start_redis(tmp_path / "redis")
        try:
            assert server.port != taken and listens_on(server.proc.pid, server.port)
            with server.client() as client:
                assert client.ping()
        finally:
            server.stop()
        ports = taken_first(taken)
        monkeypatch.setattr(tests.nginx_support, "free_port", lambda: next(ports))
        nginx = start_nginx(f"127.0.0.1:{gate.port}", tmp_path / "nginx")
        try:
            assert nginx.port != taken and listens_on(nginx.proc.pid, nginx.port)
            assert requests.get(nginx.url + "/api/version", timeout=10).ok
        finally:
            nginx.stop()


def test_pytest_reads_the_test_modules_rewritten_ahead(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # conftest rewrites the test modules once before pytest-xdist starts its workers, with
    # pytest's private rewrite functions (tests.support.rewrite_ahead): pytest must load
    # that pyc (asserts rewritten) as it stands, not write its own.
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_probe():\n    seen = [1]\n    assert seen == [2]\n")
    pyc = rewrite_ahead(request.config, probe)
    before = pyc.stat()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", probe.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stdout + run.stderr  # the probe fails, as written
    assert "assert [1] == [2]" in run.stdout  # its assert was rewritten
    after = pyc.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list(pyc.parent.iterdir()) == [pyc]  # and wrote none of its own beside it
