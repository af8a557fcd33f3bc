"""The streaming relay to Ollama: routes, upstream pool and error mapping."""

from __future__ import annotations

from flask import Flask

from settings import Settings

from .upstream import Upstream
from .views import bp


def init_app(app: Flask, settings: Settings) -> None:
    """Open the upstream pool and register the forwarding routes."""
    app.extensions["gate.upstream"] = Upstream(settings.upstream, timeout=settings.upstream_timeout)
    app.register_blueprint(bp)


__all__ = ["bp", "init_app"]
