"""What nginx's flood shield (deploy/nginx.conf) saves the gate under a one-address flood.

One gunicorn gevent worker in front of the fake Ollama (its own process), three
set-ups side by side in one run:

1. the gate alone: wrk floods it directly;
2. nginx without the shield (the shipped site file, its limit_req and limit_conn
   lines taken out) in front of the gate;
3. nginx with the shipped site file, shield included.

In each, wrk floods POST /api/generate from 127.0.0.1, whose inference limit at the
gate is spent after its first requests, so every answer is a 429 (the gate's, or
nginx's own with the shield). Meanwhile a client on 127.0.0.2 (a bucket of its own)
streams a generation and records when each NDJSON chunk arrives; the same stream
alone is the baseline. Reported: 429s per second, the gate worker's CPU per second
of flood, and the stream's gaps. Unpaced, wrk sends as fast as the answers come, so
each set-up meets a flood of its own size (nginx's own 429s come much faster);
with --rate, every set-up meets the same flood.

    python bench/nginx_shield.py [--seconds 8] [--connections 32] [--tokens 400] [--rounds 3]
                                 [--rate 2000]

Needs wrk and nginx (scripts/system-deps.sh bench). Only 127.0.0.1 and 127.0.0.2 are used.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.limiter_flood import (  # noqa: E402 - the limiter's flood benchmark, reused
    LEGIT,
    Flood,
    describe,
    fake_ollama,
    flood,
    gate,
    machine,
    stream_gaps,
)
from tests.nginx_support import NO_SHIELD, Edits, start_nginx  # noqa: E402


@dataclass
class Target:
    """Where wrk and the stream connect, and whose worker CPU is counted (the gate's)."""

    url: str
    port: int
    worker_cpu: Callable[[], float]


@dataclass
class Result:
    name: str
    floods: list[Flood]
    alone: list[float]
    flooded: list[float]


@contextlib.contextmanager
def setup(upstream: str, name: str, rounds: int) -> Iterator[Target]:
    """The gate alone, or nginx (with or without the shield) in front of it."""
    # 127.0.0.1's generations are spent after its first requests; 127.0.0.2 streams
    # twice a round in a bucket of its own.
    env = {"GATE_LIMIT_INFERENCE": f"{2 * rounds}/hour"}
    if name == "gate alone":
        with gate(upstream, env) as g:
            yield Target(g.url, g.port, g.worker_cpu)
        return
    edits: Edits = NO_SHIELD if name == "nginx without the shield" else ()
    with gate(upstream, {**env, "GATE_TRUSTED_PROXIES": "1"}) as g:
        with tempfile.TemporaryDirectory(prefix="bench-nginx-") as folder:
            nginx = start_nginx(f"127.0.0.1:{g.port}", Path(folder), edits=edits)
            try:
                yield Target(nginx.url, nginx.port, g.worker_cpu)
            finally:
                nginx.stop()


def _stream_later(target: Target, tokens: int, into: list[list[float]]) -> None:
    time.sleep(1)  # the flood at full speed first
    into.append(stream_gaps(target, tokens))  # type: ignore[arg-type]


def flood_seconds(args: argparse.Namespace) -> float:
    """Each flood outlasts the stream it runs beside (started 1 s in)."""
    return float(max(args.seconds, math.ceil(args.tokens * args.interval) + 3))


def measure(upstream: str, name: str, args: argparse.Namespace) -> Result:
    result = Result(name, [], [], [])
    with setup(upstream, name, args.rounds) as target:
        for _ in range(args.rounds):
            result.alone += stream_gaps(target, args.tokens)  # type: ignore[arg-type]
            box: list[list[float]] = []
            legit = threading.Thread(target=_stream_later, args=(target, args.tokens, box))
            legit.start()
            seconds = flood_seconds(args)
            delay = 1000 * args.connections / args.rate if args.rate else 0
            result.floods.append(flood(target, seconds, args.connections, {}, delay))  # type: ignore[arg-type]
            legit.join()
            result.flooded += box[0]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of each flood")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--tokens", type=int, default=400, help="chunks in the legitimate stream")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between tokens")
    parser.add_argument("--rounds", type=int, default=3, help="streams alone and flooded")
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="pace the flood to about this many requests a second (wrk's delay(), so a "
        "little under it); 0 = as fast as the answers come",
    )
    args = parser.parse_args()
    for program in ("wrk", "nginx"):
        if not shutil.which(program) and not Path(f"/usr/sbin/{program}").exists():
            print(f"nginx_shield: {program} is not installed", file=sys.stderr)
            return 1

    print(f"# nginx flood shield, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"command: python bench/nginx_shield.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {machine()}\n")
    names = ["gate alone", "nginx without the shield", "nginx with the shield"]
    with fake_ollama(args.interval) as upstream:
        results = [measure(upstream, name, args) for name in names]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    print(
        f"Flood: `wrk -t1 -c{args.connections}` POST /api/generate from 127.0.0.1"
        + (f" paced to at most {args.rate:,.0f}/s" if args.rate else ", unpaced")
        + ", "
        f"{args.rounds} rounds of {flood_seconds(args):g} s; "
        f"stream from {LEGIT}: {args.tokens} tokens, one every {args.interval * 1000:g} ms. "
        "Medians of the rounds:\n"
    )
    print(
        "| set-up | 429s per second | gate worker CPU per second of flood "
        "| stream p50 gap alone / flooded | p99 alone / flooded | max alone / flooded |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        rate = statistics.median(f.rejections_per_second for f in r.floods)
        cpu = statistics.median(f.worker_cpu / f.seconds for f in r.floods)
        quiet, busy = describe(r.alone), describe(r.flooded)
        cells = " | ".join(f"{quiet[k]:.2f} / {busy[k]:.2f} ms" for k in ("p50", "p99", "max"))
        print(f"| {r.name} | {rate:,.0f} | {cpu:.2f} s | {cells} |")
    print(f"\nload average at the end: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
