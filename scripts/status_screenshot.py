"""Take docs/status.png: the status page, 1280 px wide, under `make demo`'s own load.

Runs exactly what `make demo` runs (scripts/demo.py: two simulated backends, the gate,
eight clients with five API keys asking four models, one key limited so some
429s show) on a free loopback port, lets the load run so the charts fill, and
saves a full-page screenshot from Debian's headless Chromium. Everything stays
on 127.0.0.1.

    .venv/bin/python scripts/status_screenshot.py [--seconds 170] [--out docs/status.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import demo  # noqa: E402 - scripts/demo.py, found through the path above

from tests.chromium import chromium, full_page_screenshot, missing  # noqa: E402
from tests.support import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=170, help="load before the shot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--out", default=str(ROOT / "docs" / "status.png"))
    args = parser.parse_args()
    if missing():
        raise SystemExit(missing())

    with demo.running(f"127.0.0.1:{free_port()}") as load:
        with chromium(args.width, 900) as driver:
            driver.get(load.url + "/gate/status")
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                time.sleep(5)
                print(f"{deadline - time.monotonic():4.0f}s left; answers {load.stats}", flush=True)
            full_page_screenshot(driver, args.out, args.width)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
