"""gunicorn settings for Ollama Gate (``gunicorn -c gunicorn.conf.py 'app:create_app()'``).

No application imports here but settings.py (standard library only): with
preload_app off, each worker imports the app only after gevent has patched the
standard library, so urllib3, ssl and the rest see cooperative sockets (a module
imported here, before the patch, would keep blocking ones and gunicorn warns
about MonkeyPatchWarning).
"""

import os

from gunicorn.glogging import Logger

# The settings, read and checked once here in the master, before any worker boots: a bad
# value stops start-up with one message naming the variable. settings.py imports nothing
# gevent patches (tests/test_settings.py), so importing it here is safe.
from settings import Settings, SettingsError, unknown_variables

try:
    gate_settings = Settings.from_env(os.environ)
except SettingsError as exc:
    raise SystemExit(f"ollama-gate: invalid setting: {exc}") from None

bind = gate_settings.bind

# One worker by default: the gate's work is waiting on sockets, and one gevent worker
# holds thousands of connections. Limits in memory:// and the work queue's slots live
# in the worker process, so several workers would each admit the configured
# concurrency; settings.py refuses GATE_WORKERS > 1 unless GATE_STORAGE_URI is redis://.
workers = gate_settings.workers
worker_class = "gevent"
# Open connections one worker holds: streams being relayed plus jobs waiting in the queue.
worker_connections = gate_settings.worker_connections
preload_app = False

# The gevent worker's heartbeat does not depend on requests finishing, so a long
# generation never trips this; it only catches a worker that stopped scheduling.
timeout = 60
# On SIGTERM, running streams get this long to finish before the worker exits
# (post_worker_init below: new and waiting jobs get 503 meanwhile).
graceful_timeout = gate_settings.graceful_timeout
# Idle keep-alive connections from clients or nginx stay open this long.
keepalive = 75

# gunicorn 23+'s control socket sits at one fixed path per user; several gates (or
# test runs) on one host would fight over it, and the gate needs none of it.
control_socket_disable = True

# gunicorn believes no forwarding header from any peer: the only one the gate reads is
# X-Forwarded-For, through GATE_TRUSTED_PROXIES (werkzeug's ProxyFix, app.py), and the
# gate builds no absolute URL, so the scheme a proxy names changes nothing. gunicorn's
# default trusts loopback peers' scheme headers instead, so that contradictory ones a
# client sends through nginx (X-Forwarded-Proto: http beside X-Forwarded-Ssl: on) got
# gunicorn's own HTML 400; "*" with nothing to trust also spares gunicorn parsing the
# peer's address against a list on every request.
forwarded_allow_ips = "*"
secure_scheme_headers: dict[str, str] = {}
forwarder_headers = ""

errorlog = "-"
loglevel = gate_settings.log_level
# gunicorn's own access log stays off: the app writes GATE_ACCESS_LOG's lines when a
# call's answer ends (status/accesslog.py), with what gunicorn cannot see (model, wait).
_access_on = False
_access = "INFO" if _access_on else "WARNING"


class GateLogger(Logger):
    """gunicorn's logger, minus building access lines nobody logs.

    With logconfig_dict set, gunicorn formats every access line and only then lets
    the logger's level drop it: about a tenth of the CPU of a proxied request
    (docs/BENCHMARKS.md).
    """

    def access(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        if _access_on:
            super().access(resp, req, environ, request_time)


logger_class = GateLogger

# The app's own loggers (proxy, workqueue, limiter) go to the error log as well.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": loglevel.upper(), "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {
            "level": loglevel.upper(),
            "handlers": ["error_console"],
            "propagate": False,
            "qualname": "gunicorn.error",
        },
        "gunicorn.access": {
            "level": _access,
            "handlers": ["console"],
            "propagate": False,
            "qualname": "gunicorn.access",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stdout",
        },
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stderr",
        },
    },
    "formatters": {
        "generic": {
            "format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
            "datefmt": "[%Y-%m-%d %H:%M:%S %z]",
            "class": "logging.Formatter",
        },
    },
}


def on_starting(server):
    """Log what the gate runs with, once, in the master (the settings were checked above)."""
    for warning in unknown_variables(os.environ):
        server.log.warning("ollama-gate: %s", warning)
    server.log.info("ollama-gate: %s", gate_settings.describe())
    # SIGHUP: the workers re-read the keys file in place; none is restarted (limiter/reload.py).
    from limiter import reload

    reload.forward_to_workers(server)


# The worker's graceful drain (graceful.py), set by post_worker_init in each worker.
_drain = None

# importlib.metadata.entry_points while a worker boots (post_fork to post_worker_init).
_entry_points = None


def read_entry_points_once():
    """Serve importlib.metadata.entry_points from one reading until restore_entry_points().

    gevent's monkey.patch_all, which each worker runs as it boots, looks up its plugins'
    entry points some 25 times, and each lookup reads the metadata of every installed
    distribution: about 0.07 s of CPU per worker start. Nothing is installed while a
    worker boots, so one reading answers every lookup alike.
    """
    global _entry_points
    from importlib import metadata

    if _entry_points is not None:
        return
    _entry_points = metadata.entry_points
    every = _entry_points()

    def entry_points(**params):
        return every.select(**params) if params else every

    metadata.entry_points = entry_points


def restore_entry_points():
    global _entry_points
    from importlib import metadata

    if _entry_points is not None:
        metadata.entry_points = _entry_points
        _entry_points = None


def post_fork(server, worker):
    """In the worker, before gevent patches the standard library (read_entry_points_once)."""
    read_entry_points_once()


def post_worker_init(worker):
    """Make SIGTERM graceful for the gate: 503 for new jobs, streams finish (graceful.py);
    SIGHUP re-reads the keys file (limiter/reload.py).

    Imported here, in the worker, after gevent has patched the standard library.
    """
    global _drain
    restore_entry_points()
    import graceful
    from limiter import reload

    _drain = graceful.install(worker)
    reload.install(worker)


def pre_request(worker, req):
    """Count a running request: a drain closes idle connections once none runs."""
    if _drain is not None:
        _drain.request_started()


def post_request(worker, req, environ, resp):
    if _drain is not None:
        _drain.request_finished()
