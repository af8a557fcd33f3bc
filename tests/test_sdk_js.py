"""ollama-js through the gate: tests/js/sdk_check.mjs runs under node and prints its results.

Nothing is skipped: without node_modules the test installs the locked
ollama-js with `npm ci` itself, and fails with the reason when it cannot.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from fakeollama import FakeOllama
from tests.support import ROOT, Gate, client_requests

JS = ROOT / "tests" / "js"
TEXT8 = "tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 "


def ensure_ollama_js() -> None:
    """Install the locked ollama-js (what `make js-deps` does) unless it is there."""
    if (JS / "node_modules" / "ollama" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm, "npm is not on PATH: install Node 20+ (make system-deps) to run the ollama-js test"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci in tests/js failed:\n{done.stdout}\n{done.stderr}"
    (JS / "node_modules" / ".installed").touch()


def test_ollama_js(gate: Gate, fake: FakeOllama) -> None:
    ensure_ollama_js()
    node = shutil.which("node")
    assert node, "node is not on PATH: install Node 20+ (make system-deps)"
    run = subprocess.run(
        [node, str(JS / "sdk_check.mjs"), gate.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"sdk_check.mjs failed:\n{run.stdout}\n{run.stderr}"
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert "llama3.2:latest" in out["list"] and "nomic-embed-text:latest" in out["list"]

    assert "".join(p["content"] for p in out["chat"]) == TEXT8
    assert [p["done"] for p in out["chat"]] == [False] * 8 + [True]

    assert len(out["embed"]) == 2 and all(len(v) == 8 for v in out["embed"])
    assert out["embed"][0] != out["embed"][1]

    # Cut after two lines: the SDK throws the gate's error record, not a JSON parse error.
    assert out["broken"]["parts"] == ["tok1 ", "tok2 "]
    assert out["broken"]["error"].startswith("upstream connection lost")

    records = client_requests(fake)
    assert [(r["method"], r["path"]) for r in records] == [
        ("GET", "/api/tags"),
        ("POST", "/api/chat"),
        ("POST", "/api/embed"),
        ("POST", "/api/chat"),
    ]
    assert all(r["headers"]["host"] == f"{fake.host}:{fake.port}" for r in records)
    assert records[1]["json"]["messages"] == [{"role": "user", "content": "hello from js"}]
    assert records[1]["json"]["stream"] is True
    assert records[2]["json"]["input"] == ["alpha", "beta"]
