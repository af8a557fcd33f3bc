"""Helpers for tests: free ports, and the gate started under real gunicorn."""

from __future__ import annotations

import compileall
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"

# The defaults every test gate starts from: limits off so that tests of other
# features never meet a 429 by accident; tests of a feature set its variables.
BASE_ENV = {
    "GATE_LIMIT_INFERENCE": "off",
    "GATE_LIMIT_EMBED": "off",
    "GATE_LIMIT_ADMIN": "off",
    "GATE_LIMIT_LIGHT": "off",
    "GATE_LOG_LEVEL": "info",
    "GATE_GRACEFUL_TIMEOUT": "5",
}


# The share of a property test's examples that the "dev" hypothesis profile runs
# (tests/conftest.py): the "ci" profile runs them all.
DEV_SHARE = 5


def hypothesis_profile(environ: Mapping[str, str]) -> str:
    """The hypothesis profile to load: HYPOTHESIS_PROFILE if set; else "ci" where CI is
    set (CI=true, as CI services set it), "dev" elsewhere."""
    if environ.get("HYPOTHESIS_PROFILE"):
        return environ["HYPOTHESIS_PROFILE"]
    ci = environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return "ci" if ci else "dev"


def example_count(full: int) -> int:
    """A property test's example count: ``full`` under the "ci" hypothesis profile, a
    fifth of it (at least 10) under "dev", the local default."""
    if settings.get_current_profile_name() == "ci":
        return full
    return max(10, full // DEV_SHARE)


def compile_ahead(config: pytest.Config) -> None:
    """Compile the project's modules, and rewrite the test modules' asserts into pytest's
    bytecode cache, once: run before pytest-xdist starts its workers, which would otherwise
    each do it as they import the same modules (some 4 s of CPU per worker on a fresh
    checkout). What is already compiled and current is left as it is."""
    skip = re.compile(r"/tests/(test_[^/]*|conftest)\.py$")  # pytest's own cache, below
    for path in sorted(ROOT.iterdir()):
        if path.suffix == ".py":
            compileall.compile_file(path, quiet=2)
        elif (path / "__init__.py").is_file():
            compileall.compile_dir(path, maxlevels=0, quiet=2, rx=skip)  # not node_modules
    if config.getoption("assertmode") == "rewrite":
        for path in sorted((ROOT / "tests").glob("*.py")):
            if skip.search(str(path)):
                rewrite_ahead(config, path)


def rewrite_ahead(config: pytest.Config, path: Path) -> Path:
    """Write the pyc that pytest's assertion rewriting would write as it imports the test
    module ``path`` (unless a current one is there); return its path.

    The one use of pytest's private rewrite functions: tests/test_harness.py fails if
    pytest no longer reads what this writes."""
    from _pytest.assertion import rewrite

    state = config.stash[rewrite.assertstate_key]
    pyc = rewrite.get_cache_dir(path) / (path.name[:-3] + rewrite.PYC_TAIL)
    if rewrite._read_pyc(path, pyc, state.trace) is None:
        rewrite.try_makedirs(pyc.parent)
        source_hash, code = rewrite._rewrite_test(path, config)
        rewrite._write_pyc(state, code, source_hash, pyc)
    return pyc


# Under pytest-xdist each worker (gw0, gw1, ...) takes its ports from its own slice below
# the kernel's ephemeral range (32768-60999 on Linux), so that no two workers are handed the
# same port between ``free_port`` and the bind of the process it is meant for, and no
# socket the kernel numbers itself (a fake Ollama's, a client's) takes one meanwhile.
PORT_SLICE = 2000
PORT_BASE = 10000
_given: set[int] = set()


def _xdist_worker() -> int | None:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on now: the kernel's choice, or under pytest-xdist
    one of this worker's own slice that it has not handed out before."""
    worker = _xdist_worker()
    if worker is None or PORT_BASE + (worker + 1) * PORT_SLICE > 32768:
        with socket.socket() as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    first = PORT_BASE + worker * PORT_SLICE
    ports = list(range(first, first + PORT_SLICE))
    random.shuffle(ports)
    if len(_given) > PORT_SLICE // 2:
        _given.clear()  # those handed out long ago are free again, or found taken below
    for port in ports:
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT fails too
            except OSError:
                continue
        _given.add(port)
        return port
    raise AssertionError(f"no free port left in {first}-{first + PORT_SLICE - 1}")


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on 127.0.0.1:``port`` (and not
    some other process that took the port first)."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    return False


@dataclass
class Gate:
    """One gunicorn process running the gate."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def worker_pids(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []

    def rss_kib(self) -> int:
        """Resident memory of the (single) worker, in KiB."""
        (pid,) = self.worker_pids()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_idle(self, timeout: float = 5) -> None:
        """Leak check: the gate's work queue holds no slot and no waiting job.

        Read from /gate/status.json; a gate whose status page the test closed to
        loopback callers (admin mode) or that is no longer running is not checked.
        """
        deadline = time.monotonic() + timeout
        queue: dict[str, object] = {}
        while self.proc.poll() is None:
            with requests.get(self.url + "/gate/status.json", timeout=5) as resp:
                if resp.status_code in (401, 403):
                    return
                queue = resp.json().get("queue")
            if queue is None:
                return
            if queue["running"] == 0 and queue["waiting"] == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"gate left jobs behind: {queue}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 15) -> int:
        """Stop gunicorn; return its exit status.

        By default at once: SIGKILL to its process group, master and workers alike,
        since a test that is not about shutdown has nothing left to drain (a graceful
        stop costs about a second per gate). Tests of shutdown send SIGTERM themselves
        or pass it here. Whatever is left of the group afterwards is killed too.
        """
        workers = self.worker_pids()
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self._kill_group()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(5)
        self._kill_group()  # a worker the master left behind
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.proc.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class PortTaken(Exception):
    """The gate's port was taken by another process between ``free_port`` and its bind."""


def start_gate(
    upstream: str, log_dir: Path, env: Mapping[str, str] | None = None, *, wait: bool = True
) -> Gate:
    """Start gunicorn with the gevent worker as `make run` does and wait until it answers.

    Should another process take the free port first (several test workers share the
    host), the gate is started again on another port."""
    for _ in range(3):
        gate = _launch_gate(upstream, log_dir, env)
        if not wait:
            return gate
        try:
            wait_until_serving(gate)
            return gate
        except PortTaken:
            gate.stop()
    raise AssertionError(f"no free port for the gate after 3 tries:\n{gate.logs()}")


def _launch_gate(upstream: str, log_dir: Path, env: Mapping[str, str] | None) -> Gate:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "OLLAMA_"))}
    full_env.update(BASE_ENV)
    full_env["GATE_UPSTREAM"] = upstream
    full_env["GATE_BIND"] = f"127.0.0.1:{port}"
    full_env.update(env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"gate-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "app:create_app()"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Gate.stop kills it whole
        )
    return Gate(f"http://127.0.0.1:{port}", port, proc, log, full_env)


