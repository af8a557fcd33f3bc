"""The streaming relay to Ollama: routes, upstream pool and error mapping."""

from __future__ import annotations

from flask import Flask

from settings import Settings

from . import lane
from .upstream import Upstream
from .views import bp


def init_app(app: Flask, settings: Settings) -> None:
    """Open the upstream pool, register the forwarding routes and put the light lane
    around Flask (call it before other middleware is installed: the lane must sit inside
    ProxyFix and the limiter's reject cache)."""
    app.extensions["gate.upstream"] = Upstream(settings.upstream, timeout=settings.upstream_timeout)
    app.register_blueprint(bp)
    lane.init_app(app)


__all__ = ["bp", "init_app"]
