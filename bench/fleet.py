"""Several backends: the gate's placement against the routers peers use, on one workload.

Three simulated Ollamas in their Ollama-like mode hold 2, 1 and 2 models at once
(``--vram``), serve ``--num-parallel`` requests per model, load a model in
``--load-time`` seconds, and crash a request (HTTP 500, as a killed runner does) when a
model must load while VRAM is full of busy models (``--on-overflow crash``). Every
model is installed everywhere. The same 60 streaming jobs (5 models, 20 clients, three
jobs each, one after the other) go, in one run and against freshly reset backends:

* through the gate (GATE_BACKENDS_FILE with the same sizes);
* round-robin across the backends (the client picks backend i mod 3);
* "loaded first, no slots": a backend that has the model loaded (its /api/ps), else
  round-robin, with no limit on what runs at once (the strategy of Olla, LiteLLM's
  router and others).

Reported per strategy: model loads, crashes, makespan against a lower bound (the work
divided by the slots, plus one unavoidable load), TTFT p50/p99. Then the flood again
through the gate with one backend killed a third of the way in.

    .venv/bin/python bench/fleet.py [--jobs 60] [--clients 20] [--load-time 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Children,
    interruptible,
    machine,
    start_fake,
    start_gate,
    write_json,
)

MODELS = ["llama3.2:1b", "qwen2.5:0.5b", "gemma2:2b", "phi3:mini", "smollm2:135m"]
SIZES = (2, 1, 2)  # models each backend holds at once
MAX_TRIES = 20


def control(base: str, path: str) -> dict[str, Any]:
    method = "GET" if path.startswith("/_fake/stats") else "POST"
    req = urllib.request.Request(
        base + path, method=method, data=None if method == "GET" else b"{}"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def stream(url: str, model: str, tokens: int) -> dict[str, Any]:
    """One streaming generate: status, time to first body byte, whether it ended well."""
    body = {"model": model, "prompt": "hi", "options": {"num_predict": tokens}}
    req = urllib.request.Request(
        url + "/api/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.monotonic()
    ttft = None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            status = resp.status
            backend = resp.headers.get("X-Gate-Backend")
            last = b""
            for line in resp:
                if ttft is None:
                    ttft = time.monotonic() - started
                last = line
        ok = status == 200 and b'"done":true' in last.replace(b" ", b"")
    except urllib.error.HTTPError as exc:
        status, ok, backend = exc.code, False, None
        exc.read()
    except OSError:
        status, ok, backend = 599, False, None
    return {"status": status, "ok": ok, "ttft": ttft, "backend": backend}


def workload(jobs: int, clients: int, seed: int = 7) -> list[list[str]]:
    """Each client's models, in order (a fixed random mix of the five)."""
    rng = random.Random(seed)
    per_client = [[] for _ in range(clients)]  # type: list[list[str]]
    for i in range(jobs):
        per_client[i % clients].append(rng.choice(MODELS))
    return per_client


def run(
    plan: list[list[str]],
    pick: Callable[[str, int], str],
    tokens: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    counter = itertools.count()
    done = itertools.count(1)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(models: list[str]) -> None:
        for model in models:
            tries = 0
            while True:
                # A crashed request (500) is sent again, as a client would: until it is
                # answered, it is work not done.
                url = pick(model, next(counter))
                result = stream(url, model, tokens)
                tries += 1
                if result["status"] != 500 or tries >= MAX_TRIES:
                    break
            result["tries"] = tries
            with lock:
                results.append(result)
            if on_progress is not None:
                on_progress(next(done))

    started = time.monotonic()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client, plan))
    return results, time.monotonic() - started


def summary(
    name: str, results: list[dict[str, Any]], makespan: float, fakes: list[str], bound: float
) -> dict[str, Any]:
    stats = [control(url, "/_fake/stats?requests=0") for url in fakes]
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)

    def pct(p: float) -> float | None:
        if not ttfts:
            return None
        return round(ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))], 3)

    row = {
        "strategy": name,
        "jobs": len(results),
        "ok": sum(r["ok"] for r in results),
        "resent": sum(r["tries"] - 1 for r in results),
        "loads": sum(s.get("total_loads", 0) for s in stats),
        "crashes": sum(s.get("crashes", 0) for s in stats),
        "makespan_s": round(makespan, 2),
        "lower_bound_s": round(bound, 2),
        "vs_bound": round(makespan / bound, 2),
        "ttft_p50_s": pct(0.5),
        "ttft_p99_s": pct(0.99),
        "statuses": dict(sorted(_count(r["status"] for r in results).items())),
    }
    print(json.dumps(row))
    return row


