"""The model runner: which models are in (simulated) VRAM, which are loading, what runs on each.

Like Ollama's runners, a model must be loaded before it serves; loading takes
``load_time``; at most ``vram`` models are resident at once and, with
``vram_bytes``, their sizes must fit; an idle model is evicted, least recently
used first, to make room; an idle model unloads by itself once its keep-alive
passes. The runner only keeps that state: who is admitted when is the
:mod:`.scheduler`'s decision. Runs on the server's event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

FOREVER = float("inf")


def _bump(counter: dict[str, int], model: str) -> None:
    counter[model] = counter.get(model, 0) + 1


class Runner:
    """Loaded and loading models, the requests running on each, keep-alives and counters."""

    def __init__(self, cfg: dict[str, Any], size_of: Callable[[str], int]) -> None:
        self.cfg = cfg
        self.size_of = size_of
        self.on_freed: Callable[[], None] = lambda: None  # room was made: admit again
        self.loaded: dict[str, float] = {}  # model -> last used; dict order is LRU order
        self.loading: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, int] = {}
        self.unload_when_idle: set[str] = set()
        self.keep_alive: dict[str, float] = {}  # model -> seconds, from its latest request
        self.expires: dict[str, float] = {}  # idle model -> monotonic time it unloads
        self.loads: dict[str, int] = {}
        self.total_loads = 0
        self.evictions: dict[str, int] = {}  # unloaded to make room for another model
        self.unloads: dict[str, int] = {}  # unloaded by keep_alive (0, or expired) or delete
        self._timer: asyncio.TimerHandle | None = None

    # -- VRAM

    def busy(self, model: str) -> bool:
        return self.running.get(model, 0) > 0

    def resident(self) -> list[str]:
        return [*self.loaded, *self.loading]

    def vram_used(self) -> int:
        return sum(self.size_of(m) for m in self.resident())

    def size_vram(self, model: str) -> int:
        """What ``model`` holds in VRAM: its size, or the whole budget when it is bigger
        (Ollama then runs the rest on the CPU)."""
        budget = self.cfg["vram_bytes"]
        size = self.size_of(model)
        return size if budget is None else min(size, budget)

    def has_room(self, model: str | None = None) -> bool:
        """Whether ``model`` (or any one more model) fits without evicting anything."""
        resident = len(self.loaded) + len(self.loading)
        vram = self.cfg["vram"]
        if vram is not None and resident >= vram:
            return False
        budget: int | None = self.cfg["vram_bytes"]
        if budget is None or model is None or resident == 0:
            return True  # alone, a model too big for VRAM still loads (partly on the CPU)
        return self.vram_used() + self.size_of(model) <= budget

    def evict_idle(self) -> bool:
        """Evict the least recently used idle model; False if every loaded model is busy."""
        for m in self.loaded:  # least recently used first
            if not self.busy(m):
                self._drop(m)
                _bump(self.evictions, m)
                return True
        return False

    def make_room(self, model: str) -> bool:
        """Evict idle models, least recently used first, until ``model`` fits; as Ollama does,
        the evictions stand even when busy models still leave too little room (False)."""
        while not self.has_room(model):
            if not self.evict_idle():
                return False
        return True

    def trim(self) -> None:
        """After ``vram`` or ``vram_bytes`` shrank: evict idle models until the rest fits."""
        while self._over_budget():
            if not self.evict_idle():
                break

    def _over_budget(self) -> bool:
        vram, budget = self.cfg["vram"], self.cfg["vram_bytes"]
        resident = self.resident()
        if vram is not None and len(resident) > vram:
            return True
        return budget is not None and len(resident) > 1 and self.vram_used() > budget

    # -- loading and running

    def touch(self, model: str) -> None:
        """Mark ``model`` loaded and most recently used."""
        self.loaded.pop(model, None)
        self.loaded[model] = time.monotonic()

    def start_load(self, model: str, seconds: float, on_loaded: Callable[[], None]) -> None:
        """Begin loading ``model``; at once when ``seconds`` is 0, else ``on_loaded`` runs after."""
        _bump(self.loads, model)
        self.total_loads += 1
        if seconds <= 0:
            self.touch(model)
            self._idle_from_now(model)
            return
        loop = asyncio.get_running_loop()
        self.loading[model] = loop.create_task(self._load(model, seconds, on_loaded))

    async def _load(self, model: str, seconds: float, on_loaded: Callable[[], None]) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self.loading.pop(model, None)
        self.touch(model)
        self._idle_from_now(model)
        on_loaded()

    def occupy(self, model: str) -> None:
        """One more request runs on ``model``."""
        self.running[model] = self.running.get(model, 0) + 1
        self.expires.pop(model, None)
        self.touch(model)

    def vacate(self, model: str, *, keep_alive: float | None = None) -> None:
        """A request on ``model`` ended. Its ``keep_alive`` (seconds; None: unchanged) becomes
        the model's; 0 unloads it once idle."""
        n = self.running.get(model, 0) - 1
        if n > 0:
            self.running[model] = n
        else:
            self.running.pop(model, None)
        if model in self.loaded:
            self.touch(model)
        if keep_alive == 0:
            self.unload_when_idle.add(model)
        elif keep_alive is not None:
            self.keep_alive[model] = keep_alive
        if model not in self.running:
            if model in self.unload_when_idle:
                self._drop(model)
                _bump(self.unloads, model)
            elif model in self.loaded:
                self._idle_from_now(model)

    def unload(self, model: str) -> bool:
        """``keep_alive: 0``: unload now (True), or as soon as the model's requests finish."""
        if self.busy(model):
            self.unload_when_idle.add(model)
            return False
        if model in self.loaded:
            self._drop(model)
            _bump(self.unloads, model)
        return True

    def _drop(self, model: str) -> None:
        self.loaded.pop(model, None)
        self.unload_when_idle.discard(model)
        self.expires.pop(model, None)

    # -- keep-alive

    def keep_alive_of(self, model: str) -> float:
        seconds = self.keep_alive.get(model, self.cfg["keep_alive"])
        return FOREVER if seconds < 0 else float(seconds)

    def _idle_from_now(self, model: str) -> None:
        if self.busy(model):
            return
        seconds = self.keep_alive_of(model)
        if seconds == FOREVER:
            self.expires.pop(model, None)
            return
        self.expires[model] = time.monotonic() + seconds
        self._arm()

    def expires_in(self, model: str) -> float:
        """Seconds until ``model`` unloads by itself (a busy one: its keep-alive from now)."""
        when = self.expires.get(model)
        if when is None:
            return self.keep_alive_of(model)
        return max(0.0, when - time.monotonic())

    def expire(self) -> bool:
        """Unload the idle models whose keep-alive has passed; True if any did."""
        now = time.monotonic()
        due = [m for m, when in self.expires.items() if when <= now and not self.busy(m)]
        for m in due:
            self._drop(m)
            _bump(self.unloads, m)
        self._arm()
        return bool(due)

    def _arm(self) -> None:
        """(Re)set the one timer to the next expiry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.expires:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving: expired models are noticed by expire() later
            return
        delay = max(0.0, min(self.expires.values()) - time.monotonic())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.expire():
            self.on_freed()

    # -- lifecycle

    def cancel_loads(self) -> None:
        for task in list(self.loading.values()):
            task.cancel()
        self.loading.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def clear_live(self) -> None:
        """Forget running requests and loads in progress (the server stopped)."""
        self.running.clear()
        self.loading.clear()

    def forget(self) -> None:
        """The process died: nothing is loaded any more (no unload is counted)."""
        self.clear_live()
        self.loaded.clear()
        self.unload_when_idle.clear()
        self.expires.clear()
        self.keep_alive.clear()

    def resume(self) -> None:
        """Serving again after a stop: restart the keep-alive clocks of idle models."""
        for m in self.loaded:
            self._idle_from_now(m)

    def reset_counters(self) -> None:
        self.loads.clear()
        self.total_loads = 0
        self.evictions.clear()
        self.unloads.clear()
