"""Ollama Gate: the application factory (``gunicorn 'app:create_app()'``).

Nothing is built at import: gunicorn calls ``create_app()`` in each worker, after
gevent has patched the standard library; tests call it with their own Settings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import error_handlers
import fleet.runtime
import limiter
import proxy
import status
import workqueue
from pipeline import EXTENSION, Pipeline
from settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

Middleware = Callable[["WSGIApplication"], "WSGIApplication"]


def create_app(settings: Settings | None = None) -> Flask:
    """Create and configure an instance of the gate."""
    if settings is None:
        settings = Settings.from_env(os.environ)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    error_handlers.init_app(app)
    upstream = proxy.init_app(app, settings)
    rate_limiter = limiter.init_app(app, settings)
    admitter = workqueue.init_app(app, settings, caps_of=rate_limiter.caps_of)
    backends = fleet.runtime.init_app(app, settings, caps_of=rate_limiter.caps_of)
    if backends is not None:
        # Several backends: each job runs on the backend the placement chose.
        upstream, admitter = backends.upstream, backends.admitter  # type: ignore[assignment]
    gate = Pipeline(
        settings,
        upstream,
        admit=admitter,
        identify=rate_limiter.identify_lane,
        keys=rate_limiter.keyring,
        shutdown=[admitter.close],
        queue=admitter.queue,
        limiter=rate_limiter,
    )
    app.extensions[EXTENSION] = gate
    gate.status = status.init_app(app, settings)

    # The WSGI middleware, in the order a request meets them.
    middleware: list[Middleware] = []
    if settings.trusted_proxies:
        # REMOTE_ADDR becomes the address that many proxies back in X-Forwarded-For, for
        # everything after it; with 0 trusted proxies a client's X-Forwarded-For changes nothing.
        middleware.append(functools.partial(ProxyFix, x_for=settings.trusted_proxies))
    if rate_limiter.rejects_early:
        # A client already over a limit gets its 429 here, without Flask.
        middleware.append(rate_limiter.reject_cache)
    # Requests no limit applies to are forwarded without Flask (queued ones through the
    # same admission).
    middleware.append(
        functools.partial(
            proxy.LightLane,
            app,
            upstream=upstream,
            identify=rate_limiter.identify_lane,
            admit=admitter,
        )
    )
    gate.middleware = wrap(app, middleware)
    return app


def wrap(app: Flask, middleware: list[Middleware]) -> tuple[WSGIApplication, ...]:
    """Put ``middleware`` around Flask, the first outermost; return them in that order."""
    stack: list[WSGIApplication] = []
    wsgi_app: WSGIApplication = app.wsgi_app
    for make in reversed(middleware):
        wsgi_app = make(wsgi_app)
        stack.insert(0, wsgi_app)
    app.wsgi_app = wsgi_app  # type: ignore[method-assign, assignment]
    return tuple(stack)