def _count(values: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--token-interval", type=float, default=0.05)
    parser.add_argument("--load-time", type=float, default=1.0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    children = Children()
    with interruptible():
        try:
            fakes = [
                start_fake(
                    children,
                    "--models", ",".join(MODELS),
                    "--vram", str(size),
                    "--num-parallel", str(args.parallel),
                    "--load-time", str(args.load_time),
                    "--on-overflow", "crash",
                    "--tokens", str(args.tokens),
                    "--token-interval", str(args.token_interval),
                )
                for size in SIZES
            ]  # fmt: skip
            table = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
            for index, (url, size) in enumerate(zip(fakes, SIZES, strict=True)):
                table.write(
                    f'[backends.b{index}]\nurl = "{url}"\nmax_models = {size}\n'
                    f"model_concurrency = {args.parallel}\n"
                )
            table.close()
            gate = start_gate(
                children,
                fakes[0],
                {"GATE_BACKENDS_FILE": table.name, "GATE_QUEUE_TIMEOUT": "600"},
            )
            plan = workload(args.jobs, args.clients)
            job_seconds = args.tokens * args.token_interval
            slots = sum(SIZES) * args.parallel
            bound = max(args.jobs * job_seconds / slots, job_seconds) + args.load_time
            # With one place per model (five places, five models), the busiest model's
            # jobs over its slots bound the makespan too, unless a copy runs elsewhere.
            per_model = _count(model for models in plan for model in models)
            busiest = max(per_model.values())
            one_place = -(-busiest // args.parallel) * job_seconds + args.load_time
            print(f"jobs per model {per_model}; one place per model bounds at {one_place:.1f} s")
            rows = []

            def reset() -> None:
                for url in fakes:
                    control(url, "/_fake/reset")

            reset()
            # Warm the gate's catalogue (its first request waits for the first polls).
            urllib.request.urlopen(gate.url + "/api/tags", timeout=30).read()
            results, makespan = run(plan, lambda model, i: gate.url, args.tokens)
            rows.append(summary("gate", results, makespan, fakes, bound))

            reset()
            results, makespan = run(plan, lambda model, i: fakes[i % len(fakes)], args.tokens)
            rows.append(summary("round-robin", results, makespan, fakes, bound))

            reset()
            lock = threading.Lock()

            def loaded_first(model: str, i: int) -> str:
                with lock:
                    for url in fakes:
                        ps = json.loads(urllib.request.urlopen(url + "/api/ps").read())
                        if model in [m.get("model") for m in ps.get("models", [])]:
                            return url
                    return fakes[i % len(fakes)]

            results, makespan = run(plan, loaded_first, args.tokens)
            rows.append(summary("loaded-first, no slots", results, makespan, fakes, bound))

            # The flood through the gate again, one backend killed a third of the way in.
            reset()
            victim = children.procs[1]  # the second fake (one model at a time)
            killed: list[float] = []

            def kill_at_a_third(done: int) -> None:
                if done >= args.jobs // 3 and not killed:
                    killed.append(time.monotonic())
                    os.killpg(victim.pid, signal.SIGKILL)

            results, makespan = run(plan, lambda model, i: gate.url, args.tokens, kill_at_a_third)
            alive = [fakes[0], fakes[2]]
            rows.append(summary("gate, b1 killed at 1/3", results, makespan, alive, bound))

            best_peer = min(rows[1]["makespan_s"], rows[2]["makespan_s"])
            print(
                f"gate makespan {rows[0]['makespan_s']} s = {rows[0]['vs_bound']} x the bound; "
                f"{rows[0]['makespan_s'] / best_peer:.2f} x the better peer strategy"
            )
            if args.out:
                write_json(
                    args.out,
                    machine=machine(),
                    rows=rows,
                    one_place_bound_s=one_place,
                    args=vars(args) | {"out": None},
                )
        finally:
            children.stop_all()


if __name__ == "__main__":
    main()
