"""The model runner: which models are in (simulated) VRAM, which are loading, what runs on each.

Like Ollama's runners, a model must be loaded before it serves; loading takes
``load_time``; at most ``vram`` models are resident at once; an idle model is
evicted, least recently used first, to make room. The runner only keeps that
state: who is admitted when is the :mod:`.scheduler`'s decision. Runs on the
server's event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Runner:
    """Loaded and loading models, the requests running on each, and load counters."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.loaded: dict[str, float] = {}  # model -> last used; dict order is LRU order
        self.loading: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, int] = {}
        self.unload_when_idle: set[str] = set()
        self.loads: dict[str, int] = {}
        self.total_loads = 0

    def busy(self, model: str) -> bool:
        return self.running.get(model, 0) > 0

    def has_room(self) -> bool:
        """Whether one more model fits without evicting anything."""
        vram = self.cfg["vram"]
        return vram is None or len(self.loaded) + len(self.loading) < vram

    def evict_idle(self) -> bool:
        """Evict the least recently used idle model; False if every loaded model is busy."""
        for m in self.loaded:  # least recently used first
            if not self.busy(m):
                del self.loaded[m]
                self.unload_when_idle.discard(m)
                return True
        return False

    def trim(self) -> None:
        """After ``vram`` shrank: evict idle models until the rest fits."""
        vram = self.cfg["vram"]
        while vram is not None and len(self.loaded) + len(self.loading) > vram:
            if not self.evict_idle():
                break

    def touch(self, model: str) -> None:
        """Mark ``model`` loaded and most recently used."""
        self.loaded.pop(model, None)
        self.loaded[model] = time.monotonic()

    def start_load(self, model: str, seconds: float, on_loaded: Callable[[], None]) -> None:
        """Begin loading ``model``; at once when ``seconds`` is 0, else ``on_loaded`` runs after."""
        self.loads[model] = self.loads.get(model, 0) + 1
        self.total_loads += 1
        if seconds <= 0:
            self.touch(model)
            return
        loop = asyncio.get_running_loop()
        self.loading[model] = loop.create_task(self._load(model, seconds, on_loaded))

    async def _load(self, model: str, seconds: float, on_loaded: Callable[[], None]) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self.loading.pop(model, None)
        self.touch(model)
        on_loaded()

    def occupy(self, model: str) -> None:
        """One more request runs on ``model``."""
        self.running[model] = self.running.get(model, 0) + 1
        self.touch(model)

    def vacate(self, model: str, *, unload: bool = False) -> None:
        """A request on ``model`` ended; ``unload`` (keep_alive 0) unloads it once idle."""
        n = self.running.get(model, 0) - 1
        if n > 0:
            self.running[model] = n
        else:
            self.running.pop(model, None)
        if model in self.loaded:
            self.touch(model)
        if unload:
            self.unload_when_idle.add(model)
        if model not in self.running and model in self.unload_when_idle:
            self.unload_when_idle.discard(model)
            self.loaded.pop(model, None)

    def unload(self, model: str) -> bool:
        """``keep_alive: 0``: unload now (True), or as soon as the model's requests finish."""
        if self.busy(model):
            self.unload_when_idle.add(model)
            return False
        self.loaded.pop(model, None)
        return True

    def cancel_loads(self) -> None:
        for task in list(self.loading.values()):
            task.cancel()
        self.loading.clear()

    def clear_live(self) -> None:
        """Forget running requests and loads in progress (the server stopped)."""
        self.running.clear()
        self.loading.clear()

    def reset_counters(self) -> None:
        self.loads.clear()
        self.total_loads = 0
