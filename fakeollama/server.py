"""The fake Ollama server: an aiohttp application, a model scheduler and a thread runner.

One :class:`FakeOllama` owns the state (settings, model catalog, loaded models,
records). While it runs, an asyncio loop in a daemon thread serves HTTP and is
the only thread that touches that state; the public methods called from other
threads hand their work to that loop (``call_soon_threadsafe``) and wait for it.
When the server is stopped they run directly: nothing else is running then.

The scheduler imitates Ollama's ``server/sched.go``: a model must be loaded
before it serves (``load_time``), at most ``vram`` models are loaded at once,
and each loaded model serves at most ``num_parallel`` requests at once. With
``on_overflow="queue"`` requests are admitted strictly in arrival order (the
head of the queue blocks everyone behind it, as Ollama does, which is what makes
it thrash between models); with ``on_overflow="crash"`` a request that needs a
model while VRAM is full of busy models fails the way a killed runner does.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hashlib
import ipaddress
import json
import math
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

DEFAULT_MODELS: tuple[str, ...] = (
    "llama3.2:latest",
    "qwen2.5:0.5b",
    "nomic-embed-text:latest",
    "m1:latest",
    "m2:latest",
    "m3:latest",
    "m4:latest",
    "m5:latest",
    "m6:latest",
)

# Ollama's text when the runner process dies under a request (for example the
# OOM killer taking it because two models did not fit).
CRASH_ERROR = "llama runner process has terminated: exit status 2"
FAKE_FAILURE = "fake failure"

POLL = 0.02  # seconds between checks for a closed client connection
GONE = 499  # internal status of a response that was never sent (client gone, or died)
EMBED_DIM = 8
BLOB_CHUNK = 1 << 16
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

# Endpoints that load a model and go through the scheduler.
SCHEDULED_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/embeddings",
    }
)
# Endpoints that the global failure settings (stall, die_after, fail_status)
# apply to: the model endpoints. Light endpoints (/, version, tags, ps, show,
# /v1/models) only fail when a request asks for it with an X-Fake-* header, so
# a health check keeps working while every model request is made to fail.
MODEL_PATHS = SCHEDULED_PATHS | {
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
}

SETTINGS_DEFAULTS: dict[str, Any] = {
    "token_interval": 0.01,
    "tokens": 8,
    "load_time": 0.0,
    "vram": None,
    "on_overflow": "queue",
    "num_parallel": None,
    "models": None,
    "version": "0.12.6",
    "record_requests": True,
    "stall": 0.0,
    "die_after": None,
    "fail_status": None,
}

_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_TAG_RE = re.compile(r":[^/]+$")
_SIZE_TAG_RE = re.compile(r"^(\d+(?:\.\d+)?)([bm])$", re.IGNORECASE)


# --------------------------------------------------------------------------- helpers


def normalize_model(name: str) -> str:
    """``llama3.2`` -> ``llama3.2:latest``, the way Ollama resolves a model name."""
    name = name.strip()
    if not name or "@" in name:
        return name
    return name if _TAG_RE.search(name) else f"{name}:latest"


def _model_field(body: Any) -> str | None:
    """The raw model a JSON body names (``model``, or the legacy ``name``)."""
    if not isinstance(body, dict):
        return None
    value = body.get("model") or body.get("name")
    if isinstance(value, str) and value.strip():
        return value
    return None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _line(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(obj) + b"\n\n"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _words(value: Any) -> int:
    """Whitespace-separated words in a prompt, a message content or a list of parts."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), messages ({"content": ...})
        return _words(value.get("text")) + _words(value.get("content"))
    return 0


def _token(i: int) -> str:
    return f"tok{i} "


def _text(n: int) -> str:
    return "".join(_token(i) for i in range(1, n + 1))


def _vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic, unit-length embedding of ``text``."""
    raw = b""
    seed = text.encode()
    while len(raw) < dim:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    vals = [(b - 127.5) / 127.5 for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


def _is_zero_duration(value: Any) -> bool:
    """Whether an Ollama ``keep_alive`` means "unload now" (0, "0", "0s", "0m")."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*", value)
        return m is not None and float(m.group(1)) == 0
    return False


@functools.lru_cache(maxsize=512)
def host_allowed(host: str) -> bool:
    """Ollama's ``allowedHostsMiddleware``: only local names and addresses may be the Host."""
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        name = host.rsplit(":", 1)[0]
    else:
        name = host
    name = name.lower()
    if name in ("", "localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return name.endswith((".localhost", ".local", ".internal"))
    return addr.is_loopback or addr.is_private or addr.is_unspecified


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --------------------------------------------------------------------------- settings


def _num(key: str, value: Any, *, integer: bool, optional: bool, minimum: float) -> Any:
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ValueError(f"{key} must not be None")
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        num = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if integer and isinstance(value, float) and value != num:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if num < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value!r}")
    return num


def validate_setting(key: str, value: Any) -> Any:
    """Check one setting and return it in canonical form; ValueError if it is wrong."""
    if key in ("token_interval", "load_time"):
        return _num(key, value, integer=False, optional=False, minimum=0)
    if key == "stall":
        return _num(key, value, integer=False, optional=True, minimum=0) or 0.0
    if key == "tokens":
        return _num(key, value, integer=True, optional=False, minimum=0)
    if key in ("vram", "num_parallel"):
        return _num(key, value, integer=True, optional=True, minimum=1)
    if key == "die_after":
        return _num(key, value, integer=True, optional=True, minimum=0)
    if key == "fail_status":
        status = _num(key, value, integer=True, optional=True, minimum=0)
        if status == 0:
            return None
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"fail_status must be an HTTP status 200..599, got {value!r}")
        return status
    if key == "on_overflow":
        if value not in ("queue", "crash"):
            raise ValueError(f"on_overflow must be 'queue' or 'crash', got {value!r}")
        return value
    if key == "models":
        if value is None:
            return None
        if isinstance(value, str):
            value = value.split(",")
        names = tuple(normalize_model(str(v)) for v in value if str(v).strip())
        if not names:
            raise ValueError("models must name at least one model")
        return names
    if key == "version":
        if not isinstance(value, str) or not value:
            raise ValueError(f"version must be a non-empty string, got {value!r}")
        return value
    if key == "record_requests":
        if not isinstance(value, bool):
            raise ValueError(f"record_requests must be a bool, got {value!r}")
        return value
    raise TypeError(f"unknown setting {key!r}")


# --------------------------------------------------------------------------- catalog


