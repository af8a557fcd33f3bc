"""One typed settings object, read and validated from the environment at start-up.

Every variable is optional. An invalid value raises ``SettingsError`` whose
message names the variable, so a misconfigured gate never starts half-working.
Tests build ``Settings(...)`` directly instead of editing ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from endpoints import normalize_model
from fleet.config import (
    Backend,
    BackendsError,
    from_upstreams,
    load_backends_file,
    parse_upstreams,
)
from limiter.keys import load_keys
from limiter.policy import normalize_limit

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value the gate cannot use."""


# Small pure validators in the manner of gunicorn's config.validate_*.
def validate_pos_int(value: str) -> int:
    number = int(value.strip())
    if number < 1:
        raise ValueError("must be a whole number of 1 or more")
    return number


def validate_non_neg_int(value: str) -> int:
    number = int(value.strip())
    if number < 0:
        raise ValueError("must be a whole number of 0 or more")
    return number


def validate_pos_float(value: str) -> float:
    number = float(value.strip())
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a number of seconds above 0")
    return number


def validate_non_neg_float(value: str) -> float:
    number = float(value.strip())
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a number of seconds of 0 or more")
    return number


def validate_upstream(value: str) -> str:
    """One URL or a comma-separated list of them, written back as ``url,url``."""
    return ",".join(parse_upstreams(value))


def validate_bind(value: str) -> str:
    value = value.strip()
    if value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT or unix:PATH, not {value!r}")
    return value


def validate_overrides(value: str) -> dict[str, int]:
    overrides: dict[str, int] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, count = item.rpartition("=")
        if not sep or not model.strip():
            raise ValueError(f"expected model=n, got {item!r}")
        try:
            overrides[normalize_model(model)] = validate_pos_int(count)
        except ValueError:
            raise ValueError(f"{item!r}: the count must be a whole number of 1 or more") from None
    return overrides


def validate_access(value: str) -> str:
    value = value.strip().lower()
    if value not in ("public", "admin", "local"):
        raise ValueError("must be one of public, admin, local")
    return value


def validate_limit(value: str) -> str:
    # limiter.policy speaks the limits library's grammar without importing it (see there).
    return normalize_limit(value)


def validate_token_budget(value: str) -> int:
    value = value.strip()
    if value.lower() == "off":
        return 0
    try:
        return validate_non_neg_int(value)
    except ValueError:
        raise ValueError("must be a whole number of tokens per minute, or 'off'") from None


def validate_storage(value: str) -> str:
    value = value.strip()
    scheme = value.partition("://")[0]
    if scheme not in ("memory", "redis", "rediss", "redis+unix"):
        raise ValueError("must be memory:// or a redis:// URL")
    return value


def validate_path(value: str) -> str | None:
    return value.strip() or None


def validate_backends_file(value: str) -> str | None:
    """The backends file's path; the file is read and checked in ``Settings.check``."""
    return validate_path(value)


def validate_keys_file(value: str) -> str | None:
    """The keys file's path, once the file has been read and checked (errors name file and line)."""
    path = validate_path(value)
    if path is not None:
        load_keys(path)
    return path


