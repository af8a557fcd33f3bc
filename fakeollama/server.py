""":class:`FakeOllama`: one simulated Ollama on a real socket, served from a thread.

One :class:`FakeOllama` owns a :class:`~.state.SimState` (settings, installed
models, loaded models, records). While it runs, an asyncio loop in a daemon
thread serves HTTP (aiohttp) and is the only thread that touches that state;
the public methods called from other threads hand their work to that loop
(``call_soon_threadsafe``) and wait for it. When the server is stopped they run
directly: nothing else is running then.

Where the rest lives: :mod:`.runner` (models in VRAM) and :mod:`.scheduler`
(who runs next), :mod:`.exchange` (the preamble every request goes through),
one module per API dialect (:mod:`.native`, :mod:`.openai_compat`,
:mod:`.anthropic_compat`), :mod:`.control` (/_fake/), :mod:`.config` (settings).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from . import anthropic_compat, control, native, openai_compat
from .catalog import DEFAULT_MODELS, normalize_model
from .config import SETTINGS_DEFAULTS, validate_setting
from .exchange import CRASH_ERROR, MODEL_PATHS, SCHEDULED_PATHS, handler, middleware
from .state import SimState, wait_for
from .wire import host_allowed

T = TypeVar("T")

__all__ = [
    "CRASH_ERROR",
    "DEFAULT_MODELS",
    "MODEL_PATHS",
    "SCHEDULED_PATHS",
    "SETTINGS_DEFAULTS",
    "FakeOllama",
    "host_allowed",
    "normalize_model",
    "validate_setting",
]


class FakeOllama:
    """A fake Ollama server on a real socket.

    ``start()`` runs it in a daemon thread; ``stop()`` closes the listening
    socket and aborts every open connection; ``start()`` again listens on the
    same port; ``kill()`` is ``stop()`` that also loses the loaded models, as a
    killed process does. Every public method is thread-safe. Records, loaded models,
    the catalog and blobs survive ``stop()``/``start()``; requests that were
    in flight are dropped (not counted as client disconnects).

    Settings (constructor keywords, changeable with ``configure()``; see
    :mod:`.config` for each one's meaning and default): ``token_interval``,
    ``tokens``, ``load_time``, ``vram``, ``vram_bytes``, ``keep_alive``,
    ``max_queue``, ``on_overflow``, ``num_parallel``, ``models`` (names, or
    name=size), ``version``, ``record_requests``, and the failure settings
    ``stall``, ``die_after`` and ``fail_status``. The failure settings apply to
    the model endpoints (inference, embed, pull/push/create/copy/delete,
    blobs); the light ones (/, version, tags, ps, show, /v1/models) fail only
    when a request asks with a header, so health checks keep working.

    Per-request headers: ``X-Fake-Tokens: n``, ``X-Fake-Token-Interval: s``,
    ``X-Fake-Load-Time: s``, ``X-Fake-Stall: s`` (wait before any header),
    ``X-Fake-Status: code`` (answer ``{"error": "fake failure"}``, OpenAI's
    shape under /v1), ``X-Fake-Die-After: n`` (send n lines of a stream, then
    drop the connection without ending the body; a response that is not a
    stream is dropped before it is sent).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token_interval: float = 0.01,
        tokens: int = 8,
        load_time: float = 0.0,
        vram: int | None = None,
        on_overflow: str = "queue",
        num_parallel: int | None = None,
        models: Iterable[str] | Mapping[str, int | str | None] | str | None = None,
        version: str = "0.12.6",
        *,
        vram_bytes: int | str | None = None,
        keep_alive: float | str = 300.0,
        max_queue: int | None = None,
        record_requests: bool = True,
        stall: float = 0.0,
        die_after: int | None = None,
        fail_status: int | None = None,
    ) -> None:
        given = {
            "token_interval": token_interval,
            "tokens": tokens,
            "load_time": load_time,
            "vram": vram,
            "vram_bytes": vram_bytes,
            "keep_alive": keep_alive,
            "max_queue": max_queue,
            "on_overflow": on_overflow,
            "num_parallel": num_parallel,
            "models": models,
            "version": version,
            "record_requests": record_requests,
            "stall": stall,
            "die_after": die_after,
            "fail_status": fail_status,
        }
        cfg = {k: validate_setting(k, v) for k, v in given.items()}
        self._sim = SimState(cfg)
        self._host = str(host)
        self._port = int(port)
        self._life = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None

    # ------------------------------------------------------------------ public API

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def settings(self) -> dict[str, Any]:
        """A copy of the current settings (constructor keywords)."""
        return self._call(self._settings_view)

    def start(self) -> FakeOllama:
        """Listen (again, on the same port once one was chosen) and return once listening."""
        with self._life:
            if self._thread is not None:
                raise RuntimeError("FakeOllama is already running")
            ready = threading.Event()
            box: dict[str, BaseException] = {}
            thread = threading.Thread(
                target=self._serve, args=(ready, box), name="fakeollama", daemon=True
            )
            thread.start()
            ready.wait()
            if "error" in box:
                thread.join()
                raise box["error"]
            self._thread = thread
        return self

    def start_if_stopped(self) -> FakeOllama:
        """``start()`` unless already running (a test may have stopped a shared fake)."""
        with self._life:
            running = self._thread is not None
        return self if running else self.start()

    def stop(self) -> None:
        """Stop listening and abort every open connection, then return."""
        with self._life:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=30)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=30)
                self._thread = None
                self._loop = None
                self._loop_tid = None

    close = stop

    def kill(self) -> None:
        """Die as a killed Ollama does: the listening socket closes, every open connection is
        reset mid-stream, and the loaded models are gone. ``start()`` listens again on the
        same port with nothing loaded; installed models, blobs, records and counters stay."""
        self.stop()
        self._call(self._sim.runner.forget)

    def __enter__(self) -> FakeOllama:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, **settings: Any) -> None:
        """Change settings at runtime: any constructor keyword (host/port only while stopped)."""
        values: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("host", "port"):
                continue
            values[key] = validate_setting(key, value)
        with self._life:
            if ("host" in settings or "port" in settings) and self._thread is not None:
                raise ValueError("host and port can only be changed while the server is stopped")
            if "host" in settings:
                self._host = str(settings["host"])
            if "port" in settings:
                self._port = int(settings["port"])
        self._call(functools.partial(self._apply, values))

    def reset(self) -> None:
        """Clear every record and counter and unload all models (catalog and blobs stay)."""
        self._call(self._sim.reset)

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of what the fake saw and did.

        ``requests``: one dict per request (method, path, query, headers with
        lowercase names, model as name:tag or None, body_bytes, json, time
        (monotonic, at arrival), status (None if nothing was sent)).
        ``in_flight`` {model: n} now and ``max_in_flight`` {model: max} count
        inference and embed requests from arrival (queued time included) to the
        end of their response; ``max_models_in_flight`` is the most distinct
        models in flight at one moment. ``model_requests`` {model: n} counts them
        all. ``loads`` {model: n}, ``total_loads``, ``evictions`` {model: n}
        (unloaded to make room), ``unloads`` {model: n} (keep_alive 0 or expired,
        or deleted), ``crashes``, ``busy_refusals`` (503s past ``max_queue``),
        ``vram_used`` (bytes), ``disconnects`` and ``disconnect_times`` (clients that
        closed before their response was complete), ``completed`` (inference
        and embed responses sent whole), ``aborted`` (connections dropped on
        purpose by die-after), ``loaded``, ``loading``, ``queued`` (requests
        waiting in the scheduler), ``blobs`` {digest: size}.
        """
        return self._call(self._sim.snapshot)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], Any], timeout: float = 5.0, interval: float = 0.01
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``pred(stats)`` is true and return those stats.

        A predicate that raises LookupError (a key not there yet) counts as false.
        Raises AssertionError, with the last stats, when ``timeout`` passes.
        """
        return wait_for(self.stats, pred, timeout, interval)

    # ------------------------------------------------------------------ threading

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server loop (or directly when stopped) and return its result."""
        if threading.get_ident() == self._loop_tid:
            return fn()
        with self._life:
            loop = self._loop if self._thread is not None else None
            if loop is None:
                return fn()
            done: concurrent.futures.Future[T] = concurrent.futures.Future()

            def run() -> None:
                try:
                    done.set_result(fn())
                except BaseException as exc:  # handed to the calling thread
                    done.set_exception(exc)

            loop.call_soon_threadsafe(run)
            return done.result(timeout=30)

    def _serve(self, ready: threading.Event, box: dict[str, BaseException]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:
            box["error"] = exc
            _close_loop(loop)
            ready.set()
            return
        self._loop = loop
        self._loop_tid = threading.get_ident()
        ready.set()
        try:
            loop.run_forever()
        finally:
            _close_loop(loop)

    async def _astart(self) -> None:
        app = self._make_app()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handle_signals=False)
        await runner.setup()
        try:
            # The gate's tests restart a killed fake on its port at once: SO_REUSEADDR.
            listener = socket.create_server((self._host, self._port), backlog=1024)
        except BaseException:
            await runner.cleanup()
            raise
        try:
            await web.SockSite(runner, listener).start()
        except BaseException:
            listener.close()
            await runner.cleanup()
            raise
        self._port = int(listener.getsockname()[1])
        self._listener = listener
        self._runner = runner
        self._sim.runner.resume()

    async def _astop(self) -> None:
        runner = self._runner
        sim = self._sim
        sim.stopping = True
        try:
            sim.sched.drop_all()
            if runner is not None:
                listener = self._listener
                if listener is not None:
                    # Accept nothing more, but let what was just accepted become connections
                    # while the server is still open: asyncio (before 3.12) drops a socket
                    # accepted in the instant its server closes, unclosed.
                    asyncio.get_running_loop().remove_reader(listener.fileno())
                    await _settle_accepts()
                for site in list(runner.sites):
                    await site.stop()
                server = runner.server
                if server is not None:
                    for conn in server.connections:
                        transport = conn.transport
                        if transport is not None:
                            transport.abort()
                await runner.cleanup()
        finally:
            sim.sched.clear_live()
            self._runner = None
            self._listener = None
            sim.stopping = False

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[middleware(self._sim)], client_max_size=1 << 30)
        router = app.router
        for method, path, fn in native.ROUTES + openai_compat.ROUTES + anthropic_compat.ROUTES:
            if method == "GET":
                router.add_get(path, handler(fn))  # HEAD too, as Ollama's router does
            else:
                router.add_route(method, path, handler(fn))
        for method, path, raw in control.routes(self._sim, self._apply):
            router.add_route(method, path, raw)
        return app

    # ------------------------------------------------------------------ state

    def _settings_view(self) -> dict[str, Any]:
        return self._sim.settings_view(self._host, self._port)

    def _apply(self, values: dict[str, Any]) -> dict[str, Any]:
        self._sim.apply(values, running=self._thread is not None)
        return self._settings_view()


async def _settle_accepts() -> None:
    """Wait until every socket already accepted has become a connection of the server.

    asyncio accepts a whole backlog at once and hands each socket to a task of its own; a
    task that runs after the server closed fails and leaves its socket to the garbage
    collector (a ResourceWarning in whichever test runs next). Once these tasks are done,
    every such connection is among the server's and gets aborted with the rest."""
    for _ in range(100):
        pending = [
            t
            for t in asyncio.all_tasks()
            if not t.done() and "_accept_connection" in getattr(t.get_coro(), "__qualname__", "")
        ]
        if not pending:
            return
        await asyncio.wait(pending, timeout=0.05)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        # Closed transports close their sockets in callbacks of their own: run those.
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
