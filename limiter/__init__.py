"""Who may come in, and how often: per-class rate limits, API keys and token budgets.

Built on Flask-Limiter and the limits library; see docs/LIMITS.md. The package
root imports nothing heavy on purpose: settings.py, and so gunicorn's master,
imports ``limiter.policy`` and ``limiter.keys`` to check the configuration, and
must not pull in Flask, limits or redis before gevent patches the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from settings import Settings

    from .extension import GateLimiter


def init_app(app: Flask, settings: Settings) -> GateLimiter:
    """Install client identity, API keys, per-class limits and token budgets on ``app``."""
    from .extension import GateLimiter

    limiter = GateLimiter(settings)
    limiter.init_app(app)
    return limiter


__all__ = ["init_app"]
