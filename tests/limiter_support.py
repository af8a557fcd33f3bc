"""Helpers for the limiter's end-to-end tests: a second client address, header parsing, gates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from tests.support import Gate

GatesFactory = Callable[..., Gate]


class SourceAddress(HTTPAdapter):
    """Connect from a given local address: 127.0.0.2 is a second client on loopback."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    """A requests session whose connections come from ``address`` (close it, or use ``with``)."""
    session = requests.Session()
    session.mount("http://", SourceAddress(address))
    return session


def rate_limit_items(value: str) -> dict[str, dict[str, str]]:
    """Parse an IETF RateLimit value, '"name";r=1;t=2, ...', into {"name": {"r": "1", "t": "2"}}."""
    items = {}
    for member in value.split(", "):
        name, *params = member.split(";")
        items[name.strip('"')] = dict(p.split("=", 1) for p in params)
    return items


def quick_gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    """gate_factory, stopping its gates at once as soon as the test ends."""
    started: list[Gate] = []

    def start(upstream: str, env: Mapping[str, str] | None = None) -> Gate:
        gate = gate_factory(upstream, env)
        started.append(gate)
        return gate

    yield start
    for gate in started:
        gate.stop()
