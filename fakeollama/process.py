""":class:`FakeOllamaProcess`: a simulated Ollama in a subprocess of its own, for fleets.

The same settings as :class:`~.server.FakeOllama`, passed as ``python -m
fakeollama`` options; ``stats()``, ``configure()``, ``reset()`` and
``wait_for()`` go over the ``/_fake/`` endpoints. ``kill()`` is SIGKILL (the
kernel closes the listening socket and every open connection; the loaded models
die with the process); ``start()`` again runs a fresh process on the same port.
Only the standard library is used here, so a benchmark can drive many of them
without their HTTP serving competing for its own interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import BY_NAME, validate_setting
from .state import wait_for

_ROOT = Path(__file__).resolve().parents[1]
_READY = "fakeollama listening on "


def _option_value(name: str, value: Any) -> str:
    """A validated setting as its command-line text."""
    if name == "models":
        return ",".join(n if size is None else f"{n}={size}" for n, size in value)
    return str(value)


class FakeOllamaProcess:
    """``python -m fakeollama`` in a subprocess, started and controlled from this one."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self._args: list[str] = []
        for name, value in settings.items():
            if name not in BY_NAME:
                raise TypeError(f"unknown setting {name!r}")
            checked = validate_setting(name, value)
            if checked is None or checked == BY_NAME[name].default:
                continue
            setting = BY_NAME[name]
            if setting.metavar is None:  # --no-record
                if not checked:
                    self._args.append(setting.option)
                continue
            self._args += [setting.option, _option_value(name, checked)]
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 30.0) -> FakeOllamaProcess:
        """Start the process (on the same port as before, once one was chosen) and return
        once it listens."""
        if self.running:
            raise RuntimeError("FakeOllamaProcess is already running")
        cmd = [sys.executable, "-m", "fakeollama", "--host", self.host, "--port", str(self.port)]
        with tempfile.TemporaryFile("w+") as errors:  # a file: a pipe nobody reads could fill
            proc = subprocess.Popen(
                [*cmd, *self._args],
                cwd=_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the process prints this line once it listens
            if not line.startswith(_READY):
                proc.kill()
                proc.communicate(timeout=timeout)
                errors.seek(0)
                raise RuntimeError(f"fakeollama did not start: {(line + errors.read()).strip()}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        self._proc = proc
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: stop listening, abort open connections, exit."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: die at once, as a crashed or OOM-killed Ollama does."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.communicate(timeout=timeout)

    def __enter__(self) -> FakeOllamaProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- control over /_fake/

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self, requests: bool = True) -> dict[str, Any]:
        """The process's ``FakeOllama.stats()``; ``requests=False`` leaves out the records."""
        result: dict[str, Any] = self._control("GET", f"/_fake/stats?requests={int(requests)}")
        return result

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings (not host or port); returns the settings now in force."""
        result: dict[str, Any] = self._control("POST", "/_fake/configure", _jsonable(settings))
        return result

    def reset(self) -> None:
        self._control("POST", "/_fake/reset", {})

    def wait_for(
        self, pred: Callable[[dict[str, Any]], Any], timeout: float = 5.0, interval: float = 0.02
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``pred(stats)`` is true (see ``FakeOllama.wait_for``)."""
        return wait_for(self.stats, pred, timeout, interval)


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    if isinstance(out.get("models"), tuple):
        out["models"] = list(out["models"])
    return out
