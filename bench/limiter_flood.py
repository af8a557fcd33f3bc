"""How the rate limiter holds up against a flood (docs/BENCHMARKS.md, "Rate limiter").

One gunicorn gevent worker in front of the fake Ollama (its own process), two
measurements side by side in one run:

1. Rejections per second: wrk floods POST /api/generate from 127.0.0.1, whose
   inference limit is tiny, so all but the first requests get 429. Once by client
   address, once by API key (the Bearer secret is checked on every request).
2. Token pacing of a legitimate stream from 127.0.0.2 (its own bucket): the gaps
   between NDJSON chunks as the client reads them, p50/p99/max, alone and while
   the flood runs.

    python bench/limiter_flood.py [--seconds 8] [--connections 32] [--tokens 400]

Needs wrk. Only 127.0.0.1 and 127.0.0.2 are used.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from limiter.mint import new_secret, stanza  # noqa: E402

PYTHON = sys.executable
GUNICORN = str(Path(PYTHON).parent / "gunicorn")
LEGIT = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fake_ollama(token_interval: float) -> Iterator[str]:
    """The fake Ollama in its own process, so it takes no CPU from this one's measurements."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "fakeollama", "--port", "0", "--no-record"]
        + ["--token-interval", str(token_interval)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise RuntimeError(f"fakeollama did not start: {line!r}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Gate:
    url: str
    port: int
    proc: subprocess.Popen[bytes]

    def worker_pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def worker_cpu(self) -> float:
        """CPU seconds (user + system) the worker has used so far."""
        fields = Path(f"/proc/{self.worker_pid()}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gate(upstream: str, env: dict[str, str]) -> Iterator[Gate]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "OLLAMA_"))}
    full.update(
        {
            "GATE_UPSTREAM": upstream,
            "GATE_BIND": f"127.0.0.1:{port}",
            "GATE_LOG_LEVEL": "warning",
            "GATE_LIMIT_EMBED": "off",
            "GATE_LIMIT_ADMIN": "off",
            "GATE_LIMIT_LIGHT": "off",
            **env,
        }
    )
    proc = subprocess.Popen(
        [GUNICORN, "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, env=full
    )
    g = Gate(f"http://127.0.0.1:{port}", port, proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("gate did not start") from None
                time.sleep(0.05)
        while not Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            time.sleep(0.05)
        yield g
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(15)


def stream_gaps(g: Gate, tokens: int, headers: dict[str, str] | None = None) -> list[float]:
    """Seconds between the NDJSON chunks of one streamed generation, read from 127.0.0.2."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=60, source_address=(LEGIT, 0))
    body = json.dumps({"model": "llama3.2", "prompt": "pace me", "stream": True})
    conn.request(
        "POST",
        "/api/generate",
        body=body,
        headers={
            "Content-Type": "application/json",
            "X-Fake-Tokens": str(tokens),
            **(headers or {}),
        },
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"legitimate stream got {resp.status}: {resp.read()[:200]!r}")
    stamps = []
    while resp.readline():
        stamps.append(time.perf_counter())
    conn.close()
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=False)]  # first gap: model load


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Flood:
    requests: int
    rejected: int
    seconds: float
    worker_cpu: float

    @property
    def rejections_per_second(self) -> float:
        return self.rejected / self.seconds

    @property
    def cpu_ms_per_rejection(self) -> float:
        return 1000 * self.worker_cpu / max(1, self.requests)


def flood(
    g: Gate, seconds: float, connections: int, headers: dict[str, str], delay_ms: float = 0
) -> Flood:
    """wrk POSTs /api/generate on ``connections`` connections for ``seconds``; each
    connection waits ``delay_ms`` before each request (0: as fast as answers come)."""
    script = "\n".join(
        [
            'wrk.method = "POST"',
            "wrk.body = '" + json.dumps({"model": "llama3.2", "prompt": "x"}) + "'",
        ]
        + [
            f'wrk.headers["{k}"] = "{v}"'
            for k, v in {"Content-Type": "application/json", **headers}.items()
        ]
        + ([f"function delay() return {delay_ms:g} end"] if delay_ms else [])
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script + "\n")
    try:
        cpu = g.worker_cpu()
        started = time.monotonic()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds:g}s",
                "-s",
                lua.name,
                g.url + "/api/generate",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        elapsed = time.monotonic() - started
        cpu = g.worker_cpu() - cpu
    finally:
        os.unlink(lua.name)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not total:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    duration = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    return Flood(
        int(total.group(1)), int(non2xx.group(1)) if non2xx else 0, duration or elapsed, cpu
    )


def describe(gaps: list[float]) -> dict[str, float]:
    ms = [g * 1000 for g in gaps]
    return {"p50": statistics.median(ms), "p99": percentile(ms, 99), "max": max(ms)}


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} × {model}, {system}; load average at start {load}"


def _stream_later(g: Gate, tokens: int, into: list[list[float]]) -> None:
    time.sleep(1)  # the flood at full speed first
    into.append(stream_gaps(g, tokens))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of each flood")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--tokens", type=int, default=400, help="chunks in the legitimate stream")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between tokens")
    parser.add_argument("--rounds", type=int, default=3, help="streams alone and flooded")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("limiter_flood: wrk is not installed", file=sys.stderr)
        return 1

    print(f"# Rate limiter flood, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {machine()}\n")
    alone: list[float] = []
    flooded: list[float] = []
    by_ip: list[Flood] = []
    with fake_ollama(args.interval) as upstream:
        # By address: 127.0.0.1 (wrk) has a tiny inference limit, spent by its first requests;
        # 127.0.0.2 streams in a bucket of its own (two streams a round).
        limit = f"{2 * args.rounds}/hour"
        with gate(upstream, {"GATE_LIMIT_INFERENCE": limit}) as g:
            for _ in range(args.rounds):
                alone += stream_gaps(g, args.tokens)
                box: list[list[float]] = []
                legit = threading.Thread(target=_stream_later, args=(g, args.tokens, box))
                legit.start()
                seconds = max(args.seconds, math.ceil(args.tokens * args.interval) + 3)
                by_ip.append(flood(g, seconds, args.connections, {}))
                legit.join()
                flooded += box[0]
        # By API key: the flood's key allows 1 request an hour; its secret is checked each time.
        with tempfile.TemporaryDirectory() as tmp:
            keys = Path(tmp) / "keys.toml"
            secret = new_secret()
            keys.write_text(
                stanza("flood", secret).replace("\n", '\nlimit_inference = "1/hour"\n', 1)
            )
            env = {"GATE_API_KEYS_FILE": str(keys), "GATE_LIMIT_INFERENCE": "off"}
            with gate(upstream, env) as g:
                headers = {"Authorization": f"Bearer {secret}"}
                by_key = [
                    flood(g, args.seconds, args.connections, headers) for _ in range(args.rounds)
                ]

    print(
        f"Flood: `wrk -t1 -c{args.connections}` POST /api/generate, {args.rounds} rounds; median:\n"
    )
    print("| flood | 429s per second | worker CPU per request |")
    print("|---|---|---|")
    for name, floods in [("by client address", by_ip), ("by API key", by_key)]:
        rate = statistics.median(f.rejections_per_second for f in floods)
        cpu = statistics.median(f.cpu_ms_per_rejection for f in floods)
        print(f"| {name} | {rate:,.0f} | {cpu:.3f} ms |")
    print(
        f"\nStream from {LEGIT}: {args.tokens} tokens, one every {args.interval * 1000:g} ms, "
        f"{args.rounds} streams each:\n"
    )
    print("| stream | p50 gap | p99 gap | max gap |")
    print("|---|---|---|---|")
    quiet, busy = describe(alone), describe(flooded)
    for name, d in [("alone", quiet), ("during the flood", busy)]:
        print(f"| {name} | {d['p50']:.2f} ms | {d['p99']:.2f} ms | {d['max']:.2f} ms |")
    print(f"\np99 gap added by the flood: {busy['p99'] - quiet['p99']:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
