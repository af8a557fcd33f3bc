"""Load generator: many concurrent NDJSON streams of /api/generate, lines received per second.

Run as its own process (``python bench/stream_load.py URL``) so that its CPU is not
the gate's. Each of ``--streams`` clients asks for a stream of ``--tokens`` tokens
(the fake Ollama's X-Fake-Tokens / X-Fake-Token-Interval headers), reads it to the
end, and asks again, until ``--duration`` seconds have passed after a ``--warmup``.
Prints "window start" and "window end" as the measured window opens and closes (a
caller can sample the server's CPU in between), then one JSON object: lines counted
in the window, streams finished, and streams that failed or came back short (each
stream must be tokens + 1 lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


class Tally:
    def __init__(self) -> None:
        self.lines = 0
        self.streams = 0
        self.short = 0
        self.errors = 0
        self.stop = False


async def client(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    expect: int,
    t: Tally,
) -> None:
    while not t.stop:
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    t.errors += 1
                    await resp.read()
                    continue
                got = 0
                async for chunk in resp.content.iter_any():
                    n = chunk.count(b"\n")
                    got += n
                    t.lines += n
            t.streams += 1
            if got != expect:
                t.short += 1
        except (aiohttp.ClientError, OSError):
            t.errors += 1
            await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, float | int]:
    url = args.url.rstrip("/") + "/api/generate"
    body = json.dumps({"model": args.model, "prompt": "count to a large number", "stream": True})
    headers = {
        "Content-Type": "application/json",
        "X-Fake-Tokens": str(args.tokens),
        "X-Fake-Token-Interval": str(args.interval),
    }
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(
                client(session, url, body.encode(), headers, args.tokens + 1, tally)
            )
            for _ in range(args.streams)
        ]
        await asyncio.sleep(args.warmup)
        lines0, streams0, t0 = tally.lines, tally.streams, time.perf_counter()
        cpu0 = time.process_time()
        print("window start", flush=True)
        await asyncio.sleep(args.duration)
        lines1, streams1, t1 = tally.lines, tally.streams, time.perf_counter()
        cpu1 = time.process_time()
        print("window end", flush=True)
        tally.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    seconds = t1 - t0
    return {
        "lines": lines1 - lines0,
        "seconds": round(seconds, 3),
        "lines_per_s": round((lines1 - lines0) / seconds, 1),
        "streams_finished": streams1 - streams0,
        "short_streams": tally.short,
        "errors": tally.errors,
        "client_cpu_s": round(cpu1 - cpu0, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="base URL of the fake Ollama or of the gate")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.0, help="seconds between tokens")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--model", default="llama3.2")
    args = p.parse_args()
    try:
        result = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
