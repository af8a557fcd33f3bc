"""`make demo` (scripts/demo.py): it serves on GATE_BIND, and stops at once, saying why,
when it cannot."""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.support import ROOT, free_port

DEMO = [sys.executable, str(ROOT / "scripts" / "demo.py")]
spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
assert spec is not None and spec.loader is not None
demo = sys.modules.setdefault("demo", importlib.util.module_from_spec(spec))
spec.loader.exec_module(demo)


def run_demo(bind: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "OLLAMA_"))}
    env["GATE_BIND"] = bind
    return subprocess.run(
        [*DEMO, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_demo_stops_at_once_when_its_address_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo(f"127.0.0.1:{port}", "--duration", "30", timeout=60)
        assert result.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
        assert "GATE_BIND=" in result.stderr  # and how to choose another address
        assert "gate at" not in result.stdout  # no gate reported, no simulator started
        # Nothing was sent to whatever listens there.
        taken.setblocking(False)
        with pytest.raises(BlockingIOError):
            taken.accept()


@pytest.mark.parametrize("bind", ["unix:/tmp/gate.sock", "8000", "127.0.0.1:http", "::1:0"])
def test_the_demo_refuses_an_address_without_a_port(bind: str) -> None:
    with pytest.raises(SystemExit, match="the demo needs HOST:PORT"):
        demo.parse_bind(bind)


@pytest.mark.parametrize(
    "bind, url",
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("[::]:8000", "http://[::1]:8000"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("gate.example:80", "http://gate.example:80"),
    ],
)
def test_the_demo_reaches_its_gate_where_gate_bind_says(bind: str, url: str) -> None:
    assert demo.url_for(*demo.parse_bind(bind)) == url


def test_the_demo_serves_on_gate_bind() -> None:
    port = free_port()
    result = run_demo(f"127.0.0.1:{port}", "--duration", "2", "--clients", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"gate at http://127.0.0.1:{port} in front of two simulated backends" in result.stdout
    done = result.stdout.rsplit("done: ", 1)[1]
    # Each client finishes the answer it is reading when the demo stops.
    assert ast.literal_eval(done.strip())["ok"] >= 2, result.stdout


def test_the_demo_runs_a_fleet_of_two_backends_of_different_sizes() -> None:
    def backends() -> dict[str, dict[str, object]]:
        with requests.get(running.url + "/gate/status.json?history=0", timeout=10) as resp:
            resp.raise_for_status()
            return {row["name"]: row for row in resp.json()["backends"]}

    with demo.running(f"127.0.0.1:{free_port()}", clients=2) as running:
        deadline = time.monotonic() + 60
        while not ({"up"} == {row["health"] for row in backends().values()} and running.stats):
            assert time.monotonic() < deadline, (backends(), running.stats)
            time.sleep(0.1)
        rows = backends()
        assert list(rows) == ["gpu-big", "gpu-small"]
        assert (rows["gpu-big"]["max_models"], rows["gpu-small"]["max_models"]) == (2, 1)
        assert (rows["gpu-big"]["vram"], rows["gpu-small"]["vram"]) == (8 * 2**30, 4 * 2**30)
        assert rows["gpu-big"]["installed"] == 4 and rows["gpu-small"]["installed"] == 3
    assert running.stats.get("ok", 0) >= 1, running.stats
