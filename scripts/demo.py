"""`make demo`: the gate in front of the built-in Ollama simulator, with some load.

Starts the simulator (fakeollama: room for two models, slow loads, streamed
tokens), the gate under gunicorn in front of it, and a handful of clients that
keep asking four models for completions. Open the printed URL and watch; stop
with Ctrl-C (or pass --duration to stop by itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

MODELS = ["llama3.2:latest", "qwen2.5:0.5b", "m1:latest", "m2:latest"]


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    """The simulator on a free port: two models fit in its "VRAM", loads take 1.5 s."""
    cmd = [
        sys.executable, "-m", "fakeollama", "--port", "0", "--vram", "2", "--load-time", "1.5",
        "--token-interval", "0.05", "--tokens", "30", "--no-record",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        raise SystemExit(f"simulator did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


def start_gate(upstream: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("GATE_MAX_ACTIVE_MODELS", "1")
    env.setdefault("GATE_MODEL_CONCURRENCY", "2")
    env.setdefault("GATE_SWITCH_AFTER", "8")
    env.setdefault("GATE_LIMIT_INFERENCE", "off")
    env.update({"GATE_UPSTREAM": upstream, "GATE_BIND": f"127.0.0.1:{port}"})
    gunicorn = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen(
        [str(gunicorn), "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            requests.get(url + "/api/version", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("the gate did not start")


def client(
    url: str, name: str, stop: threading.Event, stats: dict[str, int], key: str | None = None
) -> None:
    """Keep asking one of the models for a streamed completion, pausing in between."""
    session = requests.Session()
    if key is not None:
        session.headers["Authorization"] = f"Bearer {key}"
    rng = random.Random(name)
    while not stop.is_set():
        model = rng.choice(MODELS)
        body = {"model": model, "prompt": f"hello from {name}", "stream": True}
        try:
            with session.post(url + "/api/generate", json=body, stream=True, timeout=120) as r:
                key = str(r.status_code)
                for line in r.iter_lines():
                    if line and json.loads(line).get("done"):
                        key = "ok"
                stats[key] = stats.get(key, 0) + 1
        except requests.RequestException as exc:
            stats[type(exc).__name__] = stats.get(type(exc).__name__, 0) + 1
        stop.wait(rng.uniform(0.2, 1.5))


def shut_down(
    stop: threading.Event, threads: list[threading.Thread], procs: tuple[subprocess.Popen, ...]
) -> None:
    """Stop the load clients (each finishes the answer it is reading), then the processes."""
    stop.set()
    for t in threads:
        t.join(30)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="gate port (default 8000)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0 = until Ctrl-C")
    args = parser.parse_args()

    sim, sim_url = start_simulator()
    try:
        gate = start_gate(sim_url, args.port)
    except BaseException:
        sim.terminate()
        raise
    url = f"http://127.0.0.1:{args.port}"
    print(f"\nOllama Gate demo: gate at {url} in front of the simulator.")
    print(f"  status page: {url}/gate/status   JSON: {url}/gate/status.json")
    print(f'  try: curl {url}/api/generate -d \'{{"model": "m1", "prompt": "hi"}}\'\n')

    stop = threading.Event()
    stats: dict[str, int] = {}
    threads = [
        threading.Thread(target=client, args=(url, f"client-{i}", stop, stats), daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    try:
        while not stop.is_set():
            stop.wait(5)
            print(f"[{time.monotonic() - started:5.0f}s] answers: {dict(sorted(stats.items()))}")
            if args.duration and time.monotonic() - started >= args.duration:
                break
    except KeyboardInterrupt:
        pass
    finally:
        shut_down(stop, threads, (gate, sim))
    print(f"done: {dict(sorted(stats.items()))}")


if __name__ == "__main__":
    main()
