"""The API keys file (GATE_API_KEYS_FILE): parsed, checked and searched without Flask.

One TOML table per key, holding the SHA-256 hex digest of the secret, never the
secret itself (DESIGN.md, "API keys file")::

    [keys.alice]
    key_sha256 = "5e88..."           # sha256 hex of the secret
    role = "user"                    # "user" or "admin"
    limit_inference = "30/minute"    # optional overrides of GATE_LIMIT_*
    tokens_per_minute = 20000        # optional token budget
    models = ["llama3.2:*"]          # optional allow-list of model globs (limiter.allow)
    max_waiting = 100                # optional: its share of the work queue
    max_running = 2                  # optional: its jobs running at once, all models
    priority = "batch"               # optional class ceiling: interactive, normal (default), batch

A file the gate cannot use raises ``KeysFileError`` naming the file and line.
Only the standard library, ``limiter.policy``, ``limiter.allow`` and the work queue's pure
core (its class names) are imported here: gunicorn's master checks the file at start-up,
before gevent patches the workers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from endpoints import CLASSES, EndpointClass
from workqueue.core import DEFAULT_PRIORITY, PRIORITIES

from .allow import AllowList, check_pattern
from .identity import presented_secret
from .policy import normalize_limit

ROLES = ("user", "admin")
LIMIT_FIELDS: dict[str, EndpointClass] = {f"limit_{cls}": cls for cls in CLASSES}
FIELDS = frozenset(
    {
        "key_sha256",
        "role",
        "tokens_per_minute",
        "models",
        "max_waiting",
        "max_running",
        "priority",
        *LIMIT_FIELDS,
    }
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TOML_LINE = re.compile(r"\((?:at line (\d+), column \d+|at end of document)\)")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and, when known, the line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path} line {line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class ApiKey:
    """One client of the gate, known by the digest of its secret."""

    name: str
    digest: str
    role: str = "user"
    # Per-class overrides of GATE_LIMIT_* ("off" allowed); classes not listed use the default.
    limits: Mapping[EndpointClass, str] = field(default_factory=dict)
    tokens_per_minute: int | None = None  # None: no token budget
    models: AllowList | None = None  # None: every model
    max_waiting: int | None = None  # its jobs waiting in the work queue; None: the default
    max_running: int | None = None  # its jobs running at once, all models; None: no cap
    # The highest class its jobs are served at (workqueue.core.PRIORITIES); a request may
    # ask for a lower one with X-Gate-Priority.
    priority: str = DEFAULT_PRIORITY

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest stored for ``secret``."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Keyring:
    """The keys of one file, looked up by secret in constant time."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        self.by_name = {key.name: key for key in self.keys}

    def __len__(self) -> int:
        return len(self.keys)

    def replace(self, other: Keyring) -> None:
        """Take ``other``'s keys in place, so that every holder of this keyring sees them."""
        self.keys, self.by_name = other.keys, other.by_name

    def lookup(self, secret: str) -> ApiKey | None:
        """The key whose digest matches ``secret``, or None.

        Every digest is compared, with ``hmac.compare_digest``, so the time taken
        says nothing about which key, or how much of one, matched.
        """
        digest = hash_secret(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def presented(self, environ: Mapping[str, Any]) -> tuple[str | None, ApiKey | None]:
        """(header a request's secret came in, None when it sent none; the key it matches)."""
        found = presented_secret(environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))
        if found is None:
            return None, None
        return found[1], self.lookup(found[0])


def load_keys(path: str | Path) -> Keyring:
    """Read and check a keys file; KeysFileError names the file and line of any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(name, None, f"cannot read the keys file: {exc}") from None
    return parse_keys(text, name)


def parse_keys(text: str, path: str = "<keys file>") -> Keyring:
    """Parse the TOML text of a keys file (see the module docstring)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line = None
        if found:
            line = int(found.group(1)) if found.group(1) else len(text.splitlines()) or 1
        message = _TOML_LINE.sub("", str(exc)).strip()
        raise KeysFileError(path, line, message) from None
    lines = text.splitlines()
    extra = sorted(set(doc) - {"keys"})
    if extra:
        raise KeysFileError(
            path,
            _find(lines, rf"\[\s*{re.escape(extra[0])}\b|^\s*{re.escape(extra[0])}\s*="),
            f"unexpected top-level entry {extra[0]!r}: every key is a [keys.NAME] table",
        )
    tables = doc.get("keys")
    if not isinstance(tables, dict) or not tables:
        raise KeysFileError(path, None, "no keys defined: add a [keys.NAME] table per key")
    keys = []
    seen: dict[str, str] = {}
    for name, table in tables.items():
        key = _parse_key(name, table, lines, path)
        if key.digest in seen:
            raise KeysFileError(
                path,
                _line_of(lines, name, "key_sha256"),
                f"keys {seen[key.digest]!r} and {name!r} have the same key_sha256",
            )
        seen[key.digest] = name
        keys.append(key)
    return Keyring(keys)


