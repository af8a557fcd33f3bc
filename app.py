"""Ollama Gate: the application factory (``gunicorn 'app:create_app()'``).

Nothing is built at import: gunicorn calls ``create_app()`` in each worker, after
gevent has patched the standard library; tests call it with their own Settings.
"""

from __future__ import annotations

import os

from flask import Flask

import errors
import limiter
import proxy
import status
import workqueue
from settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Create and configure an instance of the gate."""
    if settings is None:
        settings = Settings.from_env(os.environ)
    app = Flask(__name__)
    app.config["GATE_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.extensions["gate.settings"] = settings
    errors.init_app(app)
    proxy.init_app(app, settings)  # first: its light lane wraps Flask itself
    limiter.init_app(app, settings)
    workqueue.init_app(app, settings)
    status.init_app(app, settings)
    return app
