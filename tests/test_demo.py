"""`make demo` (scripts/demo.py): it serves on GATE_BIND, and stops at once, saying why,
when it cannot."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def test_the_demo_serves_a_fleet_of_two_backends_on_gate_bind(tmp_path: Path) -> None:
    # One run of `make demo` (it stops by itself after --duration) for all of it: the
    # status page lists both simulated backends while it runs, and its clients' answers
    # are counted when it stops.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "OLLAMA_"))}
    env["GATE_BIND"] = f"127.0.0.1:{port}"
    with (tmp_path / "demo.err").open("w+") as err:  # the gate's log: more than a pipe holds
        with subprocess.Popen(
            [*DEMO, "--duration", "8", "--clients", "2"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ) as proc:
            try:
                rows = backends_once_known(url, proc)
                out, _ = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
        err.seek(0)
        assert proc.returncode == 0, err.read()[-2000:]
    assert list(rows) == ["gpu-big", "gpu-small"]
    assert (rows["gpu-big"]["max_models"], rows["gpu-small"]["max_models"]) == (2, 1)
    assert (rows["gpu-big"]["vram"], rows["gpu-small"]["vram"]) == (8 * 2**30, 4 * 2**30)
    assert f"gate at {url} in front of two simulated backends" in out
    done = out.rsplit("done: ", 1)[1]
    # Each client finishes the answer it is reading when the demo stops.
    assert ast.literal_eval(done.strip())["ok"] >= 2, out


def backends_once_known(url: str, proc: subprocess.Popen[str]) -> dict[str, dict[str, object]]:
    """The status page's backend rows, once both are up with their models listed."""
    rows: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 60
    while not (
        {"up"} == {row["health"] for row in rows.values()}
        and (rows["gpu-big"]["installed"], rows["gpu-small"]["installed"]) == (4, 3)
    ):
        assert proc.poll() is None and time.monotonic() < deadline, rows
        time.sleep(0.1)
        with contextlib.suppress(requests.RequestException):  # not up yet
            with requests.get(url + "/gate/status.json?history=0", timeout=10) as resp:
                resp.raise_for_status()
                rows = {row["name"]: row for row in resp.json()["backends"]}
    return rows
