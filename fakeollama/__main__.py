"""``python -m fakeollama``: run the simulated Ollama until SIGTERM or SIGINT.

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

from .config import SETTINGS
from .server import FakeOllama


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fakeollama",
        description="Run a simulated Ollama until SIGTERM or SIGINT.",
        epilog=(__doc__ or "").split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=11434, help="port, 0 for any free one (default: 11434)"
    )
    for s in SETTINGS:
        if s.metavar is None:  # a flag that turns a default-on setting off
            p.add_argument(s.option, dest=s.name, action="store_false", help=s.doc)
            continue
        default = s.unset if s.default is None else s.default
        p.add_argument(
            s.option,
            dest=s.name,
            type=s.cli_type,
            default=s.default,
            metavar=s.metavar,
            help=f"{s.doc} (default: {default})",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = {s.name: getattr(args, s.name) for s in SETTINGS}
    try:
        fake = FakeOllama(host=args.host, port=args.port, **settings)
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
