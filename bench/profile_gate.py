"""Where the gate's CPU goes per proxied request: two profilers, one question.

    python bench/profile_gate.py [--requests N] [--concurrency 50] [--top 25]
    python bench/profile_gate.py --post chat --concurrency 1 [--pstats out.prof]
    python bench/profile_gate.py --py-spy /tmp/pyspy/bin/py-spy [--duration 8]
    python bench/profile_gate.py --py-spy PATH --streams 200 [--interval 0.01]
    python bench/profile_gate.py --py-spy PATH --post chat --connections 1

Default: cProfile in this process. The WSGI app (``create_app``) is called directly
by ``--concurrency`` greenlets under gevent, GET /api/tags against a fast fake Ollama,
(or, with ``--post show|chat``, that POST with its JSON body; ``chat`` is a
non-streamed chat through the work queue), and the top functions by own time are
printed in µs per request; ``--pstats`` also saves the raw profile. gunicorn is not
in the picture (no HTTP parsing or writing to a client socket), and cProfile slows
what it measures, so read the shares, not the totals.

``--py-spy``: the real thing. The gate runs under gunicorn (gevent worker) with wrk
driving 50 connections (or, with ``--streams``, bench/stream_load.py relaying NDJSON
streams), and py-spy (installed in a venv of its own, it needs ptrace) samples the
worker; the top frames by own and by inclusive share follow.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import harness  # noqa: E402

sys.path.insert(0, str(harness.ROOT))


#: ``--post chat``: the request profiled instead of GET /api/tags (a short non-streamed chat).
POSTS: dict[str, tuple[str, bytes]] = {
    "show": ("/api/show", b'{"model": "llama3.2"}'),
    "chat": (
        "/api/chat",
        b'{"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": false}',
    ),
}


def environ_for(gate_host: str, path: str, method: str = "GET") -> dict[str, Any]:
    """A WSGI environ like the one gunicorn builds for ``method path`` from wrk."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "HTTP_HOST": gate_host,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }


