"""The backends the gate sends work to: read from GATE_UPSTREAM or GATE_BACKENDS_FILE.

Pure: no sockets, no clocks. Every error is a ``BackendsError`` whose message names the
file, the backend and the field, so a misconfigured fleet never starts half-working.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from endpoints import normalize_model

DEFAULT_UPSTREAM = "http://127.0.0.1:11434"

FIELDS = frozenset({"url", "max_models", "vram", "model_concurrency", "models", "weight"})

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class BackendsError(ValueError):
    """The backends' configuration cannot be used."""


@dataclass(frozen=True, slots=True)
class Backend:
    """One Ollama server and what the gate may ask of it."""

    name: str
    url: str
    max_models: int
    model_concurrency: int
    vram: int | None = None  # bytes; None: no budget, only max_models counts
    models: tuple[str, ...] = ()  # globs; empty: every model may run here
    weight: float = 1.0

    def allows(self, model: str) -> bool:
        """Whether ``model`` (normalised) may run here (its ``models`` globs, if any)."""
        if not self.models:
            return True
        return any(_glob_matches(pattern, model) for pattern in self.models)


def _glob_matches(pattern: str, model: str) -> bool:
    # "nomic-embed-text" names "nomic-embed-text:latest", as a request would.
    return fnmatchcase(model, pattern) or fnmatchcase(model, normalize_model(pattern))


def parse_url(value: str) -> str:
    """One backend URL, without a trailing slash; ValueError says what is wrong."""
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, not {value.strip()!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{value.strip()!r} must not carry a query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"{value.strip()!r}: Port out of range 0-65535") from None
    return url


def parse_upstreams(value: str) -> tuple[str, ...]:
    """GATE_UPSTREAM: one URL or a comma-separated list of distinct URLs."""
    urls = [parse_url(part) for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("must be an http:// or https:// URL, or a comma-separated list of them")
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise ValueError(f"{url} is listed twice")
        seen.add(url)
    return tuple(urls)


def host_port(url: str) -> str:
    """A backend's default name: its URL's host:port (the scheme's port when none is given)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_size(value: object) -> int:
    """A VRAM budget: bytes, or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB."""
    if isinstance(value, bool):
        raise ValueError("must be bytes or a size such as '24GiB'")
    if isinstance(value, int):
        number: float = value
        unit = ""
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(
                f"unknown unit {match.group(2)!r} in {value!r}: use bytes, KB, MB, GB, TB, "
                "KiB, MiB, GiB or TiB"
            )
    else:
        raise ValueError(f"must be bytes or a size such as '24GiB', not {value!r}")
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"must be above 0, not {value!r}")
    return size


def from_upstreams(
    urls: Iterable[str], *, max_models: int, model_concurrency: int
) -> tuple[Backend, ...]:
    """Backends from GATE_UPSTREAM's URLs, named host:port, with the global defaults."""
    backends = tuple(
        Backend(
            name=host_port(url),
            url=url,
            max_models=max_models,
            model_concurrency=model_concurrency,
        )
        for url in urls
    )
    _check_unique(backends, "GATE_UPSTREAM")
    return backends


def load_backends_file(
    path: str, *, max_models: int, model_concurrency: int
) -> tuple[Backend, ...]:
    """Backends from a TOML file of ``[backends.NAME]`` tables; errors name file, backend, field."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise BackendsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BackendsError(f"{path}: not valid TOML: {exc}") from None
    return parse_backends(
        data, source=path, max_models=max_models, model_concurrency=model_concurrency
    )


def parse_backends(
    data: Mapping[str, Any], *, source: str, max_models: int, model_concurrency: int
) -> tuple[Backend, ...]:
    """Backends from a parsed backends file (see ``load_backends_file``)."""
    unknown = sorted(set(data) - {"backends"})
    if unknown:
        raise BackendsError(f"{source}: unknown table {unknown[0]!r}; expected [backends.NAME]")
    tables = data.get("backends")
    if not isinstance(tables, dict) or not tables:
        raise BackendsError(f"{source}: no backends; add at least one [backends.NAME] table")
    backends = []
    for name, table in tables.items():
        where = f"{source}: backend {name!r}"
        if not _NAME.match(name):
            raise BackendsError(
                f"{where}: a name is 1-64 letters, digits, '.', '_', ':' or '-', "
                "starting with a letter or digit"
            )
        if not isinstance(table, dict):
            raise BackendsError(f"{where}: must be a table ([backends.{name}])")
        backends.append(_parse_backend(name, table, where, max_models, model_concurrency))
    result = tuple(backends)
    _check_unique(result, source)
    return result


def _parse_backend(
    name: str, table: Mapping[str, Any], where: str, max_models: int, model_concurrency: int
) -> Backend:
    unknown = sorted(set(table) - FIELDS)
    if unknown:
        raise BackendsError(
            f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}"
        )
    if "url" not in table:
        raise BackendsError(f"{where}: field 'url' is required")

    def field(key: str, parse: Any, default: Any) -> Any:
        if key not in table:
            return default
        try:
            return parse(table[key])
        except (ValueError, TypeError) as exc:
            raise BackendsError(f"{where}: field {key!r}: {exc}") from None

    return Backend(
        name=name,
        url=field("url", _parse_url_field, None),
        max_models=field("max_models", _pos_int, max_models),
        model_concurrency=field("model_concurrency", _pos_int, model_concurrency),
        vram=field("vram", parse_size, None),
        models=field("models", _globs, ()),
        weight=field("weight", _weight, 1.0),
    )


def _parse_url_field(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string URL, not {value!r}")
    return parse_url(value)


def _pos_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number of 1 or more, not {value!r}")
    return value


def _weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number above 0, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a number above 0, not {value!r}")
    return float(value)


def _globs(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of model names or globs")
    globs = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{item!r} is not a model name or glob")
        globs.append(item.strip())
    return tuple(globs)


def _check_unique(backends: tuple[Backend, ...], source: str) -> None:
    names: dict[str, Backend] = {}
    urls: dict[str, Backend] = {}
    for backend in backends:
        if backend.name in names:
            raise BackendsError(f"{source}: two backends are named {backend.name!r}")
        if backend.url in urls:
            raise BackendsError(
                f"{source}: backends {urls[backend.url].name!r} and {backend.name!r} "
                f"have the same url {backend.url}"
            )
        names[backend.name] = urls[backend.url] = backend
