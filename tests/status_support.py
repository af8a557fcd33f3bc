"""Helpers of the status tests: polling until something holds, and slow load in threads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from tests.support import Gate

# Slow answers: 10 tokens 0.15 s apart, so each job holds its slot for about 1.5 s.
SLOW = {"X-Fake-Tokens": "10", "X-Fake-Token-Interval": "0.15"}


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {pred}")
        time.sleep(interval)


class Load:
    """Slow generate requests in threads, each from its own connection."""

    def __init__(self, gate: Gate, count: int, model: str = "m1", headers: Any = None) -> None:
        self.results: list[int | str] = []
        self.threads = [
            threading.Thread(target=self._one, args=(gate, model, headers or SLOW), daemon=True)
            for _ in range(count)
        ]

    def _one(self, gate: Gate, model: str, headers: dict[str, str]) -> None:
        try:
            resp = requests.post(
                gate.url + "/api/generate",
                json={"model": model, "prompt": "hi", "stream": True},
                headers=headers,
                timeout=60,
            )
            self.results.append(resp.status_code)
        except requests.RequestException as exc:
            self.results.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        for t in self.threads:
            t.join(60)


@dataclass
class Answer:
    """What a response said, without its connection (a kept Response holds the socket
    open, and gunicorn then waits its whole graceful timeout for it at teardown)."""

    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def fetch(url: str, method: str = "GET", **kwargs: Any) -> Answer:
    kwargs.setdefault("timeout", 10)
    with requests.request(method, url, **kwargs) as resp:
        return Answer(resp.status_code, dict(resp.headers), resp.text)