def in_process(args: argparse.Namespace, upstream: str) -> None:
    from app import create_app
    from settings import Settings

    off = {f"limit_{c}": "off" for c in ("inference", "embed", "admin", "light")}
    app = create_app(Settings(upstream=upstream, **off))
    if args.post:
        path, payload = POSTS[args.post]
        template = environ_for("127.0.0.1:8000", path, "POST")
        template["CONTENT_TYPE"] = "application/json"
        template["CONTENT_LENGTH"] = str(len(payload))
        what = f"POST {path}"
    else:
        payload, what = b"", "GET /api/tags"
        template = environ_for("127.0.0.1:8000", "/api/tags")
    statuses: collections.Counter[str] = collections.Counter()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses[status] += 1
        return lambda data: None

    def one() -> None:
        environ = dict(template)
        environ["wsgi.input"] = io.BytesIO(payload)
        body = app(environ, start_response)
        try:
            for _ in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def worker(n: int) -> None:
        for _ in range(n):
            one()

    per = args.requests // args.concurrency
    gevent.joinall([gevent.spawn(worker, 20) for _ in range(args.concurrency)], raise_error=True)
    statuses.clear()
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    gevent.joinall([gevent.spawn(worker, per) for _ in range(args.concurrency)], raise_error=True)
    profile.disable()
    wall = time.perf_counter() - t0
    total = per * args.concurrency
    print(
        f"cProfile, in process: {total} x {what} from {args.concurrency} greenlets, "
        f"{total / wall:,.0f} req/s under the profiler; statuses {dict(statuses)}\n"
    )
    stats = pstats.Stats(profile)
    if args.pstats:
        stats.dump_stats(args.pstats)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{_short(file)}:{line}({func})"))
    own = sum(r[0] for r in rows)
    print("| own µs/req | share | cumulative µs/req | calls/req | function |")
    print("|---|---|---|---|---|")
    for tt, ct, nc, name in sorted(rows, reverse=True)[: args.top]:
        print(
            f"| {tt / total * 1e6:.1f} | {tt / own:.1%} | {ct / total * 1e6:.1f} "
            f"| {nc / total:.1f} | `{name}` |"
        )
    print("\nBy package (own time):")
    by_pkg: collections.Counter[str] = collections.Counter()
    for tt, _ct, _nc, name in rows:
        by_pkg[_package(name)] += tt
    for pkg, tt in by_pkg.most_common(12):
        print(f"  {tt / own:6.1%}  {tt / total * 1e6:7.1f} µs/req  {pkg}")


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(harness.ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _package(name: str) -> str:
    head = name.split(":", 1)[0]
    if head.startswith("~") or head.startswith("<"):
        return "builtins (C: socket calls, dict, str...)"
    first = head.split("/", 1)[0]
    return first.removesuffix(".py")


def with_py_spy(args: argparse.Namespace, children: harness.Children, upstream: str) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH (Debian: apt-get install wrk)")
    gate = harness.start_gate(children, upstream)
    (worker,) = gate.worker_pids()
    if args.streams:
        # 200 NDJSON streams of 200 tokens, at --interval between tokens (0: flat out).
        what = f"{args.streams} NDJSON streams of /api/generate, token interval {args.interval:g} s"
        cmd = [harness.PYTHON, str(Path(__file__).parent / "stream_load.py"), gate.url]
        cmd += ["--streams", str(args.streams), "--interval", str(args.interval)]
        cmd += ["--duration", f"{args.duration + 2:g}", "--warmup", "0.5"]
    elif args.post:
        path, payload = POSTS[args.post]
        script = Path(tempfile.mkdtemp(prefix="bench-wrk-")) / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.path = "{path}"\n'
            f"wrk.body = '{payload.decode()}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        what = f"wrk -c{args.connections} POST {path}"
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration + 3:g}s"]
        cmd += ["-s", str(script), gate.url + path]
    else:
        what = f"wrk -c{args.connections} GET /api/tags"
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration + 3:g}s"]
        cmd.append(gate.url + "/api/tags")
    load = children.popen(cmd, stdout=subprocess.PIPE)
    time.sleep(1)
    out = Path(tempfile.gettempdir()) / f"gate-pyspy-{worker}.txt"
    subprocess.run(
        [args.py_spy, "record", "-p", str(worker), "-d", f"{args.duration:g}"]
        + ["-r", "250", "-f", "raw", "-o", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    stdout, _ = load.communicate(timeout=30)
    children.procs.remove(load)
    lines = stdout.decode().splitlines()
    rate = next((ln for ln in lines if "Requests/sec" in ln or ln.startswith("{")), "")
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = pool = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        if "gevent/threadpool.py" in stack:
            # gevent's resolver thread, parked on a lock: py-spy cannot tell it is idle.
            pool += n
            continue
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    print(f"py-spy on the gunicorn worker; load: {what}")
    print(
        f"{total} samples of the worker's main thread ({pool} of its idle resolver thread left out)"
    )
    print(f"load generator: {rate.strip()}")
    print(f"raw stacks: {out}\n")
    print("Own time (the frame on top of the stack):")
    for frame, n in own.most_common(args.top):
        print(f"  {n / total:6.1%}  {frame}")
    print("\nOwn time by package (socket send/recv syscalls show up under gevent):")
    by_pkg: collections.Counter[str] = collections.Counter()
    for frame, n in own.items():
        where = frame.rpartition("(")[2]
        by_pkg[where.split("/", 1)[0].removesuffix(")").partition(".py")[0] or "?"] += n
    for pkg, n in by_pkg.most_common(12):
        print(f"  {n / total:6.1%}  {pkg}")
    print("\nInclusive (the frame anywhere on the stack):")
    for frame, n in incl.most_common(args.top * 2):
        print(f"  {n / total:6.1%}  {frame}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--pstats", metavar="FILE", help="in process: also dump the raw profile here")
    p.add_argument("--post", choices=sorted(POSTS), help="profile this POST instead")
    p.add_argument("--py-spy", metavar="PATH", help="sample the real gunicorn worker with py-spy")
    p.add_argument("--duration", type=float, default=8.0, help="py-spy: seconds to sample")
    p.add_argument("--connections", type=int, default=50, help="py-spy: wrk connections")
    p.add_argument("--streams", type=int, default=0, help="py-spy: load with N NDJSON streams")
    p.add_argument("--interval", type=float, default=0.0, help="py-spy: seconds between tokens")
    args = p.parse_args()
    children = harness.Children()
    try:
        with harness.interruptible():
            upstream = harness.start_fake(children, "--token-interval", "0")
            if args.py_spy:
                with_py_spy(args, children, upstream)
            else:
                in_process(args, upstream)
    except KeyboardInterrupt:
        return 130
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
