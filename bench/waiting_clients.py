"""10,000 clients waiting in the work queue of one gunicorn worker: its memory.

One slow job holds the only slot of a model; then N clients each open a real
socket and send a generate for that model, so they all wait in the queue. The
worker's RSS is read before and while they wait (from /proc), the queue depth
from /gate/status.json; then every client hangs up and the queue must empty.

    .venv/bin/python bench/waiting_clients.py [--clients 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Children, interruptible, machine, start_fake, start_gate  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def queue_depth(url: str) -> tuple[int, int]:
    with urllib.request.urlopen(url + "/gate/status.json", timeout=30) as resp:
        queue = json.loads(resp.read())["queue"]
    return queue["waiting"], queue["running"]


async def hold(port: int, n: int, body: bytes) -> list[asyncio.StreamWriter]:
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writers = []
    for start in range(0, n, 500):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(start, min(n, start + 500)))
        )
        for _, writer in batch:
            writer.write(head + body)
            writers.append(writer)
        await asyncio.sleep(0.05)
    return writers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.clients * 2 + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    children = Children()
    with interruptible():
        try:
            fake = start_fake(children, "--token-interval", "0.01")
            gate = start_gate(
                children,
                fake,
                {
                    "GATE_MODEL_CONCURRENCY": "1",
                    "GATE_QUEUE_MAX": str(args.clients + 10),
                    "GATE_QUEUE_MAX_PER_CLIENT": str(args.clients + 10),
                    "GATE_WORKER_CONNECTIONS": str(args.clients + 100),
                    "GATE_QUEUE_TIMEOUT": "600",
                },
            )
            (worker,) = gate.worker_pids()
            port = int(gate.url.rsplit(":", 1)[1])
            before = rss_kib(worker)
            # The job that holds the slot: the fake waits 120 s before answering.
            blocker = urllib.request.Request(
                gate.url + "/api/generate",
                data=json.dumps({"model": "m1", "prompt": "hold"}).encode(),
                headers={"X-Fake-Stall": "120"},
            )
            loop = asyncio.new_event_loop()
            pending = loop.run_in_executor(
                None, lambda: urllib.request.urlopen(blocker, timeout=300)
            )
            body = json.dumps({"model": "m1", "prompt": "wait"}).encode()
            started = time.monotonic()
            writers = loop.run_until_complete(hold(port, args.clients, body))
            deadline = time.monotonic() + 120
            waiting = 0
            while time.monotonic() < deadline:
                waiting, running = queue_depth(gate.url)
                if waiting >= args.clients:
                    break
                time.sleep(0.5)
            held = time.monotonic() - started
            during = rss_kib(worker)
            for writer in writers:
                writer.close()
            loop.run_until_complete(asyncio.sleep(1))  # let the loop close the sockets
            emptied = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if queue_depth(gate.url)[0] == 0:
                    emptied = time.monotonic()
                    break
                time.sleep(0.2)
            after_close = rss_kib(worker)
            pending.cancel()
            loop.close()
        finally:
            children.stop_all()
    info = machine()
    print(f"\n{args.clients} clients waiting in one worker; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {info.get('nproc')} cores, "
          f"load {info.get('loadavg')}\n")  # fmt: skip
    print("| figure | value |\n|---|---|")
    print(f"| clients seen waiting (status.json) | {waiting} |")
    print(f"| time to get them all queued | {held:.1f} s |")
    print(f"| worker RSS before | {before / 1024:.1f} MiB |")
    grown = (during - before) / 1024
    print(f"| worker RSS with them waiting | {during / 1024:.1f} MiB (+{grown:.1f}) |")
    print(f"| queue empty after they hung up | {'yes' if emptied else 'NO'} |")
    print(f"| worker RSS after | {after_close / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()
