"""What the gate adds: the same fake Ollama measured directly and through the gate, side by side.

    python bench/proxy_overhead.py [--duration S] [--repeat N] [--quick] [--json out.json]

One run starts one fast fake Ollama (``python -m fakeollama --no-record``) and one
gate in front of it (gunicorn, gevent worker, one worker, every GATE_LIMIT_* off),
then measures each figure against both, direct and gate alternating, ``--repeat``
times, and prints the medians as a Markdown table:

- latency p50/p99 of GET /api/tags with 1 and with 50 connections (wrk --latency);
  "added" is gate minus direct;
- latency p50 of three POSTs with 1 connection (wrk with a Lua script, the request in one
  write): POST /api/show (a light POST) and a 4-token POST /api/chat (inference, through
  the work queue), not streamed and streamed;
- requests/s of GET /api/tags with 50 connections (the same wrk runs);
- NDJSON lines/s received by 200 concurrent clients streaming /api/generate
  (bench/stream_load.py, its own process), at full speed (token interval 0, the
  ceiling) and paced (``--paced-interval``, 10 ms: 200 streams offer 20,000 lines/s);
- CPU time of the gate's worker per request and per line, from /proc: unlike the
  rates, it barely depends on what else the machine is doing.

wrk must be on PATH (Debian: ``apt-get install wrk``). All processes run on this
machine and share its cores with the load generators; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from harness import Children, CpuMeter, Gate, median

HERE = Path(__file__).resolve().parent
TARGET_ADDED_P50_MS = 0.5
TARGET_RPS = 2500
TARGET_POST_ADDED_P50_MS = 1.0

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p50/p99 (ms) and error counts from ``wrk --latency`` output."""
    result: dict[str, float] = {"errors": 0.0}
    for line in out.splitlines():
        line = line.strip()
        if match := re.match(r"(50|75|90|99)%\s+(\S+)$", line):
            result[f"p{match.group(1)}_ms"] = _ms(match.group(2))
        elif line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif match := re.match(r"(\d+) requests in", line):
            result["requests"] = float(match.group(1))
        elif line.startswith("Socket errors:"):
            result["errors"] += sum(int(n) for n in re.findall(r"\d+", line))
        elif line.startswith("Non-2xx or 3xx responses:"):
            result["errors"] += int(line.split(":")[1])
    if "rps" not in result or "p50_ms" not in result:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return result


@dataclass
class Setup:
    children: Children
    fake_url: str
    fake_pid: int
    gate: Gate
    gate_pids: list[int]

    def url(self, where: str) -> str:
        return self.fake_url if where == "direct" else self.gate.url


#: The POSTs measured beside GET /api/tags: a light POST and a short chat, not streamed
#: and streamed (label, path, JSON body). The fake answers a chat with 4 tokens.
POSTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "show": ("POST /api/show", "/api/show", {"model": "llama3.2"}),
    "chat": (
        "POST /api/chat, not streamed",
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    ),
    "chat_stream": (
        "POST /api/chat, streamed",
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
}


