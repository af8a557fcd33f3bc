"""The control endpoints, for a simulator in another process: ``GET /_fake/stats``
(``?requests=0`` leaves out the request records), ``POST /_fake/configure`` (a JSON
object of settings; answers the settings now in force) and ``POST /_fake/reset``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .config import validate_setting
from .state import SimState
from .wire import dumps

RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(
    sim: SimState, configure: Callable[[dict[str, Any]], dict[str, Any]]
) -> tuple[tuple[str, str, RawHandler], ...]:
    """The /_fake/ routes; ``configure`` applies validated settings and returns the settings."""

    async def stats(request: web.Request) -> web.StreamResponse:
        with_requests = request.query.get("requests", "1") not in ("0", "false", "no")
        return web.Response(
            body=dumps(sim.snapshot(with_requests)), content_type="application/json"
        )

    async def configure_(request: web.Request) -> web.StreamResponse:
        try:
            values = await request.json()
            if not isinstance(values, dict):
                raise ValueError("body must be a JSON object of settings")
            if "host" in values or "port" in values:
                raise ValueError("host and port cannot be changed while running")
            checked = {k: validate_setting(k, v) for k, v in values.items()}
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.Response(body=dumps(configure(checked)), content_type="application/json")

    async def reset(request: web.Request) -> web.StreamResponse:
        sim.reset()
        return web.Response(body=b"{}", content_type="application/json")

    return (
        ("GET", "/_fake/stats", stats),
        ("POST", "/_fake/configure", configure_),
        ("POST", "/_fake/reset", reset),
    )
