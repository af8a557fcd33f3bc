"""Processes the benchmarks start: the fake Ollama, the gate under gunicorn, load generators.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only the
benchmark, which then stops each child it started by its process group (gunicorn's
master and its worker, wrk, the stream client). Nothing here outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The gate as the benchmark runs it: every limit off, and the work queue (when the
# gate has one) wide enough that 200 streams for one model run at once, so that
# the figures are those of the relay, not of a policy.
GATE_ENV = {
    "GATE_WORKERS": "1",
    "GATE_LIMIT_INFERENCE": "off",
    "GATE_LIMIT_EMBED": "off",
    "GATE_LIMIT_ADMIN": "off",
    "GATE_LIMIT_LIGHT": "off",
    "GATE_MODEL_CONCURRENCY": "100000",
    "GATE_QUEUE_MAX": "100000",
    "GATE_QUEUE_MAX_PER_CLIENT": "100000",
    "GATE_LOG_LEVEL": "warning",
    "GATE_ACCESS_LOG": "0",
    "GATE_GRACEFUL_TIMEOUT": "2",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_json(path: Path, **fields: Any) -> None:
    """Write a benchmark's figures to ``path``, stamped with the date (UTC)."""
    payload = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class Children:
    """The processes one benchmark started; ``stop_all`` ends each by its process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            list(args), start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        else:
            # The leader is gone; a straggler in its group (a gunicorn worker) may not be.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so ``finally`` blocks clean up."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def start_fake(children: Children, *args: str, timeout: float = 15) -> str:
    """Start ``python -m fakeollama --port 0 --no-record ARGS``; return its base URL."""
    proc = children.popen(
        [PYTHON, "-m", "fakeollama", "--port", "0", "--no-record", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            byte = os.read(proc.stdout.fileno(), 1)  # unbuffered: select() must see the rest
            if not byte:
                break
            line += byte
    sel.close()
    text = line.decode(errors="replace").strip()
    prefix = "fakeollama listening on "
    if not text.startswith(prefix):
        children.stop(proc)
        raise RuntimeError(f"the fake Ollama did not start: {text!r}")
    return text[len(prefix) :]


@dataclass
class Gate:
    url: str
    master: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def worker_pids(self) -> list[int]:
        path = Path(f"/proc/{self.master.pid}/task/{self.master.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []


def start_gate(
    children: Children,
    upstream: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    root: Path = ROOT,
) -> Gate:
    """Start the gate as `make run` does (gunicorn, gevent worker) and wait until it answers.

    ``root`` is the checkout to run: another one lets bench/ab_gate.py compare two.
    """
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "OLLAMA_"))}
    full_env.update(GATE_ENV)
    full_env.update(env or {})
    full_env["GATE_UPSTREAM"] = upstream
    full_env["GATE_BIND"] = f"127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"bench-gate-{port}.log"
    with log.open("wb") as out:
        master = children.popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "app:create_app()"],
            cwd=root,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gate = Gate(f"http://127.0.0.1:{port}", master, log, full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise RuntimeError(f"the gate exited with {master.returncode}: see {log}")
        try:
            with urllib.request.urlopen(gate.url + "/api/version", timeout=2) as resp:
                resp.read()
        except urllib.error.HTTPError:
            pass  # it answers (a 401 with a keys file: the version needs a key)
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
            continue
        if gate.worker_pids():
            return gate
        time.sleep(0.1)
    children.stop(master)
    raise RuntimeError(f"the gate did not answer within {timeout}s: see {log}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # Fields 14 and 15 of proc(5), counted after the ")" that ends the command name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU seconds that some processes spend between ``start()`` and ``stop()``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.before = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        self.before = sum(cpu_seconds(pid) for pid in self.pids)

    def stop(self) -> float:
        self.seconds = sum(cpu_seconds(pid) for pid in self.pids) - self.before
        return self.seconds


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    info = {"nproc": str(os.cpu_count()), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.partition(":")[2].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError):
        info["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    from importlib.metadata import PackageNotFoundError, version

    for name in ("gunicorn", "gevent", "geventhttpclient", "urllib3", "requests", "flask"):
        with contextlib.suppress(PackageNotFoundError):
            info[name] = version(name)
    return info