class _Model:
    """One entry of the model catalog (what /api/tags lists)."""

    __slots__ = ("name", "digest", "size", "modified_at", "details", "embedding")

    def __init__(
        self,
        name: str,
        *,
        details: dict[str, Any] | None = None,
        embedding: bool | None = None,
        digest: str | None = None,
        size: int | None = None,
    ) -> None:
        guessed, guessed_embedding, guessed_size = _guess_details(name)
        self.name = name
        self.details = details if details is not None else guessed
        self.embedding = guessed_embedding if embedding is None else embedding
        self.digest = digest or hashlib.sha256(f"fakeollama:{name}".encode()).hexdigest()
        self.size = size if size is not None else guessed_size
        self.modified_at = _now_iso()

    def tag(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": dict(self.details),
        }

    def copy(self, name: str) -> _Model:
        return _Model(
            name,
            details=dict(self.details),
            embedding=self.embedding,
            digest=self.digest,
            size=self.size,
        )

    @property
    def family(self) -> str:
        return str(self.details.get("family") or "llama")


def _guess_details(name: str) -> tuple[dict[str, Any], bool, int]:
    base, _, tag = name.partition(":")
    base = base.rsplit("/", 1)[-1].lower()
    embedding = "embed" in base or base.startswith(("all-minilm", "bge-", "snowflake-arctic"))
    if embedding:
        family, params, quant = ("nomic-bert" if "nomic" in base else "bert"), "137M", "F16"
    elif base.startswith("qwen"):
        family, params, quant = "qwen2", "7.6B", "Q4_K_M"
    elif base.startswith("llama3.2"):
        family, params, quant = "llama", "3.2B", "Q4_K_M"
    else:
        family, params, quant = "llama", "1B", "Q4_K_M"
    m = _SIZE_TAG_RE.match(tag)
    if m:
        params = f"{m.group(1)}{m.group(2).upper()}"
    num = float(re.sub(r"[^0-9.]", "", params) or 1)
    count = num * (1e9 if params.endswith("B") else 1e6)
    size = int(count * (2.0 if quant == "F16" else 0.6)) + len(name)
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params,
        "quantization_level": quant,
    }
    return details, embedding, size


def _build_catalog(names: Iterable[str] | None) -> dict[str, _Model]:
    return {n: _Model(n) for n in (names if names is not None else DEFAULT_MODELS)}


# --------------------------------------------------------------------------- scheduler


class _Ticket:
    """One inference or embed request's claim on a model."""

    __slots__ = ("model", "load_time", "fut", "load_duration", "state", "gen")

    def __init__(self, model: str, load_time: float, fut: asyncio.Future[None], gen: int) -> None:
        self.model = model
        self.load_time = load_time
        self.fut = fut
        self.load_duration = 0.0
        self.state = "queued"  # queued -> admitted -> released | crashed | dropped
        self.gen = gen


