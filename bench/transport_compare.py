"""The upstream transport alone: requests vs urllib3 vs geventhttpclient under gevent.

    python bench/transport_compare.py [--duration S] [--repeat N] [--quick] [--json out.json]

The gate may leave ``requests`` for another transport if ``requests`` cannot reach
the target, choosing by the figures. This measures each candidate doing what the gate
does with it, GET /api/tags from a fast fake Ollama with the body streamed back in
blocks, from 1 and from 50 greenlets in one monkey-patched process: requests/s, and
CPU µs per request (``time.process_time``, this process only; the fake runs in its
own). CPU per request is the figure that decides: one gate worker is one core.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import harness  # noqa: E402

BLOCK = 64 * 1024
PATH = "/api/tags"

Request = Callable[[], int]


def with_requests(
    base: str, conc: int, trust_env: bool = True
) -> tuple[Request, Callable[[], None]]:
    """requests.Session with a pool as large as the concurrency; body streamed in blocks."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    # trust_env=False skips the per-request look at proxy variables and .netrc, which a
    # gate would not want anyway; it is measured both ways.
    session.trust_env = trust_env
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=conc, pool_block=True))
    url = base + PATH

    def one() -> int:
        with session.get(url, stream=True) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"status {resp.status_code}")
            return sum(len(block) for block in resp.iter_content(BLOCK))

    return one, session.close


def with_urllib3(base: str, conc: int) -> tuple[Request, Callable[[], None]]:
    """urllib3's HTTPConnectionPool used directly, as the gate's first version did."""
    import urllib3

    parts = urlsplit(base)
    pool = urllib3.HTTPConnectionPool(
        parts.hostname, parts.port, maxsize=conc, block=True, retries=False
    )

    def one() -> int:
        resp = pool.urlopen(
            "GET",
            PATH,
            retries=False,
            redirect=False,
            preload_content=False,
            decode_content=False,
            release_conn=False,
        )
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
        size = sum(len(block) for block in resp.stream(BLOCK))
        resp.release_conn()
        return size

    return one, pool.close


def with_geventhttpclient(base: str, conc: int) -> tuple[Request, Callable[[], None]]:
    """geventhttpclient's HTTPClient (keep-alive pool, C parser), as proxy/upstream.py uses it."""
    from geventhttpclient import HTTPClient
    from geventhttpclient.header import Headers

    client = HTTPClient.from_url(base, concurrency=conc, block_size=BLOCK)
    client.default_headers = Headers()

    def one() -> int:
        resp = client.request("GET", PATH)
        if resp.status_code != 200:
            raise RuntimeError(f"status {resp.status_code}")
        size = 0
        while block := resp.read(BLOCK):
            size += len(block)
        resp.release()
        return size

    return one, client.close


def with_requests_no_env(base: str, conc: int) -> tuple[Request, Callable[[], None]]:
    return with_requests(base, conc, trust_env=False)


CLIENTS = {
    "requests": with_requests,
    "requests, trust_env=False": with_requests_no_env,
    "urllib3": with_urllib3,
    "geventhttpclient": with_geventhttpclient,
}


def measure(name: str, base: str, conc: int, seconds: float, expect: int) -> dict[str, float]:
    """Run ``conc`` greenlets looping on one request for ``seconds``, after a short warm-up."""
    one, close = CLIENTS[name](base, conc)
    count = [0]
    stop = [False]

    def loop() -> None:
        while not stop[0]:
            size = one()
            if size != expect:
                raise RuntimeError(f"{name}: body of {size} bytes, expected {expect}")
            count[0] += 1

    workers = [gevent.spawn(loop) for _ in range(conc)]
    try:
        gevent.sleep(0.5)
        n0, t0, c0 = count[0], time.perf_counter(), time.process_time()
        gevent.sleep(seconds)
        n1, t1, c1 = count[0], time.perf_counter(), time.process_time()
        stop[0] = True
        gevent.joinall(workers, timeout=10, raise_error=True)
    finally:
        gevent.killall(workers)
        close()
    n = n1 - n0
    return {
        "requests": n,
        "rps": n / (t1 - t0),
        "cpu_us_per_req": (c1 - c0) / n * 1e6 if n else float("nan"),
        "cpu_share": (c1 - c0) / (t1 - t0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measured run")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    p.add_argument("--quick", action="store_true", help="one 1-second run of each")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.duration, args.repeat = 1.0, 1

    children = harness.Children()
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with harness.interruptible():
            base = harness.start_fake(children)
            import urllib.request

            with urllib.request.urlopen(base + PATH) as resp:
                expect = len(resp.read())
            names = list(CLIENTS)
            for i in range(args.repeat):
                order = names[i % len(names) :] + names[: i % len(names)]
                for conc in (1, 50):
                    for name in order:
                        result = measure(name, base, conc, args.duration, expect)
                        runs.setdefault(f"{name}/c{conc}", []).append(result)
                        print(
                            f"  {name} c{conc} run {i + 1}: {result['rps']:,.0f} req/s, "
                            f"{result['cpu_us_per_req']:.0f} µs CPU/req",
                            file=sys.stderr,
                            flush=True,
                        )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()

    def cell(key: str, field: str) -> str:
        values = [r[field] for r in runs[key]]
        med = harness.median(values)
        if len(values) < 2:
            return f"{med:,.0f}"
        return f"{med:,.0f} ({min(values):,.0f}–{max(values):,.0f})"

    print(
        f"\nTransport alone, GET {PATH} ({expect} bytes) from the fake Ollama, one gevent "
        f"process; median (min–max) of {args.repeat} run(s) of {args.duration:g} s\n"
    )
    print("| transport | greenlets | requests/s | CPU µs per request |")
    print("|---|---|---|---|")
    for conc in (1, 50):
        for name in CLIENTS:
            key = f"{name}/c{conc}"
            print(f"| {name} | {conc} | {cell(key, 'rps')} | {cell(key, 'cpu_us_per_req')} |")
    info = harness.machine()
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        summary = {
            key: {f: harness.median([r[f] for r in rs]) for f in ("rps", "cpu_us_per_req")}
            for key, rs in runs.items()
        }
        harness.write_json(
            args.json,
            machine=info,
            summary=summary,
            runs=runs,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