def _parse_key(name: str, table: Any, lines: list[str], path: str) -> ApiKey:
    def fail(message: str, field_name: str | None = None) -> KeysFileError:
        return KeysFileError(path, _line_of(lines, name, field_name), f"[keys.{name}]: {message}")

    if not _NAME.fullmatch(name):
        raise fail(
            "a key name is 1-64 letters, digits and . _ @ + - (starting with one of the first two)"
        )
    if not isinstance(table, dict):
        raise fail("must be a table holding key_sha256 and role")
    unknown = sorted(set(table) - FIELDS)
    if unknown:
        raise fail(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})", unknown[0])

    digest = table.get("key_sha256")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest.strip().lower()):
        raise fail(
            "key_sha256 must be the 64 hex digits of the secret's SHA-256 "
            "(python -m limiter.mint NAME prints one)",
            "key_sha256" if "key_sha256" in table else None,
        )
    role = table.get("role", "user")
    if role not in ROLES:
        raise fail(f'role must be "user" or "admin", not {role!r}', "role")

    limits: dict[EndpointClass, str] = {}
    for field_name, cls in LIMIT_FIELDS.items():
        if field_name not in table:
            continue
        value = table[field_name]
        if not isinstance(value, str):
            raise fail(f"{field_name} must be a string such as '30/minute' or 'off'", field_name)
        try:
            limits[cls] = normalize_limit(value)
        except ValueError as exc:
            raise fail(f"{field_name}: {exc}", field_name) from None

    budget = table.get("tokens_per_minute")
    if budget is not None and not _positive(budget):
        raise fail("tokens_per_minute must be a whole number of 1 or more", "tokens_per_minute")
    max_waiting = table.get("max_waiting")
    if max_waiting is not None and not _positive(max_waiting):
        raise fail("max_waiting must be a whole number of 1 or more", "max_waiting")
    max_running = table.get("max_running")
    if max_running is not None and not _positive(max_running):
        raise fail("max_running must be a whole number of 1 or more", "max_running")
    models = None
    if "models" in table:
        patterns = table["models"]
        if not isinstance(patterns, list):
            raise fail(
                'models must be a list of model names or globs, e.g. ["llama3.2:*"]', "models"
            )
        try:
            models = AllowList(tuple(check_pattern(p) for p in patterns))
        except ValueError as exc:
            raise fail(f"models: {exc}", "models") from None
    priority = table.get("priority", DEFAULT_PRIORITY)
    if priority not in PRIORITIES:
        raise fail(
            f"priority must be {', '.join(repr(p) for p in PRIORITIES)}, not {priority!r}",
            "priority",
        )
    return ApiKey(
        name,
        digest.strip().lower(),
        role,
        limits,
        budget,
        models,
        max_waiting,
        max_running,
        priority,
    )


def _positive(value: Any) -> bool:
    """A whole number of 1 or more (TOML's true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _find(lines: list[str], pattern: str, start: int = 0) -> int | None:
    """The 1-based number of the first line from ``start`` that matches ``pattern``."""
    regex = re.compile(pattern)
    for number in range(start, len(lines)):
        if regex.search(lines[number]):
            return number + 1
    return None


def _line_of(lines: list[str], name: str, field_name: str | None) -> int | None:
    """Where key ``name`` (and its ``field_name``) is written, for error messages."""
    quoted = rf"(?:{re.escape(name)}|\"{re.escape(name)}\"|'{re.escape(name)}')"
    header = _find(lines, rf"^\s*\[\s*keys\s*\.\s*{quoted}\s*\]")
    if header is None:  # an inline table under [keys], or a dotted key
        return _find(lines, rf"^\s*(?:keys\s*\.\s*)?{quoted}\s*[.=]")
    if field_name is None:
        return header
    found = _find(lines, rf"^\s*{re.escape(field_name)}\s*=", header)
    following = _find(lines, r"^\s*\[", header)
    if found is not None and (following is None or found < following):
        return found
    return header