class _Scheduler:
    """Loads, evicts and admits, like Ollama's scheduler. Runs on the server's loop only."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.gen = 0  # bumped by stop(): tickets of an older generation are ignored
        self.loaded: dict[str, float] = {}  # model -> last used; dict order is LRU order
        self.loading: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, int] = {}
        self.queue: deque[_Ticket] = deque()
        self.unload_when_idle: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.max_models_in_flight = 0
        self.loads: dict[str, int] = {}
        self.total_loads = 0
        self.crashes = 0

    # -- in-flight accounting (arrival to end of response, queued time included)

    def arrive(self, model: str) -> None:
        n = self.in_flight.get(model, 0) + 1
        self.in_flight[model] = n
        if n > self.max_in_flight.get(model, 0):
            self.max_in_flight[model] = n
        if len(self.in_flight) > self.max_models_in_flight:
            self.max_models_in_flight = len(self.in_flight)

    def depart(self, model: str, gen: int) -> None:
        if gen != self.gen:
            return
        n = self.in_flight.get(model, 0) - 1
        if n > 0:
            self.in_flight[model] = n
        else:
            self.in_flight.pop(model, None)

    # -- admission

    def enqueue(self, ticket: _Ticket) -> None:
        self.queue.append(ticket)
        self.schedule()

    def cancel(self, ticket: _Ticket) -> None:
        """A queued request went away (client disconnect)."""
        if ticket.state == "queued":
            ticket.state = "dropped"
            try:
                self.queue.remove(ticket)
            except ValueError:
                pass
            self.schedule()

    def release(self, ticket: _Ticket, *, unload: bool = False) -> None:
        if ticket.state != "admitted" or ticket.gen != self.gen:
            return
        ticket.state = "released"
        m = ticket.model
        n = self.running.get(m, 0) - 1
        if n > 0:
            self.running[m] = n
        else:
            self.running.pop(m, None)
        if m in self.loaded:
            self._touch(m)
        if unload:
            self.unload_when_idle.add(m)
        if m not in self.running and m in self.unload_when_idle:
            self.unload_when_idle.discard(m)
            self.loaded.pop(m, None)
        self.schedule()

    def unload(self, model: str) -> None:
        """``keep_alive: 0``: unload now, or as soon as the model's requests finish."""
        if self.running.get(model, 0):
            self.unload_when_idle.add(model)
        else:
            self.loaded.pop(model, None)
            self.schedule()

    def schedule(self) -> None:
        strict = self.cfg["on_overflow"] == "queue"
        num_parallel = self.cfg["num_parallel"]
        q = self.queue
        i = 0
        while i < len(q):
            t = q[i]
            m = t.model
            if m in self.loaded:
                if num_parallel is None or self.running.get(m, 0) < num_parallel:
                    del q[i]
                    self._admit(t)
                    continue
            elif m in self.loading:
                pass  # wait for the load to finish
            elif self._has_room() or self._evict_idle():
                self._start_load(t)
                if m in self.loaded:  # loaded at once (load_time 0): look at it again
                    continue
            elif not strict:
                del q[i]
                self._crash(t)
                continue
            if strict:
                break  # head-of-line: nobody passes the head
            i += 1

    def _has_room(self) -> bool:
        vram = self.cfg["vram"]
        return vram is None or len(self.loaded) + len(self.loading) < vram

    def _evict_idle(self) -> bool:
        for m in self.loaded:  # least recently used first
            if not self.running.get(m, 0):
                del self.loaded[m]
                self.unload_when_idle.discard(m)
                return True
        return False

    def trim(self) -> None:
        """After ``vram`` shrank: evict idle models until the rest fits."""
        vram = self.cfg["vram"]
        while vram is not None and len(self.loaded) + len(self.loading) > vram:
            if not self._evict_idle():
                break

    def _touch(self, m: str) -> None:
        self.loaded.pop(m, None)
        self.loaded[m] = time.monotonic()

    def _start_load(self, t: _Ticket) -> None:
        m = t.model
        self.loads[m] = self.loads.get(m, 0) + 1
        self.total_loads += 1
        t.load_duration = t.load_time
        if t.load_time <= 0:
            self._touch(m)
            return
        self.loading[m] = asyncio.get_running_loop().create_task(self._load(m, t.load_time))

    async def _load(self, m: str, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self.loading.pop(m, None)
        self._touch(m)
        self.schedule()

    def _admit(self, t: _Ticket) -> None:
        self.running[t.model] = self.running.get(t.model, 0) + 1
        self._touch(t.model)
        t.state = "admitted"
        if not t.fut.done():
            t.fut.set_result(None)

    def _crash(self, t: _Ticket) -> None:
        self.crashes += 1
        t.state = "crashed"
        if not t.fut.done():
            t.fut.set_result(None)

    # -- lifecycle

    def drop_all(self) -> None:
        """Server stopping: forget queued requests and cancel loads."""
        self.gen += 1
        for task in list(self.loading.values()):
            task.cancel()
        self.loading.clear()
        for t in self.queue:
            t.state = "dropped"
            if not t.fut.done():
                t.fut.cancel()
        self.queue.clear()

    def clear_live(self) -> None:
        self.running.clear()
        self.in_flight.clear()
        self.loading.clear()
        self.queue.clear()

    def reset(self) -> None:
        self.loads.clear()
        self.total_loads = 0
        self.crashes = 0
        self.max_in_flight = dict(self.in_flight)
        self.max_models_in_flight = len(self.in_flight)
        for m in list(self.loaded):
            self.unload(m)


# --------------------------------------------------------------------------- the server


class _BadHeader(ValueError):
    pass


class _ReqState:
    """What the fake keeps about one request while it is handled."""

    __slots__ = ("gen", "t0", "json", "json_error", "rec", "gone")

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.t0 = time.monotonic_ns()
        self.json: Any = None
        self.json_error: str | None = None
        self.rec: dict[str, Any] | None = None
        self.gone = False


_STATE = web.RequestKey("state", _ReqState)


def _state(request: web.BaseRequest) -> _ReqState:
    state = request.get(_STATE)
    if state is None:  # control endpoints skip the middleware's bookkeeping
        state = request[_STATE] = _ReqState(-1)
    return state


class FakeOllama:
    """A fake Ollama server on a real socket.

    ``start()`` runs it in a daemon thread; ``stop()`` closes the listening
    socket and aborts every open connection; ``start()`` again listens on the
    same port. Every public method is thread-safe. Records, loaded models,
    the catalog and blobs survive ``stop()``/``start()``; requests that were
    in flight are dropped (not counted as client disconnects).

    Settings (constructor keywords, changeable with ``configure()``):
    ``token_interval`` seconds between streamed tokens, ``tokens`` per answer,
    ``load_time`` seconds to load a model, ``vram`` models loaded at once
    (None: no limit), ``on_overflow`` "queue" or "crash", ``num_parallel``
    requests per loaded model (None: no limit), ``models`` the catalog,
    ``version``, ``record_requests``, and the failure settings ``stall``,
    ``die_after`` and ``fail_status``. The failure settings apply to the model
    endpoints (inference, embed, pull/push/create/copy/delete, blobs); the
    light ones (/, version, tags, ps, show, /v1/models) fail only when a
    request asks with a header, so health checks keep working.

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
        models: Iterable[str] | str | None = None,
        version: str = "0.12.6",
        *,
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
            "on_overflow": on_overflow,
            "num_parallel": num_parallel,
            "models": models,
            "version": version,
            "record_requests": record_requests,
            "stall": stall,
            "die_after": die_after,
            "fail_status": fail_status,
        }
        self._cfg: dict[str, Any] = {k: validate_setting(k, v) for k, v in given.items()}
        self._host = str(host)
        self._port = int(port)
        self._catalog = _build_catalog(self._cfg["models"])
        self._sched = _Scheduler(self._cfg)
        self._blobs: dict[str, int] = {}
        self._requests: list[dict[str, Any]] = []
        self._disconnects = 0
        self._disconnect_times: list[float] = []
        self._completed = 0
        self._aborted = 0
        self._tags_body: bytes | None = None
        self._version_body: bytes | None = None
        self._stopping = False
        self._seq = 0

        self._life = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid: int | None = None
        self._runner: web.AppRunner | None = None

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
        self._call(self._reset_state)

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of what the fake saw and did.

        ``requests``: one dict per request (method, path, query, headers with
        lowercase names, model as name:tag or None, body_bytes, json, time
        (monotonic, at arrival), status (None if nothing was sent)).
        ``in_flight`` {model: n} now and ``max_in_flight`` {model: max} count
        inference and embed requests from arrival (queued time included) to the
        end of their response; ``max_models_in_flight`` is the most distinct
        models in flight at one moment. ``loads`` {model: n}, ``total_loads``,
        ``crashes``, ``disconnects`` and ``disconnect_times`` (clients that
        closed before their response was complete), ``completed`` (inference
        and embed responses sent whole), ``aborted`` (connections dropped on
        purpose by die-after), ``loaded``, ``loading``, ``queued`` (requests
        waiting in the scheduler), ``blobs`` {digest: size}.
        """
        return self._call(self._snapshot)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], Any], timeout: float = 5.0, interval: float = 0.01
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``pred(stats)`` is true and return those stats.

        A predicate that raises LookupError (a key not there yet) counts as false.
        Raises AssertionError, with the last stats, when ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            try:
                ok = pred(st)
            except LookupError:
                ok = False
            if ok:
                return st
            if time.monotonic() >= deadline:
                brief = {k: v for k, v in st.items() if k != "requests"}
                brief["requests"] = f"<{len(st['requests'])} records>"
                err = AssertionError(f"condition not met within {timeout}s; last stats: {brief}")
                err.stats = st  # type: ignore[attr-defined]
                raise err
            time.sleep(interval)

    # ------------------------------------------------------------------ threading

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop (or directly when stopped) and return its result."""
        if threading.get_ident() == self._loop_tid:
            return fn()
        with self._life:
            loop = self._loop if self._thread is not None else None
            if loop is None:
                return fn()
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()

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
            site = web.TCPSite(runner, self._host, self._port, reuse_address=True, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        for addr in runner.addresses:
            self._port = int(addr[1])
            break
        self._runner = runner

    async def _astop(self) -> None:
        runner = self._runner
        self._stopping = True
        try:
            self._sched.drop_all()
            if runner is not None:
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
            self._sched.clear_live()
            self._runner = None
            self._stopping = False

    # ------------------------------------------------------------------ state

    def _settings_view(self) -> dict[str, Any]:
        view = dict(self._cfg)
        view["models"] = list(self._catalog)
        view["host"], view["port"] = self._host, self._port
        return view

    def _apply(self, values: Mapping[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            self._cfg[key] = value
            if key == "models":
                self._catalog = _build_catalog(value)
                self._tags_body = None
            elif key == "version":
                self._version_body = None
        self._sched.trim()
        if self._thread is not None:
            self._sched.schedule()
        return self._settings_view()

    def _reset_state(self) -> None:
        self._requests.clear()
        self._disconnects = 0
        self._disconnect_times.clear()
        self._completed = 0
        self._aborted = 0
        self._sched.reset()

    def _snapshot(self, with_requests: bool = True) -> dict[str, Any]:
        sch = self._sched
        return {
            "requests": [dict(r) for r in self._requests] if with_requests else [],
            "in_flight": dict(sch.in_flight),
            "max_in_flight": dict(sch.max_in_flight),
            "max_models_in_flight": sch.max_models_in_flight,
            "loads": dict(sch.loads),
            "total_loads": sch.total_loads,
            "crashes": sch.crashes,
            "disconnects": self._disconnects,
            "disconnect_times": list(self._disconnect_times),
            "completed": self._completed,
            "loaded": list(sch.loaded),
            "loading": list(sch.loading),
            "queued": len(sch.queue),
            "aborted": self._aborted,
            "blobs": dict(self._blobs),
        }

    def _catalog_changed(self) -> None:
        self._tags_body = None

    def _note_disconnect(self, request: web.BaseRequest) -> None:
        """Count a client that went away before the response was complete (once per request)."""
        state = _state(request)
        if self._stopping or state.gen != self._sched.gen or state.gone:
            return
        state.gone = True
        self._disconnects += 1
        self._disconnect_times.append(time.monotonic())

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ per-request knobs

    def _header_num(self, request: web.BaseRequest, name: str, integer: bool) -> Any:
        raw = request.headers.get(name)
        if raw is None:
            return None
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            raise _BadHeader(f"invalid {name} header: {raw!r}") from None
        if value < 0:
            raise _BadHeader(f"invalid {name} header: {raw!r}")
        return value

    def _interval(self, request: web.BaseRequest) -> float:
        value = self._header_num(request, "X-Fake-Token-Interval", False)
        return self._cfg["token_interval"] if value is None else value

    def _load_time(self, request: web.BaseRequest) -> float:
        value = self._header_num(request, "X-Fake-Load-Time", False)
        return self._cfg["load_time"] if value is None else value

    def _die_after(self, request: web.BaseRequest) -> int | None:
        value = self._header_num(request, "X-Fake-Die-After", True)
        if value is None and request.path in MODEL_PATHS:
            value = self._cfg["die_after"]
        return value

    def _token_count(self, request: web.BaseRequest, exact: Any = None, cap: Any = None) -> int:
        """Tokens to generate: X-Fake-Tokens, else ``exact`` (num_predict), else
        ``tokens`` capped by ``cap`` (max_tokens)."""
        value = self._header_num(request, "X-Fake-Tokens", True)
        if value is not None:
            return value
        if isinstance(exact, int) and not isinstance(exact, bool) and exact >= 0:
            return exact
        n = self._cfg["tokens"]
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
            n = min(n, cap)
        return n

    async def _sleep_watch(self, request: web.BaseRequest, seconds: float) -> bool:
        """Sleep, checking the client every POLL; False if it went away."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            if _gone(request):
                return False
            left = end - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, POLL))

    async def _stays(self, request: web.BaseRequest, seconds: float) -> bool:
        """``_sleep_watch``, noting a client that went away as a disconnect."""
        if await self._sleep_watch(request, seconds):
            return True
        self._note_disconnect(request)
        return False

    # ------------------------------------------------------------------ responses

    def _error(self, request: web.BaseRequest, status: int, message: str) -> web.Response:
        if request.path.startswith("/v1/"):
            kind = "invalid_request_error" if status < 500 else "api_error"
            body: dict[str, Any] = {
                "error": {"message": message, "type": kind, "param": None, "code": None}
            }
        else:
            body = {"error": message}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    def _abort(self, request: web.BaseRequest) -> web.Response:
        """Die: drop the TCP connection without finishing the response."""
        self._aborted += 1
        transport = request.transport
        if transport is not None:
            transport.abort()
        return _gone_response()

    async def _flush(self, request: web.BaseRequest) -> None:
        """Wait (up to 1 s) until what was written has left the process."""
        for _ in range(50):
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            if transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(POLL)

    def _json(
        self, request: web.BaseRequest, obj: Any, status: int = 200, *, completed: bool = False
    ) -> web.Response:
        """A whole JSON answer; with a die-after in force the connection dies instead."""
        if self._die_after(request) is not None:
            return self._abort(request)
        if completed:
            self._completed += 1
        return web.Response(status=status, body=_dumps(obj), content_type="application/json")

    async def _stream(
        self,
        request: web.BaseRequest,
        items: Iterable[tuple[float, bytes | Callable[[], bytes]]],
        content_type: str,
        *,
        completed: bool = False,
    ) -> web.StreamResponse:
        """Stream ``items`` ((delay before it, line or a function making it)) as a chunked body.

        Headers go out with the first line, like Ollama. With a die-after of n,
        n lines are sent and then the connection is dropped mid-body.
        """
        die = self._die_after(request)
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        resp.enable_chunked_encoding()
        sent = 0
        try:
            for delay, payload in items:
                if die is not None and sent >= die:
                    break
                if delay > 0:
                    if not await self._stays(request, delay):
                        return resp
                elif _gone(request):
                    self._note_disconnect(request)
                    return resp
                data = payload() if callable(payload) else payload
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(data)
                sent += 1
            if die is not None:
                if not resp.prepared:
                    await resp.prepare(request)
                await self._flush(request)
                self._abort(request)
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            self._note_disconnect(request)
            return resp
        if completed:
            self._completed += 1
        return resp

    # ------------------------------------------------------------------ application

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        r = app.router
        r.add_get("/", self._h_root)
        r.add_get("/api/version", self._h_version)
        r.add_get("/api/tags", self._h_tags)
        r.add_get("/api/ps", self._h_ps)
        r.add_post("/api/show", self._h_show)
        r.add_post("/api/generate", self._h_generate)
        r.add_post("/api/chat", self._h_chat)
        r.add_post("/api/embed", self._h_embed)
        r.add_post("/api/embeddings", self._h_embeddings)
        r.add_post("/api/pull", self._h_pull)
        r.add_post("/api/push", self._h_push)
        r.add_post("/api/create", self._h_create)
        r.add_post("/api/copy", self._h_copy)
        r.add_delete("/api/delete", self._h_delete)
        r.add_head("/api/blobs/{digest}", self._h_blob_head)
        r.add_post("/api/blobs/{digest}", self._h_blob_post)
        r.add_post("/v1/chat/completions", self._h_oai_chat)
        r.add_post("/v1/completions", self._h_oai_completions)
        r.add_post("/v1/embeddings", self._h_oai_embeddings)
        r.add_post("/v1/responses", self._h_oai_responses)
        r.add_post("/v1/messages", self._h_messages)
        r.add_get("/v1/models", self._h_oai_models)
        r.add_get("/v1/models/{model:.+}", self._h_oai_model)
        r.add_get("/_fake/stats", self._h_fake_stats)
        r.add_post("/_fake/configure", self._h_fake_configure)
        r.add_post("/_fake/reset", self._h_fake_reset)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await handler(request)
        state = request[_STATE] = _ReqState(self._sched.gen)
        raw = b""
        parsed: Any = None
        truncated = False
        if request.can_read_body and not path.startswith("/api/blobs/"):
            try:
                raw = await request.read()
            except ConnectionError:  # the client went away in the middle of its body
                truncated = True
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError as exc:
                    state.json_error = str(exc)
        state.json = parsed

        rec: dict[str, Any] | None = None
        if self._cfg["record_requests"]:
            model = _model_field(parsed)
            if model is None and path.startswith("/v1/models/"):
                model = request.match_info.get("model")
            rec = {
                "method": request.method,
                "path": path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "model": normalize_model(model) if model else None,
                "body_bytes": len(raw),
                "json": parsed,
                "time": time.monotonic(),
                "status": None,
            }
            self._requests.append(rec)
            state.rec = rec

        if truncated:
            self._note_disconnect(request)
            resp: web.StreamResponse = _gone_response()
        elif not host_allowed(request.headers.get("Host", "")):
            resp = web.Response(status=403)
        elif request.method == "OPTIONS":
            resp = web.Response(status=204)
        else:
            try:
                resp = await self._inject(request, handler, path)
            except _BadHeader as exc:
                resp = self._error(request, 400, str(exc))
            except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
                resp = web.Response(status=404, text="404 page not found")
        if rec is not None:
            rec["status"] = None if resp.status == GONE else resp.status
        return resp

    async def _inject(self, request: web.Request, handler: Any, path: str) -> web.StreamResponse:
        model_path = path in MODEL_PATHS or path.startswith("/api/blobs/")
        stall = self._header_num(request, "X-Fake-Stall", False)
        if stall is None and model_path:
            stall = self._cfg["stall"]
        if stall:
            if not await self._stays(request, stall):
                return _gone_response()
        status = self._header_num(request, "X-Fake-Status", True)
        if status is None and model_path:
            status = self._cfg["fail_status"]
        if status:
            if status < 200 or status in (204, 304):
                return web.Response(status=status)
            return self._error(request, status, FAKE_FAILURE)
        if not model_path and self._header_num(request, "X-Fake-Die-After", True) is not None:
            return self._abort(request)  # nothing to stream here: die before answering
        return await handler(request)

    def _body(self, request: web.BaseRequest) -> dict[str, Any]:
        """The JSON object body, or a 400 raised as an HTTP exception."""
        state = _state(request)
        body = state.json
        if isinstance(body, dict):
            return body
        if state.json_error is not None:
            message = f"invalid JSON: {state.json_error}"
        elif body is None:
            message = "missing request body"
        else:
            message = "request body must be a JSON object"
        raise _HTTPError(self._error(request, 400, message))

    def _require_model(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[str, _Model]:
        raw = _model_field(body)
        if raw is None:
            raise _HTTPError(self._error(request, 400, "model is required"))
        model = self._catalog.get(normalize_model(raw))
        if model is None:
            raise _HTTPError(self._error(request, 404, f"model '{raw}' not found"))
        return raw, model

    async def _scheduled(
        self,
        request: web.BaseRequest,
        model: str,
        work: Callable[[_Ticket], Any],
        *,
        unload_after: bool = False,
    ) -> web.StreamResponse:
        """Run ``work(ticket)`` once the scheduler admits this request for ``model``."""
        sch = self._sched
        gen = sch.gen
        load_time = self._load_time(request)
        sch.arrive(model)
        ticket: _Ticket | None = None
        try:
            ticket = await self._admission(request, model, load_time)
            if ticket is None:
                return _gone_response()
            if ticket.state == "crashed":
                return self._error(request, 500, CRASH_ERROR)
            return await work(ticket)
        finally:
            if ticket is not None and ticket.state == "admitted":
                sch.release(ticket, unload=unload_after)
            sch.depart(model, gen)

    async def _admission(
        self, request: web.BaseRequest, model: str, load_time: float
    ) -> _Ticket | None:
        sch = self._sched
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = _Ticket(model, load_time, fut, sch.gen)
        sch.enqueue(ticket)
        try:
            while not fut.done():
                if _gone(request):
                    self._note_disconnect(request)
                    return None
                await asyncio.wait((fut,), timeout=POLL)
        except BaseException:
            if ticket.state == "admitted":
                sch.release(ticket)
            raise
        finally:
            if ticket.state == "queued":
                sch.cancel(ticket)
        if fut.cancelled():
            return None
        return ticket

    # ------------------------------------------------------------------ light endpoints

    async def _h_root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def _h_version(self, request: web.Request) -> web.StreamResponse:
        if self._version_body is None:
            self._version_body = _dumps({"version": self._cfg["version"]})
        return web.Response(body=self._version_body, content_type="application/json")

    async def _h_tags(self, request: web.Request) -> web.StreamResponse:
        if self._tags_body is None:
            self._tags_body = _dumps({"models": [m.tag() for m in self._catalog.values()]})
        return web.Response(body=self._tags_body, content_type="application/json")

    async def _h_ps(self, request: web.Request) -> web.StreamResponse:
        expires = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        models = []
        for name in self._sched.loaded:
            m = self._catalog.get(name) or _Model(name)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": m.size,
                    "digest": m.digest,
                    "details": dict(m.details),
                    "expires_at": expires,
                    "size_vram": m.size,
                    "context_length": 4096,
                }
            )
        return web.Response(body=_dumps({"models": models}), content_type="application/json")

    async def _h_show(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        fam = m.family
        capabilities = ["embedding"] if m.embedding else ["completion"]
        info = {
            "general.architecture": fam,
            "general.basename": m.name.partition(":")[0],
            "general.file_type": 15,
            "general.parameter_count": m.size,
            "general.quantization_version": 2,
            f"{fam}.context_length": 131072,
            f"{fam}.embedding_length": 768 if m.embedding else 3072,
        }
        out = {
            "license": "fake license",
            "modelfile": (
                '# Modelfile generated by "ollama show"\n'
                f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {m.name}\n\n"
                f"FROM /root/.ollama/models/blobs/sha256-{m.digest}\n"
                'TEMPLATE "{{ .Prompt }}"\n'
            ),
            "parameters": "" if m.embedding else 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": dict(m.details),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": m.modified_at,
        }
        return self._json(request, out)

    # ------------------------------------------------------------------ native inference

    async def _h_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._native(request, chat=False)

    async def _h_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._native(request, chat=True)

    async def _native(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        if m.embedding:
            what = "chat" if chat else "generate"
            return self._error(request, 400, f'"{raw}" does not support {what}')
        stream = body.get("stream")
        stream = True if stream is None else bool(stream)
        unload = _is_zero_duration(body.get("keep_alive"))
        if chat:
            messages = body.get("messages") or []
            empty = not messages
            prompt_words = _words(messages)
        else:
            prompt = body.get("prompt") or ""
            empty = not (isinstance(prompt, str) and prompt)
            prompt_words = _words(prompt)
        options = body.get("options")
        if not isinstance(options, dict):
            options = {}

        def piece(text: str, **extra: Any) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": raw, "created_at": _now_iso()}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj.update(extra)
            return obj

        if empty and unload:
            self._sched.unload(m.name)
            return self._json(request, piece("", done=True, done_reason="unload"))

        n = self._token_count(request, exact=options.get("num_predict"))
        interval = self._interval(request)
        t0 = _state(request).t0

        def final(ticket: _Ticket, text: str, reason: str = "stop") -> dict[str, Any]:
            extra: dict[str, Any] = {"done": True, "done_reason": reason}
            if not chat and reason == "stop":
                extra["context"] = list(range(1, prompt_words + n + 1))
            if reason == "stop":
                extra.update(
                    total_duration=time.monotonic_ns() - t0,
                    load_duration=int(ticket.load_duration * 1e9),
                    prompt_eval_count=prompt_words,
                    prompt_eval_duration=prompt_words * 100_000,
                    eval_count=n,
                    eval_duration=int(n * interval * 1e9),
                )
            return piece(text, **extra)

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if empty:
                return self._json(request, final(ticket, "", "load"), completed=True)
            if not stream:
                if not await self._stays(request, n * interval):
                    return _gone_response()
                return self._json(request, final(ticket, _text(n)), completed=True)

            def items() -> Iterator[tuple[float, bytes | Callable[[], bytes]]]:
                for i in range(1, n + 1):
                    yield (
                        interval,
                        functools.partial(lambda i: _line(piece(_token(i), done=False)), i),
                    )
                yield 0.0, lambda: _line(final(ticket, ""))

            return await self._stream(request, items(), NDJSON, completed=True)

        return await self._scheduled(request, m.name, work, unload_after=unload)

    # ------------------------------------------------------------------ embeddings

    async def _h_embed(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        inputs = body.get("input")
        if inputs is None or inputs == "":
            texts: list[str] = []
        elif isinstance(inputs, list):
            texts = [str(x) for x in inputs]
        else:
            texts = [str(inputs)]
        dim = body.get("dimensions")
        dim = dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else EMBED_DIM
        interval = self._interval(request)
        t0 = _state(request).t0

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if texts and not await self._stays(request, interval):
                return _gone_response()
            out = {
                "model": raw,
                "embeddings": [_vector(t, dim) for t in texts],
                "total_duration": time.monotonic_ns() - t0,
                "load_duration": int(ticket.load_duration * 1e9),
                "prompt_eval_count": _words(texts),
            }
            return self._json(request, out, completed=True)

        unload = _is_zero_duration(body.get("keep_alive"))
        return await self._scheduled(request, m.name, work, unload_after=unload)

    async def _h_embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            _raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        prompt = body.get("prompt") or ""
        interval = self._interval(request)

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if prompt and not await self._stays(request, interval):
                return _gone_response()
            vec = _vector(str(prompt)) if prompt else []
            return self._json(request, {"embedding": vec}, completed=True)

        unload = _is_zero_duration(body.get("keep_alive"))
        return await self._scheduled(request, m.name, work, unload_after=unload)

    # ------------------------------------------------------------------ model management

    def _status_stream(
        self, request: web.Request, lines: list[dict[str, Any]], on_success: Callable[[], None]
    ) -> Iterator[tuple[float, bytes | Callable[[], bytes]]]:
        interval = self._interval(request)
        for obj in lines:
            yield interval, _line(obj)

        def success() -> bytes:
            on_success()
            return _line({"status": "success"})

        yield 0.0, success

    async def _status_response(
        self,
        request: web.Request,
        body: dict[str, Any],
        lines: list[dict[str, Any]],
        on_success: Callable[[], None],
    ) -> web.StreamResponse:
        stream = body.get("stream")
        if stream is None or stream:
            return await self._stream(
                request, self._status_stream(request, lines, on_success), NDJSON
            )
        if not await self._stays(request, len(lines) * self._interval(request)):
            return _gone_response()
        if self._die_after(request) is not None:
            return self._abort(request)
        on_success()
        return self._json(request, {"status": "success"})

    async def _h_pull(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
        except _HTTPError as exc:
            return exc.response
        raw = _model_field(body)
        if raw is None:
            return self._error(request, 400, "model is required")
        name = normalize_model(raw)
        m = self._catalog.get(name) or _Model(name)
        total = m.size
        layer = {"digest": f"sha256:{m.digest}", "total": total}
        pulling = f"pulling {m.digest[:12]}"
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        lines += [{"status": pulling, **layer, "completed": c} for c in (0, total // 2, total)]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]

        def add() -> None:
            if name not in self._catalog:
                self._catalog[name] = m
                self._catalog_changed()

        return await self._status_response(request, body, lines, add)

    async def _h_push(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            _raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        total = m.size
        layer = {"digest": f"sha256:{m.digest}", "total": total}
        pushing = f"pushing {m.digest[:12]}"
        lines: list[dict[str, Any]] = [{"status": "retrieving manifest"}]
        lines += [{"status": pushing, **layer, "completed": c} for c in (0, total // 2, total)]
        lines += [{"status": "pushing manifest"}]
        return await self._status_response(request, body, lines, lambda: None)

    async def _h_create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
        except _HTTPError as exc:
            return exc.response
        raw = _model_field(body)
        if raw is None:
            return self._error(request, 400, "model is required")
        name = normalize_model(raw)
        files = body.get("files") or {}
        adapters = body.get("adapters") or {}
        source = body.get("from")
        if not isinstance(files, dict) or not isinstance(adapters, dict):
            return self._error(request, 400, "files and adapters must be objects")
        if not files and not source:
            return self._error(request, 400, "neither 'from' or 'files' was specified")
        digests: list[str] = []
        for fname, digest in list(files.items()) + list(adapters.items()):
            match = _DIGEST_RE.match(str(digest))
            if not match:
                return self._error(request, 400, f"invalid digest {digest!r} for file {fname!r}")
            canonical = f"sha256:{match.group(1)}"
            if canonical not in self._blobs:
                return self._error(request, 400, f"file {fname!r}: blob {canonical} not found")
            digests.append(canonical)
        base = self._catalog.get(normalize_model(source)) if isinstance(source, str) else None
        lines: list[dict[str, Any]] = []
        if files:
            lines.append({"status": "parsing GGUF"})
        lines += [{"status": f"using existing layer {d}"} for d in digests]
        lines += [{"status": "writing manifest"}]
        if base is not None:
            new = base.copy(name)
            new.digest = hashlib.sha256(f"fakeollama:{name}:{base.digest}".encode()).hexdigest()
        else:
            new = _Model(name)
            if digests:
                new.digest = hashlib.sha256(",".join(digests).encode()).hexdigest()

        def add() -> None:
            self._catalog[name] = new
            self._catalog_changed()

        return await self._status_response(request, body, lines, add)

    async def _h_copy(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
        except _HTTPError as exc:
            return exc.response
        source, dest = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(dest, str) or not source or not dest:
            return self._error(request, 400, "source and destination are required")
        m = self._catalog.get(normalize_model(source))
        if m is None:
            return self._error(request, 404, f"model '{source}' not found")
        if self._die_after(request) is not None:
            return self._abort(request)
        name = normalize_model(dest)
        self._catalog[name] = m.copy(name)
        self._catalog_changed()
        return web.Response(status=200)

    async def _h_delete(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
        except _HTTPError as exc:
            return exc.response
        raw = _model_field(body)
        if raw is None:
            return self._error(request, 400, "model is required")
        name = normalize_model(raw)
        if name not in self._catalog:
            return self._error(request, 404, f"model '{raw}' not found")
        if self._die_after(request) is not None:
            return self._abort(request)
        del self._catalog[name]
        self._catalog_changed()
        if name in self._sched.loaded:
            self._sched.unload(name)
        return web.Response(status=200)

    # ------------------------------------------------------------------ blobs

    def _blob_digest(self, request: web.Request) -> str | None:
        match = _DIGEST_RE.match(request.match_info["digest"])
        return f"sha256:{match.group(1)}" if match else None

    async def _h_blob_head(self, request: web.Request) -> web.StreamResponse:
        digest = self._blob_digest(request)
        if digest is None:
            return web.Response(status=400)
        return web.Response(status=200 if digest in self._blobs else 404)

    async def _h_blob_post(self, request: web.Request) -> web.StreamResponse:
        digest = self._blob_digest(request)
        if digest is None:
            return self._error(request, 400, "invalid digest format")
        hasher = hashlib.sha256()
        size = 0
        rec = _state(request).rec
        try:
            async for chunk in request.content.iter_chunked(BLOB_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                if rec is not None:
                    rec["body_bytes"] = size
        except (ConnectionError, asyncio.IncompleteReadError):
            self._note_disconnect(request)
            return _gone_response()
        if _gone(request):
            self._note_disconnect(request)
            return _gone_response()
        got = f"sha256:{hasher.hexdigest()}"
        if got != digest:
            return self._error(request, 400, f"digest mismatch, expected {digest}, got {got}")
        if self._die_after(request) is not None:
            return self._abort(request)
        self._blobs[digest] = size
        return web.Response(status=201)

    # ------------------------------------------------------------------ OpenAI-compatible

    async def _h_oai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._oai_text(request, chat=True)

    async def _h_oai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._oai_text(request, chat=False)

    async def _oai_text(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        if m.embedding:
            return self._error(request, 400, f'"{raw}" does not support generate')
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return self._error(request, 400, "invalid message format")
            prompt_words = _words(messages)
            cap = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            prompt_words = _words(body.get("prompt"))
            cap = body.get("max_tokens")
        n = self._token_count(request, cap=cap)
        capped = self._cfg["tokens"] > n and isinstance(cap, int) and n == cap
        finish = "length" if capped else "stop"
        interval = self._interval(request)
        stream = bool(body.get("stream"))
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self._next_id()}"
        usage = {
            "prompt_tokens": prompt_words,
            "completion_tokens": n,
            "total_tokens": prompt_words + n,
        }
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": raw,
            "system_fingerprint": "fp_ollama",
        }

        def chunk(text: str, reason: str | None) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"text": text, "index": 0, "finish_reason": reason}
            return _sse({**base, "choices": [choice]})

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if not stream:
                if not await self._stays(request, n * interval):
                    return _gone_response()
                text = _text(n)
                if chat:
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                    obj = "chat.completion"
                else:
                    choice = {"text": text, "index": 0, "finish_reason": finish}
                    obj = "text_completion"
                out = {**base, "object": obj, "choices": [choice], "usage": usage}
                return self._json(request, out, completed=True)

            def items() -> Iterator[tuple[float, bytes | Callable[[], bytes]]]:
                for i in range(1, n + 1):
                    yield interval, chunk(_token(i), None)
                yield 0.0, chunk("", finish)
                if include_usage:
                    yield 0.0, _sse({**base, "choices": [], "usage": usage})
                yield 0.0, b"data: [DONE]\n\n"

            return await self._stream(request, items(), SSE, completed=True)

        return await self._scheduled(request, m.name, work)

    async def _h_oai_embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        inputs = body.get("input")
        if inputs is None or inputs == "" or inputs == []:
            return self._error(request, 400, "invalid input")
        if isinstance(inputs, list):
            texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        else:
            texts = [str(inputs)]
        dim = body.get("dimensions")
        dim = dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else EMBED_DIM
        as_base64 = body.get("encoding_format") == "base64"
        interval = self._interval(request)

        def encode(vec: list[float]) -> Any:
            if as_base64:
                return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            return vec

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if not await self._stays(request, interval):
                return _gone_response()
            words = _words(texts)
            out = {
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": encode(_vector(t, dim)), "index": i}
                    for i, t in enumerate(texts)
                ],
                "model": raw,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
            return self._json(request, out, completed=True)

        return await self._scheduled(request, m.name, work)

    async def _h_oai_models(self, request: web.Request) -> web.StreamResponse:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "library"}
            for name in self._catalog
        ]
        return self._json(request, {"object": "list", "data": data})

    async def _h_oai_model(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["model"]
        if normalize_model(raw) not in self._catalog:
            return self._error(request, 404, f"model '{raw}' not found")
        out = {"id": raw, "object": "model", "created": int(time.time()), "owned_by": "library"}
        return self._json(request, out)

    async def _h_oai_responses(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        if m.embedding:
            return self._error(request, 400, f'"{raw}" does not support generate')
        prompt_words = _words(body.get("input")) + _words(body.get("instructions"))
        cap = body.get("max_output_tokens")
        n = self._token_count(request, cap=cap)
        interval = self._interval(request)
        stream = bool(body.get("stream"))
        seq = self._next_id()
        rid, mid = f"resp_{seq:024x}", f"msg_{seq:024x}"
        created = int(time.time())
        usage = {
            "input_tokens": prompt_words,
            "output_tokens": n,
            "total_tokens": prompt_words + n,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        def item(text: str | None, status: str) -> dict[str, Any]:
            content = [] if text is None else [part(text)]
            return {
                "type": "message",
                "id": mid,
                "status": status,
                "role": "assistant",
                "content": content,
            }

        def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": cap,
                "model": raw,
                "output": output,
                "parallel_tool_calls": True,
                "temperature": 1.0,
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "metadata": {},
                "usage": usage if with_usage else None,
            }

        async def work(ticket: _Ticket) -> web.StreamResponse:
            text = _text(n)
            if not stream:
                if not await self._stays(request, n * interval):
                    return _gone_response()
                out = response("completed", [item(text, "completed")], True)
                return self._json(request, out, completed=True)

            counter = iter(range(1_000_000))

            def ev(kind: str, **fields: Any) -> bytes:
                return _sse({"type": kind, "sequence_number": next(counter), **fields}, kind)

            where = {"item_id": mid, "output_index": 0, "content_index": 0}

            def items() -> Iterator[tuple[float, bytes | Callable[[], bytes]]]:
                yield 0.0, ev("response.created", response=response("in_progress", [], False))
                added = item(None, "in_progress")
                yield 0.0, ev("response.output_item.added", output_index=0, item=added)
                yield 0.0, ev("response.content_part.added", **where, part=part(""))
                for i in range(1, n + 1):
                    delta = ev("response.output_text.delta", **where, delta=_token(i), logprobs=[])
                    yield interval, delta
                yield 0.0, ev("response.output_text.done", **where, text=text, logprobs=[])
                yield 0.0, ev("response.content_part.done", **where, part=part(text))
                done_item = item(text, "completed")
                yield 0.0, ev("response.output_item.done", output_index=0, item=done_item)
                final = response("completed", [done_item], True)
                yield 0.0, ev("response.completed", response=final)

            return await self._stream(request, items(), SSE, completed=True)

        return await self._scheduled(request, m.name, work)

    async def _h_messages(self, request: web.Request) -> web.StreamResponse:
        """A minimal Anthropic-compatible /v1/messages."""
        try:
            body = self._body(request)
            raw, m = self._require_model(request, body)
        except _HTTPError as exc:
            return exc.response
        if m.embedding:
            return self._error(request, 400, f'"{raw}" does not support generate')
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._error(request, 400, "messages is required")
        prompt_words = _words(messages) + _words(body.get("system"))
        cap = body.get("max_tokens")
        n = self._token_count(request, cap=cap)
        capped = self._cfg["tokens"] > n and isinstance(cap, int) and n == cap
        stop_reason = "max_tokens" if capped else "end_turn"
        interval = self._interval(request)
        stream = bool(body.get("stream"))
        mid = f"msg_{self._next_id():024x}"

        def message(content: list[Any], reason: str | None, out_tokens: int) -> dict[str, Any]:
            return {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": raw,
                "content": content,
                "stop_reason": reason,
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_words, "output_tokens": out_tokens},
            }

        async def work(ticket: _Ticket) -> web.StreamResponse:
            if not stream:
                if not await self._stays(request, n * interval):
                    return _gone_response()
                out = message([{"type": "text", "text": _text(n)}], stop_reason, n)
                return self._json(request, out, completed=True)

            def ev(kind: str, **fields: Any) -> bytes:
                return _sse({"type": kind, **fields}, kind)

            def items() -> Iterator[tuple[float, bytes | Callable[[], bytes]]]:
                yield 0.0, ev("message_start", message=message([], None, 0))
                block = {"type": "text", "text": ""}
                yield 0.0, ev("content_block_start", index=0, content_block=block)
                for i in range(1, n + 1):
                    delta = {"type": "text_delta", "text": _token(i)}
                    yield interval, ev("content_block_delta", index=0, delta=delta)
                yield 0.0, ev("content_block_stop", index=0)
                yield (
                    0.0,
                    ev(
                        "message_delta",
                        delta={"stop_reason": stop_reason, "stop_sequence": None},
                        usage={"output_tokens": n},
                    ),
                )
                yield 0.0, ev("message_stop")

            return await self._stream(request, items(), SSE, completed=True)

        return await self._scheduled(request, m.name, work)

    # ------------------------------------------------------------------ control endpoints

    async def _h_fake_stats(self, request: web.Request) -> web.StreamResponse:
        with_requests = request.query.get("requests", "1") not in ("0", "false", "no")
        return web.Response(
            body=_dumps(self._snapshot(with_requests)), content_type="application/json"
        )

    async def _h_fake_configure(self, request: web.Request) -> web.StreamResponse:
        try:
            values = await request.json()
            if not isinstance(values, dict):
                raise ValueError("body must be a JSON object of settings")
            if "host" in values or "port" in values:
                raise ValueError("host and port cannot be changed while running")
            checked = {k: validate_setting(k, v) for k, v in values.items()}
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.Response(body=_dumps(self._apply(checked)), content_type="application/json")

    async def _h_fake_reset(self, request: web.Request) -> web.StreamResponse:
        self._reset_state()
        return web.Response(body=b"{}", content_type="application/json")


def _gone_response() -> web.Response:
    """What a handler returns when the connection is gone: aiohttp cannot send it."""
    return web.Response(status=GONE)


class _HTTPError(Exception):
    """Carries a ready error response out of a validation helper."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
