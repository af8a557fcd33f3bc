"""Every setting of the gate, declared once, read and validated from the environment.

Each field of ``Settings`` is one declaration, in the manner of gunicorn's
``config.py``: the environment variable, the type (the annotation), the default,
a small pure validator and a one-line doc. From those declarations come the
parsing of the environment (``Settings.from_env``, used by the app and by
gunicorn.conf.py alike), the warning about unknown ``GATE_*`` variables, the
start-up line that says what the gate runs with, and the README's settings table
(``python -m settings --markdown``; tests/test_settings.py checks the README).

Every variable is optional. An invalid value raises ``SettingsError`` whose
message names the variable, so a misconfigured gate never starts half-working.
Tests build ``Settings(...)`` directly instead of editing ``os.environ``.

gunicorn's master imports this module before gevent patches the workers: it
imports only the standard library, ``endpoints`` and the Flask-free parts of
``limiter`` (``policy``, ``keys``), ``fleet.config`` and the work queue's pure
``workqueue.core``; tests/test_settings.py holds it to that.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from endpoints import CLASSES, normalize_model
from fleet.config import (
    Backend,
    BackendsError,
    from_upstreams,
    load_backends_file,
    parse_upstreams,
)
from limiter.keys import load_keys
from limiter.policy import normalize_limit
from workqueue.core import PRIORITIES


class SettingsError(ValueError):
    """A setting has a value the gate cannot use."""


# Small pure validators in the manner of gunicorn's config.validate_*: each takes the
# variable's text and returns the value, or raises ValueError saying what is wrong.
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
    """One URL or a comma-separated list of them (fleet/config.py), written back as ``url,url``."""
    for part in value.split(","):
        url = part.strip().rstrip("/")
        if url and "://" not in url:
            raise ValueError(f"must be an http:// or https:// URL: did you mean 'http://{url}'?")
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


def validate_choice(*choices: str) -> Callable[[str], str]:
    """A validator accepting one of ``choices``, in any case."""

    def validate(value: str) -> str:
        value = value.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return validate


validate_access = validate_choice("public", "admin", "local")
validate_priority = validate_choice(*PRIORITIES)
validate_log_level = validate_choice("debug", "info", "warning", "error", "critical")


def validate_flag(value: str) -> bool:
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 (on) or 0 (off)")


def validate_access_log(value: str) -> str:
    """GATE_ACCESS_LOG: "off", "text" (1, on, true, yes, text) or "json"."""
    text = value.strip().lower()
    if text == "json":
        return "json"
    if text == "text":
        return "text"
    try:
        return "text" if validate_flag(text) else "off"
    except ValueError:
        raise ValueError("must be 1 (on) or 0 (off), or json for JSON lines") from None


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
class Var:
    """How one ``Settings`` field is read: its variable, validator and doc (the declaration)."""

    env: str
    validate: Callable[[str], Any]
    doc: str
    # The README's default column when the default value itself would mislead (0 for "off").
    shown: str | None = None
    # A variable whose value stands in for this one's default when this one is unset.
    fallback: str | None = None


@dataclass(frozen=True)
class Alias:
    """A variable that sets no field itself but the default of others (``Var.fallback``)."""

    env: str
    doc: str


# The seed's variable, kept: when set, it is the default of GATE_LIMIT_INFERENCE and _EMBED.
OLLAMA_RATE_LIMIT = Alias(
    "OLLAMA_RATE_LIMIT", "when set, the default of GATE_LIMIT_INFERENCE and GATE_LIMIT_EMBED"
)
ALIASES = (OLLAMA_RATE_LIMIT,)


def setting(
    env: str,
    default: Any,
    validate: Callable[[str], Any],
    doc: str,
    *,
    shown: str | None = None,
    fallback: Alias | None = None,
) -> Any:
    """Declare one setting: a dataclass field carrying its ``Var`` in its metadata."""
    var = Var(env, validate, doc, shown, fallback.env if fallback else None)
    metadata = {"setting": var}
    if isinstance(default, dict):
        frozen = dict(default)
        return dataclasses.field(default_factory=lambda: dict(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the gate reads from its environment (see README, "Settings")."""

    upstream: str = setting(
        "GATE_UPSTREAM",
        "http://127.0.0.1:11434",
        validate_upstream,
        "Ollama base URL; a comma-separated list names several backends, each named by its "
        "host:port ([docs/DESIGN.md](docs/DESIGN.md#backends-fleet))",
    )
    backends_file: str | None = setting(
        "GATE_BACKENDS_FILE",
        None,
        validate_backends_file,
        "TOML file of `[backends.NAME]` tables (`url`, `max_models`, `vram`, "
        "`model_concurrency`, `models`, `weight`; "
        "[docs/DESIGN.md](docs/DESIGN.md#backends-fleet)); "
        "overrides GATE_UPSTREAM; a single backend's `max_models` and `model_concurrency` take "
        "the place of GATE_MAX_ACTIVE_MODELS and GATE_MODEL_CONCURRENCY",
    )
    bind: str = setting(
        "GATE_BIND", "127.0.0.1:8000", validate_bind, "listen address, `HOST:PORT` or `unix:PATH`"
    )
    workers: int = setting(
        "GATE_WORKERS",
        1,
        validate_pos_int,
        "gunicorn worker processes; more than 1 needs `GATE_STORAGE_URI=redis://…`",
    )
    worker_connections: int = setting(
        "GATE_WORKER_CONNECTIONS",
        10000,
        validate_pos_int,
        "connections one worker holds (streams + waiting jobs); also the size of its pool of "
        "upstream connections",
    )
    graceful_timeout: int = setting(
        "GATE_GRACEFUL_TIMEOUT",
        120,
        validate_non_neg_int,
        "seconds running streams get to finish on SIGTERM",
    )
    upstream_timeout: float = setting(
        "GATE_UPSTREAM_TIMEOUT",
        600.0,
        validate_pos_float,
        "seconds to wait for the upstream's response headers (cold loads are slow), "
        "and for each next piece of a streamed answer",
    )
    max_body: int = setting(
        "GATE_MAX_BODY",
        64 * 1024 * 1024,
        validate_pos_int,
        "request body bytes (blob uploads exempt: streamed)",
    )
    log_level: str = setting(
        "GATE_LOG_LEVEL",
        "info",
        validate_log_level,
        "log level of the gate and gunicorn: debug, info, warning, error or critical",
    )
    access_log: str = setting(
        "GATE_ACCESS_LOG",
        "off",
        validate_access_log,
        "`1` logs one line per request (logfmt), `json` one JSON object per request, to "
        "stdout ([docs/STATUS.md](docs/STATUS.md#access-log))",
        shown="unset",
    )
    limit_inference: str = setting(
        "GATE_LIMIT_INFERENCE",
        # No window shorter than a minute on the queued classes: bursts are the queue's
        # to shape (docs/LIMITS.md, "Why these defaults").
        "120/minute",
        validate_limit,
        "limit per client for the inference class (Flask-Limiter strings, `;`-separated; "
        "`off` disables, and with no token budget inference calls take the faster light "
        "lane, see Benchmarks)",
        fallback=OLLAMA_RATE_LIMIT,
    )
    limit_embed: str = setting(
        "GATE_LIMIT_EMBED",
        "1200/minute",
        validate_limit,
        "limit per client for the embed class (`off`: as for inference)",
        fallback=OLLAMA_RATE_LIMIT,
    )
    limit_admin: str = setting(
        "GATE_LIMIT_ADMIN", "30/minute", validate_limit, "limit per client for the admin class"
    )
    limit_light: str = setting(
        "GATE_LIMIT_LIGHT",
        "3000/minute;100/second",
        validate_limit,
        "limit per client for the light class (`off`: light reads take the faster light lane, "
        "see Benchmarks)",
    )
    auth_fail_limit: str = setting(
        "GATE_AUTH_FAIL_LIMIT",
        "20/minute",
        validate_limit,
        "failed API keys one address may present; past it the address gets 429 for the rest "
        "of the window, whatever key it sends (`off` disables)",
    )
    storage_uri: str = setting(
        "GATE_STORAGE_URI",
        "memory://",
        validate_storage,
        "where limit counts and the work queue live: `memory://` (this worker) or "
        "`redis://host:6379/0` (shared by workers and hosts)",
    )
    api_keys_file: str | None = setting(
        "GATE_API_KEYS_FILE",
        None,
        validate_keys_file,
        "TOML file of API keys (below); unset = open access, clients counted by address",
    )
    trusted_proxies: int = setting(
        "GATE_TRUSTED_PROXIES",
        0,
        validate_non_neg_int,
        "proxy hops whose X-Forwarded-For is trusted (1 behind one nginx)",
    )
    anon_tokens_per_minute: int = setting(
        "GATE_ANON_TOKENS_PER_MINUTE",
        0,
        validate_token_budget,
        "token budget of each client counted by address (without a keys file)",
        shown="off",
    )
    model_concurrency: int = setting(
        "GATE_MODEL_CONCURRENCY",
        1,
        validate_pos_int,
        "jobs one model may run at once (like OLLAMA_NUM_PARALLEL)",
    )
    model_concurrency_overrides: Mapping[str, int] = setting(
        "GATE_MODEL_CONCURRENCY_OVERRIDES",
        {},
        validate_overrides,
        "`model=n,model=n`, e.g. `nomic-embed-text=4`",
    )
    max_active_models: int = setting(
        "GATE_MAX_ACTIVE_MODELS",
        1,
        validate_pos_int,
        "distinct models with jobs running at once (what fits in VRAM)",
    )
    queue_max: int = setting(
        "GATE_QUEUE_MAX", 512, validate_pos_int, "waiting jobs, all models (like OLLAMA_MAX_QUEUE)"
    )
    queue_max_per_client: int = setting(
        "GATE_QUEUE_MAX_PER_CLIENT", 32, validate_pos_int, "waiting jobs of one client"
    )
    queue_timeout: float = setting(
        "GATE_QUEUE_TIMEOUT", 300.0, validate_pos_float, "seconds a job may wait for a slot"
    )
    switch_after: float = setting(
        "GATE_SWITCH_AFTER",
        10.0,
        validate_non_neg_float,
        "seconds a job for another model may wait before the running models stop taking new jobs",
    )
    unload_on_switch: bool = setting(
        "GATE_UNLOAD_ON_SWITCH",
        False,
        validate_flag,
        "several backends: `1` unloads (`keep_alive: 0`) the idle model a new place replaces "
        "before its first job is sent; `0` leaves the eviction to Ollama "
        "([docs/DESIGN.md](docs/DESIGN.md#backends-fleet))",
        shown="0",
    )
    admin_concurrency: int = setting(
        "GATE_ADMIN_CONCURRENCY", 1, validate_pos_int, "pull/push/create jobs at once"
    )
    priority_aging: float = setting(
        "GATE_PRIORITY_AGING",
        60.0,
        validate_pos_float,
        "seconds a job may be its client's next job of its class before it is served ahead "
        "of every class ([docs/DESIGN.md](docs/DESIGN.md#priority-classes))",
    )
    anon_priority: str = setting(
        "GATE_ANON_PRIORITY",
        "normal",
        validate_priority,
        "priority class of clients without an API key (no GATE_API_KEYS_FILE): "
        "`interactive`, `normal` or `batch`",
    )
    queue_lease: float = setting(
        "GATE_QUEUE_LEASE",
        15.0,
        validate_pos_float,
        "with Redis: seconds a job's slot outlives a killed worker or host "
        "(renewed every third of it)",
    )
    status_access: str = setting(
        "GATE_STATUS_ACCESS",
        "public",
        validate_access,
        "`public`, `admin` (admin API key) or `local` (loopback) for /gate/* and /metrics "
        "([docs/STATUS.md](docs/STATUS.md#gate_status_access))",
    )
    status_mask_clients: bool = setting(
        "GATE_STATUS_MASK_CLIENTS",
        True,
        validate_flag,
        "`1`: the status page shows client addresses partly masked (`203.0.113.x`); `0`: in "
        "full ([docs/STATUS.md](docs/STATUS.md#gate_status_mask_clients))",
        shown="1",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate every variable; raise SettingsError naming the bad one.

        A variable that is unset or blank leaves the field's default.
        """
        values: dict[str, Any] = {}
        for name, var in declarations():
            for env in (var.fallback, var.env):
                raw = environ.get(env) if env else None
                if raw is None or not raw.strip():
                    continue
                try:
                    values[name] = var.validate(raw)
                except ValueError as exc:
                    detail = str(exc)
                    if detail.startswith(("invalid literal", "could not convert")):
                        detail = "must be a number"
                    raise SettingsError(f"{env}={raw!r}: {detail}") from None
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
            return
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

    def describe(self) -> str:
        """The effective configuration in one log line; a storage password is masked."""
        if self.api_keys_file:
            keys = f"{len(load_keys(self.api_keys_file))} API keys from {self.api_keys_file}"
        else:
            keys = "no API keys (open access, clients counted by address)"
        limits = ", ".join(f"{cls} {getattr(self, 'limit_' + cls)}" for cls in CLASSES)
        if self.anon_tokens_per_minute:
            limits += f", {self.anon_tokens_per_minute} tokens/minute per address"
        per_model = "".join(
            f", {model} {count}"
            for model, count in sorted(self.model_concurrency_overrides.items())
        )
        upstream = f"upstream {self.upstream}"
        if self.backends_file:
            upstream += f" (from {self.backends_file})"
        return (
            f"{upstream}; {keys}; limits per client: {limits}; "
            f"queue: {self.queue_max} waiting at most, {self.queue_max_per_client} per client, "
            f"{self.queue_timeout:g} s timeout, "
            f"jobs per model {self.model_concurrency}{per_model}, "
            f"active models {self.max_active_models}, admin jobs {self.admin_concurrency}; "
            f"storage {mask_password(self.storage_uri)}; status access {self.status_access}; "
            f"workers {self.workers}"
        )


def declarations() -> Iterator[tuple[str, Var]]:
    """(field name, declaration) of every setting, in the README's order."""
    for f in dataclasses.fields(Settings):
        yield f.name, f.metadata["setting"]


def known_variables() -> list[str]:
    """Every variable the gate reads."""
    return [var.env for _, var in declarations()] + [alias.env for alias in ALIASES]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``GATE_*`` variable no setting reads, naming the closest known one."""
    known = known_variables()
    warnings = []
    for name in sorted(environ):
        if not name.startswith("GATE_") or name in known or name.startswith("GATE_TEST_"):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{name} is not a setting of the gate and is ignored{hint}")
    return warnings


def mask_password(uri: str) -> str:
    """``uri`` with the password of its user part, if any, replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def shown_default(field: dataclasses.Field[Any], var: Var) -> str:
    """A field's default as the README's table shows it."""
    if var.shown is not None:
        return var.shown
    default = field.default
    if default is None or default is dataclasses.MISSING:  # None, or an empty mapping
        return "unset"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def markdown_table() -> str:
    """The README's settings table, generated from the declarations."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    aliases_left = {alias.env: alias for alias in ALIASES}
    fields = dataclasses.fields(Settings)
    for index, f in enumerate(fields):
        var: Var = f.metadata["setting"]
        rows.append(f"| {var.env} | {shown_default(f, var)} | {var.doc} |")
        # An alias follows the last setting it stands in for.
        later = {g.metadata["setting"].fallback for g in fields[index + 1 :]}
        if var.fallback in aliases_left and var.fallback not in later:
            alias = aliases_left.pop(var.fallback)
            rows.append(f"| {alias.env} | unset | {alias.doc} |")
    return "\n".join(rows) + "\n"


# The README's table sits between these two lines.
TABLE_START = "<!-- settings table: generated from settings.py by `make settings-table` -->\n"
TABLE_END = "<!-- end of settings table -->\n"


def with_table(readme: str) -> str:
    """``readme`` with the text between the table's markers replaced by a fresh table."""
    head, start, rest = readme.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError("the README lacks the settings table's markers")
    return head + start + markdown_table() + end + tail


def main(argv: Sequence[str]) -> int:
    """``python -m settings``: check the environment and print what the gate would run with.

    ``--markdown`` prints the settings table; ``--update-readme PATH`` rewrites it in PATH.
    """
    import os

    if argv[:1] == ["--markdown"]:
        print(markdown_table(), end="")
        return 0
    if argv[:1] == ["--update-readme"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as file:
            text = file.read()
        with open(argv[1], "w", encoding="utf-8") as file:
            file.write(with_table(text))
        return 0
    if argv:
        print("usage: python -m settings [--markdown | --update-readme README.md]", file=sys.stderr)
        return 2
    for warning in unknown_variables(os.environ):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        print(Settings.from_env(os.environ).describe())
    except SettingsError as exc:
        print(f"ollama-gate: invalid setting: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
