"""The work queue shared through Redis against the in-process one: throughput and latency.

Starts one fake Ollama (``python -m fakeollama --no-record --token-interval 0``), one
redis-server on a free loopback port, and, one after another, these gates in front of
the fake (gunicorn, gevent worker, every limit off, access log off):

* ``memory``: one worker, GATE_STORAGE_URI=memory:// (the in-process WorkQueue);
* ``redis``: one worker, GATE_STORAGE_URI=redis:// (SharedWorkQueue, one script per
  admission and one per release);
* ``redis x2``: two workers on the same Redis.

Each is driven, side by side with the fake alone ("direct"), by ``--clients`` aiohttp
clients in this process asking for short non-streamed /api/generate jobs (one token, no
pause) over and over, in two scenarios: ``free`` (concurrency 100000: every job runs at
once, so the figure is the cost of admitting and releasing) and ``queued`` (concurrency
``--slots``: most jobs wait for a slot and are woken when one frees).

With ``--fleet`` the gates stand in front of two fake Ollamas (each ``--models m1``,
one GATE_BACKENDS_FILE naming both, ``model_concurrency`` the scenario's): ``memory`` is
then the fleet's in-process placement, ``redis`` and ``redis x2`` the fleet's shared
slots (one grant and one release script per job, fleet/shared.py); ``direct`` is still
one fake alone.

    python bench/shared_queue.py [--seconds 5] [--clients 32] [--slots 4] [--rounds 2] [--fleet]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Children,
    cpu_seconds,
    free_port,
    interruptible,
    start_fake,
    start_gate,
)


def start_redis(children: Children) -> str:
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    children.popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=2
            )
            if out.stdout.strip() == b"PONG":
                return f"redis://127.0.0.1:{port}/0"
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.1)
    raise RuntimeError("redis-server did not answer")


async def load(
    url: str, clients: int, seconds: float, warmup: float, pids: list[int]
) -> dict[str, Any]:
    """Jobs per second and latency of short generate jobs from ``clients`` at once."""
    body = json.dumps({"model": "m1", "prompt": "hi", "stream": False}).encode()
    headers = {"Content-Type": "application/json", "X-Fake-Tokens": "1"}
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop = False

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not stop:
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/api/generate", data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, OSError):
                ok = False
            if measuring:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        measuring = True
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - t0
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    return {
        "jobs_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "errors": errors,
        "worker_cpu_us_per_job": 1e6 * cpu / len(latencies) if latencies and pids else None,
    }


def fleet_models(fleet: bool) -> list[str]:
    return ["--models", "m1"] if fleet else []


def backends_file(urls: list[str], slots: str) -> str:
    """A GATE_BACKENDS_FILE naming the fakes ``a``, ``b``, … with ``slots`` each."""
    path = Path(tempfile.mkdtemp(prefix="bench-fleet-")) / "backends.toml"
    path.write_text(
        "".join(
            f'[backends.{chr(97 + i)}]\nurl = "{url}"\nmodel_concurrency = {slots}\n\n'
            for i, url in enumerate(urls)
        )
    )
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fleet", action="store_true", help="two backends (the fleet's modes)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    children = Children()
    results: list[dict[str, Any]] = []
    try:
        with interruptible():
            fake = start_fake(children, "--token-interval", "0", *fleet_models(args.fleet))
            second = (
                start_fake(children, "--token-interval", "0", "--models", "m1")
                if args.fleet
                else ""
            )
            redis_url = start_redis(children)
            configs = [
                ("memory", {"GATE_STORAGE_URI": "memory://"}),
                ("redis", {"GATE_STORAGE_URI": redis_url}),
                ("redis x2", {"GATE_STORAGE_URI": redis_url, "GATE_WORKERS": "2"}),
            ]
            for scenario, slots in (("free", "100000"), ("queued", str(args.slots))):
                extra = {"GATE_MODEL_CONCURRENCY": slots}
                if args.fleet:
                    extra["GATE_BACKENDS_FILE"] = backends_file([fake, second], slots)
                gates = {
                    name: start_gate(children, fake, {**env, **extra}) for name, env in configs
                }
                for rnd in range(args.rounds):
                    targets = [("direct", fake, [])]
                    targets += [(name, g.url, g.worker_pids()) for name, g in gates.items()]
                    for target, url, pids in targets:
                        figures = asyncio.run(
                            load(url, args.clients, args.seconds, args.warmup, pids)
                        )
                        row = {"scenario": scenario, "gate": target, "round": rnd, **figures}
                        results.append(row)
                        cpu = figures["worker_cpu_us_per_job"]
                        print(
                            f"{scenario:7} {target:9} round {rnd}: "
                            f"{figures['jobs_per_s']:6.0f} jobs/s  "
                            f"p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms  "
                            f"worker CPU/job {'-' if cpu is None else f'{cpu:.0f} us'}  "
                            f"errors {figures['errors']}",
                            flush=True,
                        )
                for g in gates.values():
                    children.stop(g.master)
    except KeyboardInterrupt:
        return 130
    finally:
        children.stop_all()
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "fleet": args.fleet,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
