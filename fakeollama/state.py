"""Everything one simulated Ollama holds: settings, installed models, blobs, runner, scheduler,
and the records and counters tests read. It survives ``stop()``/``start()``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .catalog import Model, build_catalog
from .runner import Runner
from .scheduler import Scheduler


class SimState:
    """One simulated server's state. Touched only on its event loop while it runs."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.catalog: dict[str, Model] = build_catalog(cfg["models"])
        self.runner = Runner(cfg, self.size_of)
        self.sched = Scheduler(cfg, self.runner)
        self.blobs: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.disconnect_times: list[float] = []
        self.completed = 0
        self.aborted = 0
        self.stopping = False  # connections dropped by stop() are not client disconnects
        self.tags_body: bytes | None = None
        self.version_body: bytes | None = None
        self._seq = 0

    def size_of(self, model: str) -> int:
        """An installed model's size; a deleted one that is still loaded keeps its guess."""
        entry = self.catalog.get(model)
        return (entry or Model(model)).size

    def settings_view(self, host: str, port: int) -> dict[str, Any]:
        view = dict(self.cfg)
        view["models"] = list(self.catalog)
        view["host"], view["port"] = host, port
        return view

    def apply(self, values: Mapping[str, Any], *, running: bool) -> None:
        """Take validated settings (see :mod:`.config`)."""
        for key, value in values.items():
            self.cfg[key] = value
            if key == "models":
                self.catalog = build_catalog(value)
                self.catalog_changed()
            elif key == "version":
                self.version_body = None
        self.runner.trim()
        if running:
            self.sched.schedule()

    def catalog_changed(self) -> None:
        self.tags_body = None

    def reset(self) -> None:
        """Clear every record and counter and unload all models (catalog and blobs stay)."""
        self.requests.clear()
        self.disconnects = 0
        self.disconnect_times.clear()
        self.completed = 0
        self.aborted = 0
        self.sched.reset()

    def note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnect_times.append(time.monotonic())

    def next_id(self) -> int:
        self._seq += 1
        return self._seq

    def snapshot(self, with_requests: bool = True) -> dict[str, Any]:
        sch, runner = self.sched, self.runner
        if runner.expire():
            sch.schedule()
        return {
            "requests": [dict(r) for r in self.requests] if with_requests else [],
            "in_flight": dict(sch.in_flight),
            "running": dict(runner.running),
            "max_in_flight": dict(sch.max_in_flight),
            "max_models_in_flight": sch.max_models_in_flight,
            "loads": dict(runner.loads),
            "total_loads": runner.total_loads,
            "evictions": dict(runner.evictions),
            "unloads": dict(runner.unloads),
            "model_requests": dict(sch.model_requests),
            "crashes": sch.crashes,
            "busy_refusals": sch.busy_refusals,
            "disconnects": self.disconnects,
            "disconnect_times": list(self.disconnect_times),
            "completed": self.completed,
            "loaded": list(runner.loaded),
            "loading": list(runner.loading),
            "vram_used": runner.vram_used(),
            "queued": len(sch.queue),
            "aborted": self.aborted,
            "blobs": dict(self.blobs),
        }


def wait_for(
    stats: Callable[[], dict[str, Any]],
    pred: Callable[[dict[str, Any]], Any],
    timeout: float,
    interval: float,
) -> dict[str, Any]:
    """Poll ``stats()`` until ``pred(stats)`` is true and return those stats.

    A predicate that raises LookupError (a key not there yet) counts as false.
    Raises AssertionError, with the last stats, when ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        st = stats()
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
