"""Measure the work queue's slot handoff latency and the memory of many waiting greenlets.

Run as ``python bench/workqueue_handoff.py`` (a few seconds); it prints figures and asserts
nothing. Handoff latency is the time from one greenlet's ``release()`` to the next
waiter's ``acquire()`` returning, with one slot and every client queued behind it.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from settings import Settings  # noqa: E402
from workqueue import WorkQueue  # noqa: E402

HANDOFFS = 5000
WORKERS = 100
WAITERS = 10_000


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def handoff_latency() -> None:
    queue = WorkQueue(Settings(queue_max=100_000, queue_max_per_client=100_000))
    latencies: list[float] = []
    released_at = [0.0]
    done = gevent.event.Event()

    def worker(number: int) -> None:
        client = f"client{number}"
        while not done.is_set():
            slot = queue.acquire("llama3.2", client)
            if released_at[0]:
                latencies.append(time.perf_counter() - released_at[0])
            if len(latencies) >= HANDOFFS:
                done.set()
            released_at[0] = time.perf_counter()
            slot.release()

    started = time.perf_counter()
    greenlets = [gevent.spawn(worker, number) for number in range(WORKERS)]
    done.wait(timeout=20)
    elapsed = time.perf_counter() - started
    gevent.joinall(greenlets, timeout=5)
    assert queue.idle(), "the benchmark left a slot held"
    queue.close()
    micros = [value * 1e6 for value in latencies]
    print(
        f"handoff: {len(micros)} handoffs, {WORKERS} greenlets, one slot, "
        f"{len(micros) / elapsed:,.0f} handoffs/s"
    )
    print(
        f"handoff latency: p50 {statistics.median(micros):.1f} us, "
        f"p99 {percentile(micros, 0.99):.1f} us, max {max(micros):.1f} us"
    )


def bare_memory() -> None:
    """The same number of bare greenlets waiting on one Event: the greenlets' own share."""
    gc.collect()
    before = rss_bytes()
    gate = gevent.event.Event()
    greenlets = [gevent.spawn(gate.wait) for _ in range(WAITERS)]
    gevent.sleep(0.1)
    grown = rss_bytes() - before
    gate.set()
    gevent.joinall(greenlets)
    print(
        f"memory: {WAITERS:,} bare greenlets waiting on one Event: RSS +{grown / 2**20:.1f} MiB "
        f"({grown / WAITERS / 1024:.2f} KiB each)"
    )


def queue_memory() -> None:
    """RSS growth while WAITERS greenlets wait in the queue, then the time to run them all."""
    queue = WorkQueue(Settings(queue_max=WAITERS, queue_max_per_client=WAITERS))
    holder = queue.acquire("llama3.2", "holder")
    gc.collect()
    before = rss_bytes()

    def job(number: int) -> None:
        with queue.acquire("llama3.2", f"client{number % 500}"):
            pass

    greenlets = [gevent.spawn(job, number) for number in range(WAITERS)]
    while queue.snapshot()["totals"]["waiting"] < WAITERS:
        gevent.sleep(0.01)
    grown = rss_bytes() - before
    started = time.perf_counter()
    holder.release()
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    drained = time.perf_counter() - started
    assert queue.idle(), "the benchmark left a slot held"
    queue.close()
    print(
        f"memory: {WAITERS:,} greenlets waiting in the queue: RSS +{grown / 2**20:.1f} MiB "
        f"({grown / WAITERS / 1024:.2f} KiB each)"
    )
    print(
        f"drain: {WAITERS:,} waiters run one by one in {drained:.2f} s "
        f"({WAITERS / drained:,.0f} jobs/s)"
    )


def main() -> None:
    if sys.argv[1:] == ["--queue-memory"]:
        queue_memory()
        return
    if sys.argv[1:] == ["--bare-memory"]:
        bare_memory()
        return
    print(f"python {sys.version.split()[0]}, gevent {gevent.__version__}")
    handoff_latency()
    # Each memory figure in a fresh process, so one's freed memory cannot hide the other's.
    for flag in ("--queue-memory", "--bare-memory"):
        subprocess.run([sys.executable, __file__, flag], check=True, timeout=60)


if __name__ == "__main__":
    main()
