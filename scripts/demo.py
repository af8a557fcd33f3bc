"""`make demo`: the gate in front of two simulated Ollama hosts, with some load.

Starts two simulators of different sizes (fakeollama: gpu-big holds two models
in 8 GiB, gpu-small one in 4 GiB; slow loads, streamed tokens), the gate under
gunicorn in front of both on GATE_BIND (default 127.0.0.1:8000), with a
GATE_BACKENDS_FILE the demo writes to a temporary folder, and eight clients
that keep asking four models for completions, each with one of five API keys
(one of them limited to 6 generations a minute, so some 429s show). Open the
printed URL and watch; stop with Ctrl-C (or pass --duration to stop by
itself). When something already listens on the gate's address, the demo stops
at once and says so.
scripts/status_screenshot.py takes docs/status.png under this same load.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_BIND = "127.0.0.1:8000"
MODELS = ["llama3.2:latest", "qwen2.5:0.5b", "m1:latest", "m2:latest"]
# The load's API keys: the secret of NAME is "NAME-secret". "you" is for your own curl.
KEYS = ["alice", "bob", "carol", "ci-batch", "notebook-7"]
LIMITED = "ci-batch"  # limit_inference = "6/minute"
CLIENTS = 8


@dataclass(frozen=True)
class SimulatedBackend:
    """One simulated Ollama host and its GATE_BACKENDS_FILE table."""

    name: str
    models: str  # installed, NAME=SIZE
    max_models: int  # loaded at once (the simulator's --vram, the gate's max_models)
    vram: str  # the simulator's --vram-bytes, the gate's vram
    model_concurrency: int  # the simulator's --num-parallel, the gate's model_concurrency


# Two hosts of different sizes; m2 is installed on the big one only.
BACKENDS = [
    SimulatedBackend("gpu-big", "llama3.2=2GB,qwen2.5:0.5b=1GB,m1=2GB,m2=2GB", 2, "8GiB", 2),
    SimulatedBackend("gpu-small", "llama3.2=2GB,qwen2.5:0.5b=1GB,m1=2GB", 1, "4GiB", 1),
]


def parse_bind(bind: str) -> tuple[str, int]:
    """GATE_BIND's host and port; the demo needs a TCP port its clients and your browser reach."""
    host, sep, port = bind.rpartition(":")
    if bind.startswith("unix:") or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(
            f"demo: GATE_BIND={bind!r}: the demo needs HOST:PORT with a port from 1 to 65535 "
            f"(default {DEFAULT_BIND})"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def url_for(host: str, port: int) -> str:
    """Where a client on this host reaches a server bound to host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_free(host: str, port: int) -> None:
    """Stop at once when something already listens on the gate's address: else gunicorn
    would retry for seconds and give up, while the load went to whatever listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"demo: cannot listen on {host}:{port}: {exc.strerror}. Something else "
                f"(another gate?) is using it: stop it, or give the demo another address, "
                f"e.g. `make demo GATE_BIND=127.0.0.1:{port + 1 if port < 65535 else 8080}`."
            ) from None


