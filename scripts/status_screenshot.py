"""Take docs/status.png: the status page, 1280 px wide, under `make demo`'s load.

Starts what `make demo` starts (the simulator, the gate, clients asking four
models), with one API key per client so the page names them (one key has a
tight limit, so some 429s show), lets the load run so the charts fill, and
saves a full-page screenshot from Debian's headless Chromium. Everything stays
on 127.0.0.1.

    .venv/bin/python scripts/status_screenshot.py [--seconds 120] [--out docs/status.png]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import demo  # noqa: E402 - scripts/demo.py, found through the path above

from tests.chromium import chromium, full_page_screenshot, missing  # noqa: E402
from tests.support import free_port  # noqa: E402

KEYS = ["alice", "bob", "carol", "ci-batch", "notebook-7"]
LIMITED = "ci-batch"  # gets limit_inference = "6/minute"


def keys_file(folder: Path) -> Path:
    """A keys file with one user key per name; the secret of NAME is NAME-secret."""
    lines = []
    for name in KEYS:
        digest = hashlib.sha256(f"{name}-secret".encode()).hexdigest()
        lines += [f"[keys.{name}]", f'key_sha256 = "{digest}"', 'role = "user"']
        if name == LIMITED:
            lines.append('limit_inference = "6/minute"')
    path = folder / "keys.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120, help="load before the shot")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--out", default=str(ROOT / "docs" / "status.png"))
    args = parser.parse_args()
    if missing():
        raise SystemExit(missing())

    folder = Path(tempfile.mkdtemp(prefix="gate-shot-"))
    os.environ["GATE_API_KEYS_FILE"] = str(keys_file(folder))  # demo.start_gate passes it on
    sim, sim_url = demo.start_simulator()
    port = free_port()
    gate = demo.start_gate(sim_url, port)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    stats: dict[str, int] = {}
    threads = [
        threading.Thread(
            target=demo.client,
            args=(url, KEYS[i % len(KEYS)], stop, stats, f"{KEYS[i % len(KEYS)]}-secret"),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    try:
        for t in threads:
            t.start()
        with chromium(args.width, 900) as driver:
            driver.get(url + "/gate/status")
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                time.sleep(5)
                print(f"{deadline - time.monotonic():4.0f}s left; answers {stats}", flush=True)
            full_page_screenshot(driver, args.out, args.width)
        print(f"saved {args.out}")
    finally:
        demo.shut_down(stop, threads, (gate, sim))


if __name__ == "__main__":
    main()
