"""A real redis-server for tests: started on a free loopback port, no persistence.

``RedisServer.paused()`` stops the process with SIGSTOP and continues it with
SIGCONT: the kernel still accepts connections, but nothing answers, which is
how a hung or overloaded Redis looks to its clients.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support import PortTaken, free_port, listens_on


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def flush(self) -> None:
        """Forget every key, so a test starts with no limits counted."""
        with self.client() as client:
            client.flushall()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Redis stopped (SIGSTOP) for the block, continued (SIGCONT) however it ends."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        self.resume()  # a stopped process would not act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_redis(workdir: Path, timeout: float = 10) -> RedisServer:
    """Start redis-server (``make system-deps`` installs it) and wait until it answers PING;
    on another port if another process took the free one first."""
    for _ in range(3):
        try:
            return _start_redis(workdir, timeout)
        except PortTaken:
            continue
    raise RuntimeError("redis-server found no free port in 3 tries")


def _start_redis(workdir: Path, timeout: float) -> RedisServer:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server is not installed: run `make system-deps`")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"redis-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
            ],  # fmt: skip
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(port, proc, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            text = log.read_text()
            if "Address already in use" in text:
                raise PortTaken(server.url())
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{text}")
        try:
            if listens_on(proc.pid, port):  # not another process's server on that port
                with server.client() as client:
                    client.ping()
                return server
        except redis.ConnectionError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server did not answer in {timeout}s") from None
        time.sleep(0.05)