def wrk_script(path: str, body: dict[str, Any]) -> Path:
    """A wrk Lua script that sends ``body`` as JSON to ``path`` with POST (one write)."""
    script = Path(tempfile.mkdtemp(prefix="bench-wrk-")) / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.path = {json.dumps(path)}\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def run_wrk(
    setup: Setup, where: str, conns: int, seconds: float, post: str | None = None
) -> dict[str, float]:
    """wrk against GET /api/tags, or one of POSTS."""
    meter = CpuMeter(setup.gate_pids)
    fake = CpuMeter([setup.fake_pid])
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "5s", "--latency"]
    if post is None:
        target = setup.url(where) + "/api/tags"
    else:
        _label, path, body = POSTS[post]
        args += ["-s", str(wrk_script(path, body))]
        target = setup.url(where) + path
    proc = setup.children.popen([*args, target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    meter.start()
    fake.start()
    out, _ = proc.communicate(timeout=seconds + 30)
    meter.stop()
    fake.stop()
    setup.children.procs.remove(proc)
    result = parse_wrk(out.decode(errors="replace"))
    result["fake_cpu_s"] = fake.seconds
    if where == "gate":
        result["gate_cpu_us_per_req"] = meter.seconds / max(result.get("requests", 0), 1) * 1e6
        result["gate_cpu_s"] = meter.seconds
    return result


def run_streams(
    setup: Setup, where: str, streams: int, tokens: int, interval: float, seconds: float
) -> dict[str, float]:
    meter = CpuMeter(setup.gate_pids)
    args = [harness.PYTHON, str(HERE / "stream_load.py"), setup.url(where)]
    args += ["--streams", str(streams), "--tokens", str(tokens), "--interval", str(interval)]
    args += ["--duration", str(seconds), "--warmup", "1"]
    proc = setup.children.popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    # The client says when its measured window opens and closes: count CPU in it only.
    out = []
    for line in proc.stdout:
        if line == b"window start\n":
            meter.start()
        elif line == b"window end\n":
            meter.stop()
        else:
            out.append(line)
    proc.wait(timeout=60)
    setup.children.procs.remove(proc)
    text = b"".join(out).decode(errors="replace")
    if proc.returncode != 0 or not text.startswith("{"):
        raise RuntimeError(f"stream_load.py exited with {proc.returncode}, printing {text!r}")
    result: dict[str, float] = json.loads(text)
    if where == "gate":
        result["gate_cpu_us_per_line"] = meter.seconds / max(result["lines"], 1) * 1e6
        result["gate_cpu_s"] = meter.seconds
    return result


Runs = dict[str, list[dict[str, float]]]


def measure(
    runs: Runs, name: str, repeat: int, one: Callable[[str], dict[str, float]], log: Callable
) -> None:
    """Run ``one(where)`` for direct and gate ``repeat`` times, alternating which goes first."""
    for i in range(repeat):
        order = ("direct", "gate") if i % 2 == 0 else ("gate", "direct")
        for where in order:
            result = one(where)
            runs.setdefault(f"{name}/{where}", []).append(result)
            log(f"  {name} {where} run {i + 1}: " + _brief(result))


def _brief(result: dict[str, float]) -> str:
    keys = ("p50_ms", "p99_ms", "rps", "lines_per_s", "errors", "short_streams")
    return ", ".join(f"{k}={result[k]:g}" for k in keys if k in result)


def med(runs: Runs, key: str, field: str) -> float:
    return median([r[field] for r in runs.get(key, []) if field in r])


def spread(runs: Runs, key: str, field: str) -> tuple[float, float]:
    values = [r[field] for r in runs.get(key, []) if field in r]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def summarize(runs: Runs) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for conns in (1, 50):
        for p in ("p50_ms", "p99_ms"):
            d, g = med(runs, f"tags_c{conns}/direct", p), med(runs, f"tags_c{conns}/gate", p)
            summary[f"{p[:3]}_c{conns}"] = {"direct_ms": d, "gate_ms": g, "added_ms": g - d}
    summary["rps_c50"] = {
        "direct": med(runs, "tags_c50/direct", "rps"),
        "gate": med(runs, "tags_c50/gate", "rps"),
    }
    summary["rps_c1"] = {
        "direct": med(runs, "tags_c1/direct", "rps"),
        "gate": med(runs, "tags_c1/gate", "rps"),
    }
    summary["gate_cpu_us_per_req"] = med(runs, "tags_c50/gate", "gate_cpu_us_per_req")
    for post in POSTS:
        key = f"post_{post}_c1"
        if f"{key}/gate" in runs:
            d, g = med(runs, f"{key}/direct", "p50_ms"), med(runs, f"{key}/gate", "p50_ms")
            summary[key] = {
                "direct_ms": d,
                "gate_ms": g,
                "added_ms": g - d,
                "gate_cpu_us_per_req": med(runs, f"{key}/gate", "gate_cpu_us_per_req"),
            }
    for name in ("streams_max", "streams_paced"):
        if f"{name}/gate" in runs:
            summary[name] = {
                "direct": med(runs, f"{name}/direct", "lines_per_s"),
                "gate": med(runs, f"{name}/gate", "lines_per_s"),
                "gate_cpu_us_per_line": med(runs, f"{name}/gate", "gate_cpu_us_per_line"),
                "short_or_failed": sum(
                    r["short_streams"] + r["errors"]
                    for where in ("direct", "gate")
                    for r in runs[f"{name}/{where}"]
                ),
            }
    return summary


def _cell(runs: Runs, key: str, field: str, fmt: str) -> str:
    lo, hi = spread(runs, key, field)
    value = med(runs, key, field)
    if len(runs.get(key, [])) < 2:
        return format(value, fmt)
    return f"{value:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def table(runs: Runs, summary: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown table: medians, with the range over the runs in brackets."""
    rows = ["| figure | direct | through the gate | gate − direct |", "|---|---|---|---|"]
    for conns in (1, 50):
        for p in ("p50_ms", "p99_ms"):
            key = f"tags_c{conns}"
            added = summary[f"{p[:3]}_c{conns}"]["added_ms"]
            rows.append(
                f"| GET /api/tags latency {p[:3]}, {conns} conn. (ms) "
                f"| {_cell(runs, key + '/direct', p, '.3f')} "
                f"| {_cell(runs, key + '/gate', p, '.3f')} | {added:+.3f} ms |"
            )
    for post, (label, _path, _body) in POSTS.items():
        key = f"post_{post}_c1"
        if key in summary:
            rows.append(
                f"| {label} latency p50, 1 conn. (ms) "
                f"| {_cell(runs, key + '/direct', 'p50_ms', '.3f')} "
                f"| {_cell(runs, key + '/gate', 'p50_ms', '.3f')} "
                f"| {summary[key]['added_ms']:+.3f} ms |"
            )
    for conns in (1, 50):
        key = f"tags_c{conns}"
        d, g = summary[f"rps_c{conns}"]["direct"], summary[f"rps_c{conns}"]["gate"]
        rows.append(
            f"| GET /api/tags requests/s, {conns} conn. "
            f"| {_cell(runs, key + '/direct', 'rps', ',.0f')} "
            f"| {_cell(runs, key + '/gate', 'rps', ',.0f')} | gate = {g / d:.0%} of direct |"
        )
    labels = {
        "streams_max": f"interval 0 (ceiling), {args.tokens} tokens",
        "streams_paced": f"interval {args.paced_interval * 1000:g} ms, {args.tokens} tokens",
    }
    for name, label in labels.items():
        if name not in summary:
            continue
        d, g = summary[name]["direct"], summary[name]["gate"]
        rows.append(
            f"| NDJSON lines/s, {args.streams} streams, {label} "
            f"| {_cell(runs, name + '/direct', 'lines_per_s', ',.0f')} "
            f"| {_cell(runs, name + '/gate', 'lines_per_s', ',.0f')} "
            f"| gate = {g / d:.0%} of direct |"
        )
    rows.append(
        f"| gate worker CPU per request, /api/tags 50 conn. (µs) | – "
        f"| {_cell(runs, 'tags_c50/gate', 'gate_cpu_us_per_req', '.0f')} | |"
    )
    for post, (label, _path, _body) in POSTS.items():
        key = f"post_{post}_c1"
        if key in summary:
            rows.append(
                f"| gate worker CPU per request, {label} 1 conn. (µs) | – "
                f"| {_cell(runs, key + '/gate', 'gate_cpu_us_per_req', '.0f')} | |"
            )
    for name in labels:
        if name in summary:
            rows.append(
                f"| gate worker CPU per NDJSON line, {name.split('_')[1]} (µs) | – "
                f"| {_cell(runs, name + '/gate', 'gate_cpu_us_per_line', '.1f')} | |"
            )
    p50 = summary["p50_c1"]["added_ms"]
    rps = summary["rps_c50"]["gate"]
    ok = {True: "met", False: "NOT met"}
    rows.append("")
    rows.append(
        f"Target (2 cores, one worker): added p50 ≤ {TARGET_ADDED_P50_MS} ms at 1 connection: "
        f"{p50:.3f} ms, {ok[p50 <= TARGET_ADDED_P50_MS]}; ≥ {TARGET_RPS:,} req/s: "
        f"{rps:,.0f}, {ok[rps >= TARGET_RPS]}."
    )
    posts = [
        (POSTS[k[5:-3]][0], v["added_ms"]) for k, v in summary.items() if k.startswith("post_")
    ]
    if posts:
        rows.append(
            f"POSTs (added p50 ≤ {TARGET_POST_ADDED_P50_MS:g} ms at 1 connection): "
            + "; ".join(
                f"{label} {added:+.3f} ms, {ok[added <= TARGET_POST_ADDED_P50_MS]}"
                for label, added in posts
            )
            + "."
        )
    failed = sum(s.get("short_or_failed", 0) for k, s in summary.items() if k.startswith("streams"))
    errors = sum(
        r.get("errors", 0) for k, rs in runs.items() if k.startswith(("tags", "post")) for r in rs
    )
    rows.append(f"Errors: {errors:g} HTTP errors in wrk runs, {failed:g} failed or short streams.")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure and side (median)")
    p.add_argument("--quick", action="store_true", help="one 2-second run of each (a smoke test)")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--paced-interval", type=float, default=0.01, help="0 skips the paced runs")
    p.add_argument(
        "--no-streams", action="store_true", help="skip the stream runs (latency figures only)"
    )
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    p.add_argument(
        "--gate-env", action="append", default=[], metavar="K=V", help="extra gate setting"
    )
    args = p.parse_args()
    if args.quick:
        args.duration, args.repeat = 2.0, 1
    if shutil.which("wrk") is None:
        print("bench: wrk not found on PATH (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    children = Children()
    runs: Runs = {}
    started = time.monotonic()
    try:
        with harness.interruptible():
            fake_url = harness.start_fake(children, "--token-interval", "0")
            fake_pid = children.procs[-1].pid
            env = dict(item.split("=", 1) for item in args.gate_env)
            gate = harness.start_gate(children, fake_url, env)
            setup = Setup(children, fake_url, fake_pid, gate, gate.worker_pids())
            log(f"fake Ollama {fake_url}, gate {gate.url} (worker pid {setup.gate_pids})")
            d = args.duration
            for where in ("direct", "gate"):  # warm up pools and code paths
                run_wrk(setup, where, 50, 1)
            measure(runs, "tags_c1", args.repeat, lambda w: run_wrk(setup, w, 1, d), log)
            for post in POSTS:
                measure(
                    runs,
                    f"post_{post}_c1",
                    args.repeat,
                    lambda w, post=post: run_wrk(setup, w, 1, d, post),
                    log,
                )
            measure(runs, "tags_c50", args.repeat, lambda w: run_wrk(setup, w, 50, d), log)
            s, t = args.streams, args.tokens
            if args.no_streams:
                args.paced_interval = 0.0
            else:
                measure(
                    runs,
                    "streams_max",
                    args.repeat,
                    lambda w: run_streams(setup, w, s, t, 0, d),
                    log,
                )
            if args.paced_interval > 0:
                i = args.paced_interval
                measure(
                    runs,
                    "streams_paced",
                    args.repeat,
                    lambda w: run_streams(setup, w, s, t, i, d),
                    log,
                )
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        children.stop_all()
    summary = summarize(runs)
    info = harness.machine()
    elapsed = time.monotonic() - started
    print(
        f"\nOllama Gate proxy overhead — {args.repeat} run(s) of {args.duration:g} s per figure "
        f"and side, median (min–max); {elapsed:.0f} s in all\n"
    )
    print(table(runs, summary, args))
    print(
        "\nMachine: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + ". Load generators, fake upstream and gate share these cores."
    )
    if args.json:
        harness.write_json(
            args.json,
            machine=info,
            options={k: str(v) for k, v in vars(args).items()},
            summary=summary,
            runs=runs,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
