"""What the gate knows of each backend: health, installed models, loaded models.

Pure state, fed by the pollers (``/api/version`` probes, ``/api/tags``, ``/api/ps``) and
by the proxy's passive signals, each stamped with the caller's monotonic ``now``. It
answers the questions asked before a request is queued ("is this model installed
anywhere?") and gives the placement core its ``View`` of each backend.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from endpoints import normalize_model

from .config import Backend
from .placement import View

# A backend that went down rejoins after this many good probes in a row.
REJOIN_AFTER = 2
# Timeouts and 5xx answers in a row (no success between) that take a backend down;
# a refused connection takes it down at once.
FAIL_AFTER = 3


class Health(enum.Enum):
    UNKNOWN = "unknown"  # not probed yet
    UP = "up"
    DOWN = "down"


class Where(enum.Enum):
    """Where a model is, as far as the catalogue knows."""

    INSTALLED = "installed"  # on a healthy backend that may run it
    DOWN = "down"  # only on backends that are down: 503 with Retry-After
    MISSING = "missing"  # on no backend that may run it: Ollama's 404
    UNKNOWN = "unknown"  # some backend's models are not known yet: as an unreachable upstream


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model loaded on a backend (one /api/ps entry)."""

    size: int
    size_vram: int
    expires_at: str | None


@dataclass(slots=True)
class BackendState:
    backend: Backend
    health: Health = Health.UNKNOWN
    good_probes: int = 0  # consecutive, while down
    failures: int = 0  # consecutive passive failures
    last_probe: float | None = None
    last_error: str | None = None
    version: str | None = None
    installed: dict[str, int] | None = None  # model -> size; None: not read yet
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # /api/tags entries
    tags_at: float | None = None
    loaded: dict[str, Loaded] | None = None  # None: not read yet
    loaded_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    ps_at: float | None = None
    loads: int = 0
    evictions: int = 0

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def up(self) -> bool:
        return self.health is Health.UP


