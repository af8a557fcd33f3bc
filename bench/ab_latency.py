"""Latency added by two checkouts of the gate, one request to each in turn.

    python bench/ab_latency.py BASELINE_DIR CHANGED_DIR [--rounds 2000] [--json out.json]

One fast fake Ollama and two gates in front of it (gunicorn, gevent worker, one
worker, limits off), one kept-alive connection to each of the three. For each of
GET /api/tags, POST /api/show, a 4-token POST /api/chat not streamed and streamed,
every round sends one request to each of direct, A and B in a shuffled order and
times it until the whole answer is in; the table gives the medians, each gate's
median minus direct's, and B − A. Since the three take turns request by request, a
change in the machine's other load falls on all three alike: on a shared machine
this tells two gates apart better than proxy_overhead.py's runs of several seconds
each. The client is plain Python on blocking sockets (one connection, one request
at a time), so its own cost is in every figure alike and cancels in the differences.
Each gate's worker CPU per request (utime + stime from /proc over the timed rounds)
follows: at one connection back to back, CPU a gate spends after an answer also
delays the next request, so it is the steadier figure to compare.
``--case`` (repeatable) measures only the cases whose name contains it.

With ``--back-to-back`` each turn sends an untimed request and, as soon as its answer
is in, the timed one on the same connection, as wrk does at one connection: what a
gate still does after an answer is out (ending the call, counting it) then delays
the timed request, which it does not when the client turns to the other gates first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness

#: (path, JSON body or None for a GET): what proxy_overhead.py measures at 1 connection.
CASES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "GET /api/tags": ("/api/tags", None),
    "POST /api/show": ("/api/show", {"model": "llama3.2"}),
    "POST /api/chat, not streamed": (
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    ),
    "POST /api/chat, streamed": (
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
}
WARMUP = 200  # requests to each before the timed rounds


def connect(url: str) -> socket.socket:
    host, _, port = url.partition("//")[2].partition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_bytes(url: str, path: str, body: dict[str, Any] | None) -> bytes:
    """The whole request in one buffer (the fake, as Ollama, wants its own Host)."""
    host = url.partition("//")[2]
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def roundtrip(sock: socket.socket, request: bytes) -> float:
    """Send ``request``, read its whole answer (Content-Length or chunked); seconds taken."""
    started = time.perf_counter()
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
    else:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
    took = time.perf_counter() - started
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("baseline", type=Path)
    p.add_argument("changed", type=Path)
    p.add_argument("--rounds", type=int, default=2000, help="timed requests to each, per case")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--back-to-back",
        action="store_true",
        help="time the second of two requests sent back to back on a connection",
    )
    p.add_argument(
        "--case", action="append", default=[], help="only the cases whose name contains this"
    )
    args = p.parse_args()
    cases = {
        name: case
        for name, case in CASES.items()
        if not args.case or any(part in name for part in args.case)
    }
    if not cases:
        p.error(f"no case matches {args.case}; the cases: {', '.join(CASES)}")
    for root in (args.baseline, args.changed):
        if not (root / "app.py").is_file() or not (root / "gunicorn.conf.py").is_file():
            p.error(f"{root} holds no app.py and gunicorn.conf.py")
    children = harness.Children()
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        with harness.interruptible():
            fake = harness.start_fake(children, "--token-interval", "0")
            a = harness.start_gate(children, fake, root=args.baseline.resolve())
            b = harness.start_gate(children, fake, root=args.changed.resolve())
            urls = {"direct": fake, "A": a.url, "B": b.url}
            socks = {name: connect(url) for name, url in urls.items()}
            workers = {"A": a.worker_pids(), "B": b.worker_pids()}
            for case, (path, body) in cases.items():
                requests = {name: request_bytes(url, path, body) for name, url in urls.items()}
                for _ in range(WARMUP):
                    for name in urls:
                        roundtrip(socks[name], requests[name])
                times: dict[str, list[float]] = {name: [] for name in urls}
                order = list(urls)
                meters = {name: harness.CpuMeter(pids) for name, pids in workers.items()}
                for meter in meters.values():
                    meter.start()
                for _ in range(args.rounds):
                    random.shuffle(order)
                    for name in order:
                        if args.back_to_back:
                            roundtrip(socks[name], requests[name])
                        times[name].append(roundtrip(socks[name], requests[name]))
                results[case] = {n: statistics.median(t) * 1e3 for n, t in times.items()}
                sent = args.rounds * (2 if args.back_to_back else 1)
                cpu[case] = {n: m.stop() / sent * 1e6 for n, m in meters.items()}
                print(f"{case}: done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        children.stop_all()
    load_after = os.getloadavg()
    print(
        f"\nA = {args.baseline}, B = {args.changed}: {args.rounds} requests to each per case, "
        f"taking turns{' (each after an untimed one, back to back)' if args.back_to_back else ''}; "
        f"medians, {time.monotonic() - started:.0f} s in all; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print("| request | direct (ms) | A (ms) | B (ms) | A − direct | B − direct | B − A |")
    print("|---|---|---|---|---|---|---|")
    for case, m in results.items():
        print(
            f"| {case} | {m['direct']:.3f} | {m['A']:.3f} | {m['B']:.3f} "
            f"| {m['A'] - m['direct']:+.3f} | {m['B'] - m['direct']:+.3f} "
            f"| {m['B'] - m['A']:+.3f} |"
        )
    print("\n| request | A: worker CPU per request (µs) | B (µs) | B − A (µs) |")
    print("|---|---|---|---|")
    for case, c in cpu.items():
        print(f"| {case} | {c['A']:.0f} | {c['B']:.0f} | {c['B'] - c['A']:+.0f} |")
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in harness.machine().items()))
    if args.json:
        harness.write_json(
            args.json,
            machine=harness.machine(),
            options={k: str(v) for k, v in vars(args).items()},
            summary=results,
            cpu_us_per_request=cpu,
            runs={},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
