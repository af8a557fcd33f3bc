"""The thrash scenario: one flood over more models than fit, direct vs the gate.

The fake Ollama runs in its Ollama-like mode (``--on-overflow queue``): it admits
requests strictly in arrival order, loads a model before serving it (``--load-time``)
and evicts an idle one when VRAM (``--vram`` models) is full, as Ollama's
server/sched.go does. A flood interleaving the models makes it load and unload
over and over. The same flood goes through the gate (GATE_MAX_ACTIVE_MODELS =
VRAM, affinity first), in the same run, against a freshly reset fake.

    .venv/bin/python bench/thrash.py [--requests 40] [--models 4] [--vram 2] [--load-time 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Children, interruptible, machine, start_fake, start_gate  # noqa: E402


def post(url: str, body: dict[str, Any]) -> tuple[int, float]:
    started = time.monotonic()
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            data = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        data, status = exc.read(), exc.code
    ok = status == 200 and b'"done":true' in data.replace(b" ", b"")
    return (status if ok or status != 200 else 599), time.monotonic() - started


def control(base: str, path: str) -> dict[str, Any]:
    method = "GET" if path == "/_fake/stats?requests=0" else "POST"
    req = urllib.request.Request(
        base + path, method=method, data=None if method == "GET" else b"{}"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def flood(target: str, fake: str, n: int, models: list[str], tokens: int) -> dict[str, Any]:
    control(fake, "/_fake/reset")
    bodies = [
        {"model": models[i % len(models)], "prompt": f"job {i}", "stream": False,
         "options": {"num_predict": tokens}}
        for i in range(n)
    ]  # fmt: skip
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda b: post(target + "/api/generate", b), bodies))
    makespan = time.monotonic() - started
    stats = control(fake, "/_fake/stats?requests=0")
    latencies = sorted(latency for _, latency in results)
    return {
        "ok": sum(1 for status, _ in results if status == 200),
        "failed": sum(1 for status, _ in results if status != 200),
        "loads": stats["total_loads"],
        "crashes": stats["crashes"],
        "makespan": makespan,
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, int(len(latencies) * 0.95) - 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--vram", type=int, default=2)
    parser.add_argument("--load-time", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-interval", type=float, default=0.01)
    parser.add_argument("--num-parallel", type=int, default=1)
    args = parser.parse_args()
    models = [f"m{i + 1}" for i in range(args.models)]
    children = Children()
    with interruptible():
        try:
            fake = start_fake(
                children, "--vram", str(args.vram), "--load-time", str(args.load_time),
                "--on-overflow", "queue", "--num-parallel", str(args.num_parallel),
                "--token-interval", str(args.token_interval),
            )  # fmt: skip
            gate = start_gate(
                children,
                fake,
                {
                    "GATE_MAX_ACTIVE_MODELS": str(args.vram),
                    "GATE_MODEL_CONCURRENCY": str(args.num_parallel),
                    "GATE_SWITCH_AFTER": "10",
                },
            )
            direct = flood(fake, fake, args.requests, models, args.tokens)
            gated = flood(gate.url, fake, args.requests, models, args.tokens)
        finally:
            children.stop_all()
    info = machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nThrash: {args.requests} requests over {args.models} models, VRAM for {args.vram}, "
          f"load {args.load_time} s, {args.tokens} tokens at {args.token_interval} s, "
          f"num_parallel {args.num_parallel}; {when}, "
          f"{info.get('nproc')} cores, load {info.get('loadavg')}\n")  # fmt: skip
    print("| | direct | through the gate |")
    print("|---|---|---|")
    for key, unit in [("ok", ""), ("failed", ""), ("loads", ""), ("crashes", ""),
                      ("makespan", " s"), ("p50", " s"), ("p95", " s")]:  # fmt: skip
        d, g = direct[key], gated[key]
        if isinstance(d, float):
            print(f"| {key} | {d:.2f}{unit} | {g:.2f}{unit} |")
        else:
            print(f"| {key} | {d} | {g} |")
    print(f"\nmakespan gate/direct: {gated['makespan'] / direct['makespan']:.2f}; "
          f"target: loads <= models + 2 = {args.models + 2}, makespan <= 0.6x direct")  # fmt: skip


if __name__ == "__main__":
    main()
