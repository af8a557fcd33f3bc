"""Compare two checkouts of the gate under the same load: is a change faster, and by how much?

    python bench/ab_gate.py BASELINE_DIR CHANGED_DIR [--workload tags|streams|paced]
                            [--repeat 5] [--duration 5] [--json out.json]

Both gates run at once, each under its own gunicorn (gevent worker, one worker,
limits off), in front of one fast fake Ollama; the runs alternate A, B, B, A, ...
so that a change in the machine's other load falls on both alike. Reported: the
median rate (requests/s or NDJSON lines/s) and the median CPU time of each gate's
worker per request or per line, which is the steadier of the two on a shared
machine. A directory is a checkout holding app.py and gunicorn.conf.py (for
example a copy under /tmp with one change applied).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import harness
from proxy_overhead import Setup, run_streams, run_wrk


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("baseline", type=Path)
    p.add_argument("changed", type=Path)
    p.add_argument("--workload", choices=("tags", "streams", "paced"), default="tags")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=50, help="tags: wrk connections")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    for root in (args.baseline, args.changed):
        if not (root / "app.py").is_file() or not (root / "gunicorn.conf.py").is_file():
            p.error(f"{root} holds no app.py and gunicorn.conf.py")
    if args.workload == "tags" and shutil.which("wrk") is None:
        p.error("wrk not found on PATH (Debian: apt-get install wrk)")

    if args.workload == "tags":
        rate, cpu = "rps", "gate_cpu_us_per_req"
    else:
        rate, cpu = "lines_per_s", "gate_cpu_us_per_line"
    interval = 0.01 if args.workload == "paced" else 0.0

    children = harness.Children()
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    try:
        with harness.interruptible():
            fake = harness.start_fake(children, "--token-interval", "0")
            fake_pid = children.procs[-1].pid
            setups = {}
            for label, root in (("A", args.baseline), ("B", args.changed)):
                gate = harness.start_gate(children, fake, root=root.resolve())
                setups[label] = Setup(children, fake, fake_pid, gate, gate.worker_pids())

            def one(label: str, seconds: float) -> dict[str, float]:
                setup = setups[label]
                if args.workload == "tags":
                    return run_wrk(setup, "gate", args.connections, seconds)
                return run_streams(setup, "gate", args.streams, args.tokens, interval, seconds)

            for label in ("A", "B"):
                one(label, 1)  # warm up
            for i in range(args.repeat):
                for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    result = one(label, args.duration)
                    runs[label].append(result)
                    p50 = f", p50 {result['p50_ms']:.3f} ms" if "p50_ms" in result else ""
                    print(
                        f"  {label} run {i + 1}: {rate} {result[rate]:,.0f}, "
                        f"CPU {result[cpu]:.1f} µs{p50}",
                        file=sys.stderr,
                        flush=True,
                    )
    except KeyboardInterrupt:
        return 130
    finally:
        children.stop_all()

    keys = (rate, cpu, "p50_ms") if args.workload == "tags" else (rate, cpu)
    med = {
        label: {k: harness.median([r[k] for r in rs]) for k in keys} for label, rs in runs.items()
    }
    a, b = med["A"], med["B"]
    unit = "request" if args.workload == "tags" else "line"
    if args.workload == "tags":
        print(f"\n{args.connections} connection(s)", end="")
    print(f"\n{args.workload}: median of {args.repeat} alternating runs of {args.duration:g} s\n")
    p50 = " p50 ms |" if args.workload == "tags" else ""
    print(f"| gate | {rate} | worker CPU µs per {unit} |{p50}")
    print("|---|---|---|" + ("---|" if p50 else ""))
    for label, root in (("A", args.baseline), ("B", args.changed)):
        m = med[label]
        extra = f" {m['p50_ms']:.3f} |" if p50 else ""
        print(f"| {label} {root} | {m[rate]:,.0f} | {m[cpu]:.1f} |{extra}")
    print(
        f"\nB vs A: {rate} {b[rate] / a[rate] - 1:+.1%}, CPU per {unit} {b[cpu] / a[cpu] - 1:+.1%}"
    )
    if args.json:
        harness.write_json(
            args.json,
            options={k: str(v) for k, v in vars(args).items()},
            median=med,
            runs=runs,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