@dataclass(frozen=True)
class Settings:
    """Everything the gate reads from its environment (see README, "Settings")."""

    upstream: str = "http://127.0.0.1:11434"  # one URL, or several joined by commas
    backends_file: str | None = None
    bind: str = "127.0.0.1:8000"
    workers: int = 1
    upstream_timeout: float = 600.0
    limit_inference: str = "60/minute;5/second"
    limit_embed: str = "600/minute;50/second"
    limit_admin: str = "30/minute"
    limit_light: str = "3000/minute;100/second"
    storage_uri: str = "memory://"
    api_keys_file: str | None = None
    anon_tokens_per_minute: int = 0  # token budget of each client without an API key; 0: none
    trusted_proxies: int = 0
    model_concurrency: int = 1
    model_concurrency_overrides: Mapping[str, int] = field(default_factory=dict)
    max_active_models: int = 1
    queue_max: int = 512
    queue_max_per_client: int = 32
    queue_timeout: float = 300.0
    switch_after: float = 10.0
    admin_concurrency: int = 1
    queue_lease: float = 15.0  # seconds a shared slot outlives its process (docs/SHARED_QUEUE.md)
    max_body: int = 64 * 1024 * 1024
    status_access: str = "public"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate every GATE_* variable; raise SettingsError naming the bad one."""
        values: dict[str, Any] = {}

        def read(name: str, attr: str, validate: Callable[[str], T]) -> None:
            raw = environ.get(name)
            if raw is None or (raw.strip() == "" and attr != "api_keys_file"):
                return
            try:
                values[attr] = validate(raw)
            except ValueError as exc:
                detail = str(exc)
                if detail.startswith(("invalid literal", "could not convert")):
                    detail = "must be a number"
                raise SettingsError(f"{name}={raw!r}: {detail}") from None

        # The seed's variable: when set, it is the default for inference and embed.
        read("OLLAMA_RATE_LIMIT", "limit_inference", validate_limit)
        read("OLLAMA_RATE_LIMIT", "limit_embed", validate_limit)
        read("GATE_UPSTREAM", "upstream", validate_upstream)
        read("GATE_BACKENDS_FILE", "backends_file", validate_backends_file)
        read("GATE_BIND", "bind", validate_bind)
        read("GATE_WORKERS", "workers", validate_pos_int)
        read("GATE_UPSTREAM_TIMEOUT", "upstream_timeout", validate_pos_float)
        read("GATE_LIMIT_INFERENCE", "limit_inference", validate_limit)
        read("GATE_LIMIT_EMBED", "limit_embed", validate_limit)
        read("GATE_LIMIT_ADMIN", "limit_admin", validate_limit)
        read("GATE_LIMIT_LIGHT", "limit_light", validate_limit)
        read("GATE_STORAGE_URI", "storage_uri", validate_storage)
        read("GATE_API_KEYS_FILE", "api_keys_file", validate_keys_file)
        read("GATE_ANON_TOKENS_PER_MINUTE", "anon_tokens_per_minute", validate_token_budget)
        read("GATE_TRUSTED_PROXIES", "trusted_proxies", validate_non_neg_int)
        read("GATE_MODEL_CONCURRENCY", "model_concurrency", validate_pos_int)
        read("GATE_MODEL_CONCURRENCY_OVERRIDES", "model_concurrency_overrides", validate_overrides)
        read("GATE_MAX_ACTIVE_MODELS", "max_active_models", validate_pos_int)
        read("GATE_QUEUE_MAX", "queue_max", validate_pos_int)
        read("GATE_QUEUE_MAX_PER_CLIENT", "queue_max_per_client", validate_pos_int)
        read("GATE_QUEUE_TIMEOUT", "queue_timeout", validate_pos_float)
        read("GATE_SWITCH_AFTER", "switch_after", validate_non_neg_float)
        read("GATE_ADMIN_CONCURRENCY", "admin_concurrency", validate_pos_int)
        read("GATE_QUEUE_LEASE", "queue_lease", validate_pos_float)
        read("GATE_MAX_BODY", "max_body", validate_pos_int)
        read("GATE_STATUS_ACCESS", "status_access", validate_access)
        settings = cls(**values)
        settings.check()
        return settings.fleet_of_one()

    def check(self) -> None:
        """Cross-field rules that no single variable can check alone."""
        if self.workers > 1 and self.storage_uri.startswith("memory://"):
            raise SettingsError(
                f"GATE_WORKERS={self.workers} needs GATE_STORAGE_URI=redis://...: with "
                "memory:// every worker keeps its own limits and slots, so the GPU would "
                "see GATE_WORKERS times the configured concurrency"
            )

        backends = self.backends()
        if len(backends) > 1:
            source = "GATE_BACKENDS_FILE" if self.backends_file else "GATE_UPSTREAM"
            raise SettingsError(
                f"{source} names {len(backends)} backends "
                f"({', '.join(backend.name for backend in backends)}); the gate serves one"
            )
        only = backends[0]
        if only.vram is not None or only.models:
            raise SettingsError(
                f"GATE_BACKENDS_FILE: backend {only.name!r}: 'vram' and 'models' apply "
                "to a fleet of several backends; remove them for a single backend"
            )

    def backends(self) -> tuple[Backend, ...]:
        """The backends: GATE_BACKENDS_FILE's tables, else one per GATE_UPSTREAM URL.

        Backends that do not set ``max_models`` or ``model_concurrency`` take
        GATE_MAX_ACTIVE_MODELS and GATE_MODEL_CONCURRENCY.
        """
        defaults = {
            "max_models": self.max_active_models,
            "model_concurrency": self.model_concurrency,
        }
        try:
            if self.backends_file is not None:
                return load_backends_file(self.backends_file, **defaults)
            return from_upstreams(parse_upstreams(self.upstream), **defaults)
        except BackendsError as exc:
            variable = "GATE_BACKENDS_FILE" if self.backends_file else "GATE_UPSTREAM"
            raise SettingsError(f"{variable}: {exc}") from None
        except ValueError as exc:
            raise SettingsError(f"GATE_UPSTREAM={self.upstream!r}: {exc}") from None

    def fleet_of_one(self) -> Settings:
        """These settings with a single backend's own limits in the gate-wide fields."""
        if self.backends_file is None:
            return self
        only = self.backends()[0]
        return self.replace(
            upstream=only.url,
            max_active_models=only.max_models,
            model_concurrency=only.model_concurrency,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests use this)."""
        return dataclasses.replace(self, **changes)

    def concurrency_for(self, model: str) -> int:
        """Jobs ``model`` may run at once."""
        return self.model_concurrency_overrides.get(model, self.model_concurrency)
