"""The streaming relay to Ollama: routes, upstream pool, light lane and error mapping."""

from __future__ import annotations

from flask import Flask

from settings import Settings

from .lane import LightLane
from .upstream import Upstream
from .views import bp


def init_app(app: Flask, settings: Settings) -> Upstream:
    """Register the forwarding routes; return the upstream pool they forward to."""
    app.register_blueprint(bp)
    # One upstream connection at most per client connection: the pool is as large as
    # the connections a worker holds.
    only = settings.backends()[0]
    return Upstream(
        only.url,
        timeout=settings.upstream_timeout,
        concurrency=settings.worker_connections,
        name=only.name,
    )


__all__ = ["LightLane", "Upstream", "bp", "init_app"]
