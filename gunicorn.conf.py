"""gunicorn settings for Ollama Gate (``gunicorn -c gunicorn.conf.py app:app``).

No application imports here: with preload_app off, each worker imports the app
only after gevent has patched the standard library, so urllib3, ssl and the
rest see cooperative sockets (a module imported here, before the patch, would
keep blocking ones and gunicorn warns about MonkeyPatchWarning).
"""

import os

from gunicorn.glogging import Logger

# GATE_BIND: listen address. GATE_WORKERS: worker processes.
bind = os.environ.get("GATE_BIND", "127.0.0.1:8000")

# One worker by default: the gate's work is waiting on sockets, and one gevent worker
# holds thousands of connections. Limits in memory:// and the work queue's slots live
# in the worker process, so several workers would each admit the configured
# concurrency; the app refuses GATE_WORKERS > 1 unless GATE_STORAGE_URI is redis://.
workers = int(os.environ.get("GATE_WORKERS", "1"))
worker_class = "gevent"
# Open connections one worker holds: streams being relayed plus jobs waiting in the queue.
worker_connections = int(os.environ.get("GATE_WORKER_CONNECTIONS", "10000"))
preload_app = False

# The gevent worker's heartbeat does not depend on requests finishing, so a long
# generation never trips this; it only catches a worker that stopped scheduling.
timeout = 60
# On SIGTERM, running streams get this long to finish before the worker exits
# (post_worker_init below: new and waiting jobs get 503 meanwhile).
graceful_timeout = int(os.environ.get("GATE_GRACEFUL_TIMEOUT", "120"))
# Idle keep-alive connections from clients or nginx stay open this long.
keepalive = 75

# gunicorn 23+'s control socket sits at one fixed path per user; several gates (or
# test runs) on one host would fight over it, and the gate needs none of it.
control_socket_disable = True

errorlog = "-"
loglevel = os.environ.get("GATE_LOG_LEVEL", "info")
# GATE_ACCESS_LOG=1 logs one line per request (off by default: it costs throughput).
_access_on = os.environ.get("GATE_ACCESS_LOG", "") not in ("", "0")
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


def on_starting(server):  # noqa: ARG001 - gunicorn's hook signature
    """Validate the environment once, in the master, before any worker boots.

    A bad setting then stops start-up with one message naming the variable,
    instead of a loop of workers failing to boot. settings.py imports nothing
    that gevent patches, so importing it here is safe.
    """
    from settings import Settings, SettingsError

    try:
        Settings.from_env(os.environ)
    except SettingsError as exc:
        raise SystemExit(f"ollama-gate: invalid setting: {exc}") from None


def post_worker_init(worker):
    """Make SIGTERM graceful for the gate: 503 for new jobs, streams finish (graceful.py).

    Imported here, in the worker, after gevent has patched the standard library.
    """
    import graceful

    graceful.install(worker)