class Catalogue:
    """Health and models of every backend, from probes, polls and passive signals."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rejoin_after: int = REJOIN_AFTER,
        fail_after: int = FAIL_AFTER,
    ) -> None:
        if rejoin_after < 1 or fail_after < 1:
            raise ValueError("rejoin_after and fail_after must be 1 or more")
        self.rejoin_after = rejoin_after
        self.fail_after = fail_after
        self._states = {backend.name: BackendState(backend) for backend in backends}

    @property
    def states(self) -> list[BackendState]:
        return list(self._states.values())

    def state(self, name: str) -> BackendState:
        return self._states[name]

    # Health

    def probe_ok(self, name: str, now: float, version: str | None = None) -> bool:
        """A good ``/api/version`` probe; return whether the backend came up."""
        state = self._states[name]
        state.last_probe = now
        state.version = version or state.version
        state.failures = 0
        if state.health is Health.UP:
            return False
        if state.health is Health.DOWN:
            state.good_probes += 1
            if state.good_probes < self.rejoin_after:
                return False
        state.health = Health.UP
        state.good_probes = 0
        state.last_error = None
        return True

    def probe_failed(self, name: str, now: float, reason: str) -> bool:
        """A failed probe; return whether the backend went down."""
        state = self._states[name]
        state.last_probe = now
        return self._down(state, reason)

    def passive_failure(self, name: str, reason: str, *, refused: bool = False) -> bool:
        """A request to the backend failed (refused, timed out, 5xx other than "busy").

        A refused connection takes the backend down at once; other failures after
        ``fail_after`` in a row. Return whether it went down.
        """
        state = self._states[name]
        state.failures += 1
        if refused or state.failures >= self.fail_after:
            return self._down(state, reason)
        state.last_error = reason
        return False

    def passive_success(self, name: str) -> None:
        """A request to the backend got an answer: its run of failures ends."""
        self._states[name].failures = 0

    def _down(self, state: BackendState, reason: str) -> bool:
        state.good_probes = 0
        state.last_error = reason
        if state.health is Health.DOWN:
            return False
        state.health = Health.DOWN
        state.failures = 0
        # A backend that comes back has lost what it had loaded; /api/ps says again.
        state.loaded = None
        state.loaded_entries = {}
        return True

    # Models

    def read_tags(self, name: str, body: Any, now: float) -> None:
        """The backend's ``/api/tags`` answer: its installed models and their sizes."""
        state = self._states[name]
        entries = _entries(body)
        state.entries = entries
        state.installed = {model: _size(entry.get("size")) for model, entry in entries.items()}
        state.tags_at = now

    def read_ps(self, name: str, body: Any, now: float) -> None:
        """The backend's ``/api/ps`` answer: its loaded models; counts loads and evictions."""
        state = self._states[name]
        entries = _entries(body)
        loaded = {
            model: Loaded(
                size=_size(entry.get("size")),
                size_vram=_size(entry.get("size_vram")),
                expires_at=entry.get("expires_at")
                if isinstance(entry.get("expires_at"), str)
                else None,
            )
            for model, entry in entries.items()
        }
        if state.loaded is not None:
            state.loads += len(loaded.keys() - state.loaded.keys())
            state.evictions += len(state.loaded.keys() - loaded.keys())
        state.loaded = loaded
        state.loaded_entries = entries
        state.ps_at = now

    def forget_model(self, name: str, model: str) -> None:
        """The backend answered 404 for ``model``: it is not installed there (until re-read)."""
        state = self._states[name]
        model = normalize_model(model)
        if state.installed is not None:
            state.installed.pop(model, None)
            state.entries.pop(model, None)

    # Questions

    def where(self, model: str) -> Where:
        """Whether ``model`` can run now, exists only on down backends, is missing, or unknown."""
        model = normalize_model(model)
        allowed = [state for state in self._states.values() if state.backend.allows(model)]
        if any(state.up and state.installed and model in state.installed for state in allowed):
            return Where.INSTALLED
        if any(state.installed is None for state in allowed):
            return Where.UNKNOWN
        if any(state.installed and model in state.installed for state in allowed):
            return Where.DOWN
        return Where.MISSING

    def holders(self, model: str) -> list[str]:
        """Healthy backends that have ``model`` installed and may run it, in configured order."""
        model = normalize_model(model)
        return [
            state.name
            for state in self._states.values()
            if state.up
            and state.installed is not None
            and model in state.installed
            and state.backend.allows(model)
        ]

    def healthy(self) -> list[str]:
        return [state.name for state in self._states.values() if state.up]

    def view(self, name: str) -> View:
        """The placement core's view of backend ``name``.

        A backend takes jobs once it is up and its installed models are known: before
        that, any model could be sent to it, and it would answer 404.
        """
        state = self._states[name]
        loaded = state.loaded or {}
        return View(
            healthy=state.up and state.installed is not None,
            installed=None if state.installed is None else dict(state.installed),
            loaded={model: item.size_vram or item.size for model, item in loaded.items()},
        )

    def tags(self, allowed: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """``/api/tags`` over the fleet: installed models of healthy backends, each once."""
        return self._union((state.entries for state in self._states.values() if state.up), allowed)

    def ps(self) -> list[dict[str, Any]]:
        """``/api/ps`` over the fleet: loaded models of healthy backends, each once."""
        return self._union(
            (state.loaded_entries for state in self._states.values() if state.up), None
        )

    def _union(
        self, tables: Iterable[Mapping[str, dict[str, Any]]], allowed: Iterable[str] | None
    ) -> list[dict[str, Any]]:
        keep = None if allowed is None else set(allowed)
        seen: dict[str, dict[str, Any]] = {}
        for table in tables:
            for model, entry in table.items():
                if keep is None or model in keep:
                    seen.setdefault(model, entry)
        return [seen[model] for model in sorted(seen)]

    def snapshot(self) -> list[dict[str, Any]]:
        """Plain data per backend for the status page."""
        rows = []
        for state in self._states.values():
            backend = state.backend
            loaded = state.loaded or {}
            rows.append(
                {
                    "name": backend.name,
                    "url": backend.url,
                    "health": state.health.value,
                    "last_probe": state.last_probe,
                    "last_error": state.last_error,
                    "version": state.version,
                    "installed": None if state.installed is None else len(state.installed),
                    "loaded": {
                        model: {
                            "size_vram": item.size_vram,
                            "expires_at": item.expires_at,
                        }
                        for model, item in sorted(loaded.items())
                    },
                    "vram_used": sum(item.size_vram for item in loaded.values()),
                    "vram": backend.vram,
                    "max_models": backend.max_models,
                    "loads": state.loads,
                    "evictions": state.evictions,
                }
            )
        return rows


def _entries(body: Any) -> dict[str, dict[str, Any]]:
    """The model entries of a ``/api/tags`` or ``/api/ps`` answer, by normalised name."""
    models = body.get("models") if isinstance(body, dict) else None
    entries: dict[str, dict[str, Any]] = {}
    for entry in models if isinstance(models, list) else ():
        if not isinstance(entry, dict):
            continue
        name = entry.get("model") or entry.get("name")
        if isinstance(name, str) and name.strip():
            entries[normalize_model(name)] = entry
    return entries


def _size(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
