"""What an operator sees: the live status page, status.json, a health check and Prometheus metrics.

See DESIGN.md, "Gate endpoints", and docs/STATUS.md for the JSON schema.
"""

from __future__ import annotations

from flask import Flask

from settings import Settings

from . import extension
from .extension import Status
from .views import bp


def init_app(app: Flask, settings: Settings) -> Status:
    """Install the status extension and register the gate's own endpoints."""
    ext = extension.init_app(app, settings)
    app.register_blueprint(bp)
    return ext


__all__ = ["Status", "bp", "init_app"]
