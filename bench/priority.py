"""Priority classes: an interactive chat every 2 s while a batch key floods 200 jobs.

One model, one slot (GATE_MODEL_CONCURRENCY=1, the fake Ollama's --num-parallel 1).
The batch key sends ``--batch`` jobs at once, each streaming for about ``--job`` seconds;
meanwhile the interactive key sends a streamed chat every ``--every`` seconds until the
flood is done. Measured: the chats' time to first byte (TTFT) and the flood's throughput,
in three runs on the same fake Ollama:

* ``priority``: keys with ``priority = "batch"`` and ``priority = "interactive"``;
* ``no priority``: the same keys, both ``normal`` (clients take turns, as before classes);
* ``direct``: the same load sent to the fake Ollama itself, which serves in arrival order.

    .venv/bin/python bench/priority.py [--batch 200] [--job 0.15] [--every 2]

Targets: interactive TTFT p99 <= one batch job + 50 ms; batch throughput loss <= 5%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Children, interruptible, machine, start_fake, start_gate  # noqa: E402

from limiter.keys import hash_secret  # noqa: E402

SECRETS = {"nightly": "bench-nightly-secret", "alice": "bench-alice-secret"}
TOKEN_INTERVAL = 0.01


def keys_file(priorities: bool) -> Path:
    classes = {"nightly": "batch", "alice": "interactive"} if priorities else {}
    text = ""
    for name, secret in SECRETS.items():
        text += f'[keys.{name}]\nkey_sha256 = "{hash_secret(secret)}"\nrole = "user"\n'
        text += f'priority = "{classes.get(name, "normal")}"\n\n'
    path = Path(tempfile.mkstemp(prefix="bench-keys-", suffix=".toml")[1])
    path.write_text(text)
    return path


def stream(base: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    """Send one streamed request; return seconds to the first body byte (read to the end)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    try:
        started = time.monotonic()
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", **headers}
        )
        resp = conn.getresponse()
        resp.read(1)
        first = time.monotonic() - started
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path} answered {resp.status}")
        return first
    finally:
        conn.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def run(base: str, batch: int, tokens: int, every: float) -> dict[str, Any]:
    """The flood and the chats against ``base`` (the gate or the fake itself)."""
    job = {"X-Fake-Tokens": str(tokens), "X-Fake-Token-Interval": str(TOKEN_INTERVAL)}
    done = threading.Event()
    ttfts: list[float] = []

    def chats() -> None:
        n = 0
        while not done.wait(every if n else every / 2):
            body = {
                "model": "llama3.2",
                "messages": [{"role": "user", "content": f"chat {n}"}],
                "stream": True,
            }
            ttfts.append(
                stream(
                    base, "/api/chat", body, {"Authorization": f"Bearer {SECRETS['alice']}", **job}
                )
            )
            n += 1

    chatter = threading.Thread(target=chats)
    started = time.monotonic()
    chatter.start()
    with ThreadPoolExecutor(batch) as pool:
        jobs = [
            pool.submit(
                stream,
                base,
                "/api/generate",
                {"model": "llama3.2", "prompt": f"batch {i}", "stream": True},
                {"Authorization": f"Bearer {SECRETS['nightly']}", **job},
            )
            for i in range(batch)
        ]
        for future in jobs:
            future.result()
    makespan = time.monotonic() - started
    done.set()
    chatter.join()
    return {
        "chats": len(ttfts),
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "ttft_max": max(ttfts),
        "makespan": makespan,
        "throughput": batch / makespan,
        # One slot served every job one after the other: the mean time each held it.
        "job_seconds": makespan / (batch + len(ttfts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="batch jobs sent at once")
    parser.add_argument("--job", type=float, default=0.15, help="seconds one job streams")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between chats")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct run")
    args = parser.parse_args()
    tokens = max(1, round(args.job / TOKEN_INTERVAL))
    results: dict[str, dict[str, Any]] = {}
    children = Children()
    with interruptible():
        try:
            fake = start_fake(children, "--num-parallel", "1")
            for name, classes in (("priority", True), ("no priority", False)):
                gate = start_gate(
                    children,
                    fake,
                    {
                        "GATE_API_KEYS_FILE": str(keys_file(classes)),
                        "GATE_MODEL_CONCURRENCY": "1",
                        "GATE_QUEUE_MAX_PER_CLIENT": str(args.batch + 10),
                    },
                )
                stream(gate.url, "/api/generate", {"model": "llama3.2", "prompt": "warm"},
                       {"Authorization": f"Bearer {SECRETS['alice']}"})  # fmt: skip
                results[name] = run(gate.url, args.batch, tokens, args.every)
                children.stop(gate.master)
            if not args.no_direct:
                results["direct"] = run(fake, args.batch, tokens, args.every)
        finally:
            children.stop_all()
    info = machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nPriority: {args.batch} batch jobs of {tokens} tokens x {TOKEN_INTERVAL} s "
          f"(~{args.job} s each, one slot), an interactive chat every {args.every} s; {when}, "
          f"{info.get('nproc')} cores, load {info.get('loadavg')}\n")  # fmt: skip
    print("| run | chats | interactive TTFT p50 | p99 | max | one job | batch makespan "
          "| batch jobs/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['chats']} | {r['ttft_p50'] * 1000:.0f} ms | "
              f"{r['ttft_p99'] * 1000:.0f} ms | {r['ttft_max'] * 1000:.0f} ms | "
              f"{r['job_seconds'] * 1000:.0f} ms | {r['makespan']:.2f} s | "
              f"{r['throughput']:.2f} |")  # fmt: skip
    with_p, without = results["priority"], results["no priority"]
    loss = 1 - with_p["throughput"] / without["throughput"]
    target = (with_p["job_seconds"] + 0.05) * 1000
    print(f"\ntargets: TTFT p99 {with_p['ttft_p99'] * 1000:.0f} ms <= one job + 50 ms = "
          f"{target:.0f} ms; throughput loss {loss * 100:.1f}% <= 5%")  # fmt: skip


if __name__ == "__main__":
    main()