def wait_until_serving(gate: Gate, timeout: float = 20) -> None:
    """Wait until the gate's own worker answers; raise PortTaken when another process
    holds its port."""
    deadline = time.monotonic() + timeout
    # gunicorn logs its bind at info level: until then, the kernel's socket table (some ms of
    # CPU to read with many sockets open) need not be read at every turn.
    logs_bind = gate.env.get("GATE_LOG_LEVEL", "info").lower() in ("debug", "info")
    while time.monotonic() < deadline:
        logs = gate.logs()
        if "Connection in use: " in logs:  # gunicorn's bind failed
            raise PortTaken(gate.url)
        if gate.proc.poll() is not None:
            raise AssertionError(f"gate exited with {gate.proc.returncode}:\n{gate.logs()}")
        try:
            # Any HTTP answer means the worker is up (the upstream may be down on purpose).
            # Once connected (the master listens), wait for the answer however long the
            # worker takes to boot: a probe given up on would reach the app later as a
            # request whose client left, and count in its metrics as one.
            remaining = max(1.0, deadline - time.monotonic())
            bound = "Listening at: " in logs or not logs_bind
            if bound and listens_on(gate.proc.pid, gate.port):
                requests.get(gate.url + "/api/version", timeout=(2, remaining))
                return
        except (requests.ConnectionError, requests.Timeout):  # not yet, or a busy machine
            pass
        time.sleep(0.05)
    gate.stop()
    raise AssertionError(f"gate did not start in {timeout}s:\n{gate.logs()}")


def clients(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The requests in a fake's ``stats`` made on clients' behalf: without the status
    page's own /api/ps probes (User-Agent ollama-gate-probe), which poll whenever they
    are due and so may land in the middle of any test."""
    return [
        r
        for r in stats["requests"]
        if not r["headers"].get("user-agent", "").startswith("ollama-gate-probe")
    ]


def client_requests(fake: Any) -> list[dict[str, Any]]:
    """What reached the fake Ollama on clients' behalf (see ``clients``)."""
    return clients(fake.stats())


def upstream_saw_leave(fake: Any, closed_at: float, what: str) -> dict[str, Any]:
    """Wait until the fake saw its one connection dropped, within 1 s of ``closed_at``
    (when the client closed its socket); return the fake's stats."""
    stats: dict[str, Any] = fake.wait_for(lambda s: s["disconnects"] == 1, timeout=5)
    delay = stats["disconnect_times"][0] - closed_at
    print(f"\nupstream saw the client leave {what} {delay * 1000:.0f} ms later")
    assert delay < 1.0
    return stats
