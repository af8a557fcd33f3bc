"""The simulator's settings, declared once: name, default, validator and one-line doc.

``FakeOllama(**settings)``, ``FakeOllama.configure(**settings)``,
``POST /_fake/configure`` and the ``python -m fakeollama`` options (and their
``--help``) all come from :data:`SETTINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .catalog import normalize_model, parse_size
from .wire import duration


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


def _seconds(key: str, value: Any) -> float:
    return float(_num(key, value, integer=False, optional=False, minimum=0))


def _stall(key: str, value: Any) -> float:
    return float(_num(key, value, integer=False, optional=True, minimum=0) or 0.0)


def _count(key: str, value: Any) -> int:
    return int(_num(key, value, integer=True, optional=False, minimum=0))


def _positive_or_none(key: str, value: Any) -> int | None:
    num = _num(key, value, integer=True, optional=True, minimum=1)
    return None if num is None else int(num)


def _count_or_none(key: str, value: Any) -> int | None:
    num = _num(key, value, integer=True, optional=True, minimum=0)
    return None if num is None else int(num)


def _fail_status(key: str, value: Any) -> int | None:
    status = _num(key, value, integer=True, optional=True, minimum=0)
    if status == 0 or status is None:
        return None
    if not 200 <= status <= 599:
        raise ValueError(f"fail_status must be an HTTP status 200..599, got {value!r}")
    return int(status)


def _on_overflow(key: str, value: Any) -> str:
    if value not in ("queue", "crash"):
        raise ValueError(f"on_overflow must be 'queue' or 'crash', got {value!r}")
    return str(value)


def _models(key: str, value: Any) -> tuple[tuple[str, int | None], ...] | None:
    """Names with optional sizes: "a,b:7b=4.7GB", ["a", "b=2GiB"], {"a": None, "b": 2e9} or
    [("a", None), ...]; canonical form: ((name:tag, bytes or None), ...)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    items = value.items() if isinstance(value, dict) else value
    entries: dict[str, int | None] = {}
    for item in items:
        if isinstance(item, list | tuple) and len(item) == 2:
            name, size = item
        else:
            name, _, size = str(item).partition("=")
        name = str(name).strip()
        if not name:
            continue
        try:
            entries[normalize_model(name)] = None if size in (None, "") else parse_size(size)
        except ValueError as exc:
            raise ValueError(f"models: {name}: {exc}") from None
    if not entries:
        raise ValueError("models must name at least one model")
    return tuple(entries.items())


def _size_or_none(key: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _keep_alive(key: str, value: Any) -> float:
    seconds = duration(value)
    if seconds is None:
        raise ValueError(f"{key} must be seconds or a duration such as '5m', got {value!r}")
    return seconds


def _version(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"version must be a non-empty string, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting: its keyword, default, validator (returns the canonical value) and doc."""

    name: str
    default: Any
    validate: Callable[[str, Any], Any]
    doc: str
    metavar: str | None = None  # None: a command-line flag that takes no value
    unset: str = "none"  # what the default None means, for --help
    flag: str | None = None  # the command-line option, when not --NAME-WITH-DASHES
    cli_type: Callable[[str], Any] = str

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "token_interval", 0.01, _seconds, "seconds between streamed tokens", "S", cli_type=float
    ),
    Setting("tokens", 8, _count, "tokens per answer", "N", cli_type=int),
    Setting("load_time", 0.0, _seconds, "seconds to load a model", "S", cli_type=float),
    Setting(
        "vram",
        None,
        _positive_or_none,
        "models loaded at once (OLLAMA_MAX_LOADED_MODELS)",
        "N",
        unset="no limit",
        cli_type=int,
    ),
    Setting(
        "on_overflow",
        "queue",
        _on_overflow,
        "when a model must load and VRAM is full of busy models: 'queue' (wait, in arrival"
        " order, as Ollama does) or 'crash' (answer 500 as a killed runner does)",
        "MODE",
    ),
    Setting(
        "vram_bytes",
        None,
        _size_or_none,
        "VRAM in bytes (e.g. 24GiB): models load while their sizes fit",
        "SIZE",
        unset="no limit",
    ),
    Setting(
        "keep_alive",
        300.0,
        _keep_alive,
        "seconds (or '5m') an idle model stays loaded unless a request says otherwise;"
        " negative: forever",
        "DURATION",
    ),
    Setting(
        "max_queue",
        None,
        _positive_or_none,
        "requests that may wait for a model; more get 503 'server busy' (OLLAMA_MAX_QUEUE)",
        "N",
        cli_type=int,
        unset="no limit",
    ),
    Setting(
        "num_parallel",
        None,
        _positive_or_none,
        "requests one loaded model serves at once, Ollama's NUM_PARALLEL",
        "N",
        unset="no limit",
        cli_type=int,
    ),
    Setting(
        "models",
        None,
        _models,
        "comma-separated installed models, each NAME or NAME=SIZE (e.g. llama3:8b=4.7GB)",
        "NAMES",
        unset="nine built-in models",
    ),
    Setting("version", "0.12.6", _version, "what /api/version answers", "V"),
    Setting(
        "record_requests",
        True,
        _flag,
        "keep no record of each request (they are kept by default)",
        flag="--no-record",
    ),
    Setting(
        "stall",
        0.0,
        _stall,
        "seconds every model request waits before any answer",
        "S",
        cli_type=float,
    ),
    Setting(
        "die_after",
        None,
        _count_or_none,
        "drop every model request's connection after N streamed lines",
        "N",
        unset="never",
        cli_type=int,
    ),
    Setting(
        "fail_status",
        None,
        _fail_status,
        "answer every model request with this HTTP status",
        "CODE",
        unset="never",
        cli_type=int,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SETTINGS_DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def validate_setting(key: str, value: Any) -> Any:
    """Check one setting and return it in canonical form; ValueError if it is wrong."""
    setting = BY_NAME.get(key)
    if setting is None:
        raise TypeError(f"unknown setting {key!r}")
    return setting.validate(key, value)