def keys_file(folder: Path) -> Path:
    """The demo's keys file: one user key per name in KEYS, and "you" for your own requests."""
    lines = []
    for name in [*KEYS, "you"]:
        digest = hashlib.sha256(f"{name}-secret".encode()).hexdigest()
        lines += [f"[keys.{name}]", f'key_sha256 = "{digest}"', 'role = "user"']
        if name == LIMITED:
            lines.append('limit_inference = "6/minute"')
    path = folder / "keys.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def backends_file(folder: Path, urls: dict[str, str]) -> Path:
    """The demo's GATE_BACKENDS_FILE: one table per simulated backend."""
    lines = []
    for b in BACKENDS:
        lines += [
            f"[backends.{b.name}]",
            f'url = "{urls[b.name]}"',
            f"max_models = {b.max_models}",
            f'vram = "{b.vram}"',
            f"model_concurrency = {b.model_concurrency}",
        ]
    path = folder / "backends.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_simulator(backend: SimulatedBackend) -> tuple[subprocess.Popen[str], str]:
    """One simulator on a free port, sized as ``backend`` says; loads take 1.5 s."""
    cmd = [
        sys.executable, "-m", "fakeollama", "--port", "0", "--load-time", "1.5",
        "--token-interval", "0.05", "--tokens", "30", "--no-record",
        "--models", backend.models, "--vram", str(backend.max_models),
        "--vram-bytes", backend.vram, "--num-parallel", str(backend.model_concurrency),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"demo: simulator {backend.name} did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


def start_gate(backends: Path, bind: str, keys: Path) -> subprocess.Popen[bytes]:
    """The gate under gunicorn on ``bind``; returns once it answers, stops the demo if it exits."""
    env = dict(os.environ)
    env.setdefault("GATE_SWITCH_AFTER", "8")
    env.setdefault("GATE_LIMIT_INFERENCE", "off")
    # Several backends are served by one worker with memory:// storage (docs/DEPLOY.md).
    env.update({"GATE_WORKERS": "1", "GATE_STORAGE_URI": "memory://"})
    env.update(
        {"GATE_BACKENDS_FILE": str(backends), "GATE_BIND": bind, "GATE_API_KEYS_FILE": str(keys)}
    )
    gunicorn = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen(
        [str(gunicorn), "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, env=env
    )
    url = url_for(*parse_bind(bind))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the gate exited with status {proc.returncode} (see above)")
        try:
            # The health check: any answer means the gate is up, and it needs no API key
            # (a keyless /api/version would show on the status page as a refused client).
            requests.get(url + "/gate/healthz", timeout=(1, 10))
            return proc
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("demo: the gate did not answer within 30 s")


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
                outcome = str(r.status_code)
                for line in r.iter_lines():
                    if line and json.loads(line).get("done"):
                        outcome = "ok"
                stats[outcome] = stats.get(outcome, 0) + 1
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


@dataclass
class Demo:
    """The running demo: where the gate answers, and its clients' answers so far."""

    url: str
    stop: threading.Event
    stats: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def running(bind: str, clients: int = CLIENTS) -> Iterator[Demo]:
    """The simulators, the gate on ``bind`` and the load, until the block ends."""
    host, port = parse_bind(bind)
    check_free(host, port)
    folder = Path(tempfile.mkdtemp(prefix="gate-demo-"))
    procs: list[subprocess.Popen] = []  # the gate first: it stops before its backends
    threads: list[threading.Thread] = []
    demo = Demo(url_for(host, port), threading.Event())
    try:
        urls = {}
        for backend in BACKENDS:
            sim, urls[backend.name] = start_simulator(backend)
            procs.append(sim)
        procs.insert(0, start_gate(backends_file(folder, urls), bind, keys_file(folder)))
        for i in range(clients):
            name = KEYS[i % len(KEYS)]
            args = (demo.url, f"{name}-{i}", demo.stop, demo.stats, f"{name}-secret")
            threads.append(threading.Thread(target=client, args=args, daemon=True))
        for t in threads:
            t.start()
        yield demo
    finally:
        shut_down(demo.stop, threads, tuple(procs))
        for proc in procs:
            if proc.stdout is not None:  # the simulators' "listening on" pipes
                proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--bind",
        default=os.environ.get("GATE_BIND") or DEFAULT_BIND,
        help=f"the gate's HOST:PORT (default: $GATE_BIND, else {DEFAULT_BIND})",
    )
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0 = until Ctrl-C")
    args = parser.parse_args()

    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    with running(args.bind, args.clients) as demo:
        url = demo.url
        hosts = " and ".join(
            f"{b.name} ({b.max_models} model{'s' if b.max_models > 1 else ''} in {b.vram})"
            for b in BACKENDS
        )
        print(f"\nOllama Gate demo: gate at {url} in front of two simulated backends: {hosts}.")
        print(f"  status page: {url}/gate/status   JSON: {url}/gate/status.json")
        print(
            f"  try: curl {url}/api/generate -H 'Authorization: Bearer you-secret' "
            '-d \'{"model": "m1", "prompt": "hi"}\'\n',
            flush=True,
        )
        started = time.monotonic()
        try:
            while not stop_requested.is_set():
                left = args.duration - (time.monotonic() - started) if args.duration else 5
                if left <= 0:
                    break
                stop_requested.wait(min(5, left))
                elapsed = time.monotonic() - started
                print(f"[{elapsed:5.0f}s] answers: {dict(sorted(demo.stats.items()))}", flush=True)
        except KeyboardInterrupt:
            pass
    print(f"done: {dict(sorted(demo.stats.items()))}")


if __name__ == "__main__":
    main()
