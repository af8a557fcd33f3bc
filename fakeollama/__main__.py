"""``python -m fakeollama``: run the fake Ollama server until SIGTERM or SIGINT.

Prints exactly one line, ``fakeollama listening on http://HOST:PORT``, once
the socket listens. Control it over HTTP: ``GET /_fake/stats``,
``POST /_fake/configure`` (a JSON object of settings), ``POST /_fake/reset``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .server import SETTINGS_DEFAULTS, FakeOllama


def _parser() -> argparse.ArgumentParser:
    d = SETTINGS_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m fakeollama", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=11434, help="port, 0 for any free one")
    p.add_argument("--token-interval", type=float, default=d["token_interval"], metavar="S")
    p.add_argument("--tokens", type=int, default=d["tokens"], metavar="N")
    p.add_argument("--load-time", type=float, default=d["load_time"], metavar="S")
    p.add_argument("--vram", type=int, default=None, metavar="N", help="models that fit at once")
    p.add_argument("--on-overflow", choices=("queue", "crash"), default=d["on_overflow"])
    p.add_argument("--num-parallel", type=int, default=None, metavar="N")
    p.add_argument("--models", default=None, help="comma-separated catalog (replaces the default)")
    p.add_argument("--version", dest="ollama_version", default=d["version"], metavar="V")
    p.add_argument("--no-record", action="store_true", help="do not keep the request list")
    p.add_argument("--stall", type=float, default=0.0, metavar="S")
    p.add_argument("--die-after", type=int, default=None, metavar="N")
    p.add_argument("--fail-status", type=int, default=None, metavar="CODE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fake = FakeOllama(
            host=args.host,
            port=args.port,
            token_interval=args.token_interval,
            tokens=args.tokens,
            load_time=args.load_time,
            vram=args.vram,
            on_overflow=args.on_overflow,
            num_parallel=args.num_parallel,
            models=args.models,
            version=args.ollama_version,
            record_requests=not args.no_record,
            stall=args.stall,
            die_after=args.die_after,
            fail_status=args.fail_status,
        )
    except (TypeError, ValueError) as exc:
        print(f"fakeollama: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fake.start()
    except OSError as exc:
        print(f"fakeollama: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"fakeollama listening on {fake.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
