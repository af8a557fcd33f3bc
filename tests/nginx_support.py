"""A real nginx for tests, running the shipped site file deploy/nginx.conf.

The fixture writes a small main nginx.conf into a temporary directory whose
http{} block includes a copy of deploy/nginx.conf with only its addresses
substituted (listen port, the gate's address in the upstream block), so the
tested configuration is the one that ships. A test (or a benchmark) may change
more lines with ``edits``, each of which must match exactly once, e.g. a smaller
connection cap, or the flood shield taken out. nginx runs in the foreground as a
child process (``daemon off``) and is stopped with SIGTERM (fast shutdown) at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT, PortTaken, free_port, listens_on

SITE_CONF = ROOT / "deploy" / "nginx.conf"

# What the test copy changes in the shipped site file: each must match exactly once,
# so that an edit of deploy/nginx.conf that moves them fails loudly here.
SUBSTITUTIONS = (
    (r"^(\s*)listen 80;$", r"\1listen 127.0.0.1:{port};"),
    (r"^\s*listen \[::\]:80;\n", ""),
    (r"^(\s*)server 127\.0\.0\.1:8000;$", r"\1server {upstream};"),
)


@dataclass
class Nginx:
    """One nginx master (and its worker) listening on 127.0.0.1."""

    port: int
    proc: subprocess.Popen[bytes]
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        parts = []
        for name in ("error.log", "access.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: nothing left to drain
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


Edits = tuple[tuple[str, str], ...]

# Takes the flood shield out of the site file (for the benchmark that compares).
NO_SHIELD: Edits = (
    (r"^\s*limit_req zone=.*\n", ""),
    (r"^\s*limit_conn ollama_gate_conn .*\n", ""),
)


def site_conf(port: int, upstream: str, edits: Edits = ()) -> str:
    """deploy/nginx.conf listening on 127.0.0.1:``port`` in front of ``upstream`` (host:port),
    with ``edits`` (regex, replacement) applied, each matching exactly once."""
    text = SITE_CONF.read_text()
    for pattern, replacement in SUBSTITUTIONS + edits:
        replacement = replacement.format(port=port, upstream=upstream)
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise AssertionError(f"deploy/nginx.conf: {pattern!r} matched {count} times, not once")
    return text


def main_conf(prefix: Path, site: Path) -> str:
    # Debian's binary has absolute temp paths compiled in (/var/lib/nginx); keep them here.
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would run its workers as nobody, who cannot enter pytest's tmp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"    include {site};\n"
        "}\n"
    )


def start_nginx(upstream: str, workdir: Path, timeout: float = 10, edits: Edits = ()) -> Nginx:
    """Start nginx with the shipped site file in front of ``upstream`` and wait until it listens;
    on another port if another process took the free one first."""
    for _ in range(3):
        try:
            return _start_nginx(upstream, workdir, timeout, edits)
        except PortTaken:
            continue
    raise RuntimeError("nginx found no free port in 3 tries")


def _start_nginx(upstream: str, workdir: Path, timeout: float, edits: Edits) -> Nginx:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed: run `make system-deps`")
    port = free_port()
    prefix = workdir / f"nginx-{port}"
    prefix.mkdir(parents=True)
    site = prefix / "ollama-gate.conf"
    site.write_text(site_conf(port, upstream, edits))
    conf = prefix / "nginx.conf"
    conf.write_text(main_conf(prefix, site))
    directives = f"daemon off; pid {prefix / 'nginx.pid'}; error_log {prefix / 'error.log'} info;"
    out = (prefix / "stderr.log").open("wb")
    with out:
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-g", directives],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Nginx(port, proc, prefix)
    deadline = time.monotonic() + timeout
    while True:
        stderr = (prefix / "stderr.log").read_text(errors="replace")
        if "Address already in use" in stderr + server.logs():
            server.stop()
            raise PortTaken(server.url)
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{stderr}\n{server.logs()}")
        # Listening, and not some other process that holds the port.
        if listens_on(proc.pid, port):
            return server
        if time.monotonic() > deadline:
            server.stop()
            logs = server.logs()
            raise RuntimeError(f"nginx did not listen in {timeout}s:\n{logs}") from None
        time.sleep(0.05)
