"""Per-key model allow-lists: which models a key may name, as Ollama reads model names.

A key's ``models = ["llama3.2:*", "nomic-embed-text"]`` holds glob patterns. A
request may name a model in several places (the JSON body's ``model``, legacy
``name``, copy's ``source`` and ``destination``, create's ``from``, the path of
``/v1/models/:model``), and Ollama reads each one loosely: any letter case
(``Name.EqualFold``), defaults for what is left out (``registry.ollama.ai``,
``library``, ``latest``), an ``http(s)://`` prefix, a ``+build`` suffix, an
``@digest`` (refused here: it could point at any model's data), and JSON
field names matched without regard to case (Go's encoding/json). So both the
patterns and the names are brought to one canonical form, lower case
``host/namespace/model:tag``, before they are compared, every spelling of a
field is checked, and anything the gate cannot read as Ollama would is refused.

Only the standard library: the keys file parser (checked in gunicorn's master)
uses it.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# The top-level JSON fields Ollama reads a model name from (compared case-folded, as
# Go's encoding/json matches field names: "Model", "MODEL" and "ſource" count too).
MODEL_FIELDS = frozenset({"model", "name", "source", "destination", "from"})
# Every model, in any namespace or registry.
EVERYTHING = "*"

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")
_PATTERN = re.compile(r"[A-Za-z0-9._:/*?+-]+")


class NotAllowed(Exception):
    """A request names a model outside its key's allow-list (``name`` as the client wrote it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Unreadable(ValueError):
    """A request body the gate cannot read as Ollama would: refused rather than guessed at."""


def canonical(name: str) -> str:
    """``name`` as ``host/namespace/model:tag`` in lower case, as Ollama resolves it.

    ``Llama3.2`` → ``registry.ollama.ai/library/llama3.2:latest``;
    ``hf.co/org/m:q4`` stays itself. A ``+build`` is left out: it does not change
    which model a name refers to (``AllowList.allows`` refuses an ``@digest``).
    Glob patterns go through
    the same steps (their ``*`` and ``?`` are ordinary characters here).
    """
    name = _SCHEME.sub("", name.strip().lower(), count=1)
    name = name.partition("@")[0]  # the digest names a version of this model
    base, _, tag = name.rpartition(":")
    if not base or "/" in tag:  # no ":", or the ":" belongs to a host:port
        base, tag = name, ""
    tag = tag.partition("+")[0]
    base = base.partition("+")[0] if not tag else base
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return "/".join(parts) + ":" + (tag or DEFAULT_TAG)


@dataclass(frozen=True)
class AllowList:
    """The models one key may use: glob ``patterns`` as written in the keys file."""

    patterns: tuple[str, ...]

    def __post_init__(self) -> None:
        canon = tuple(
            EVERYTHING if p.strip() == EVERYTHING else canonical(p) for p in self.patterns
        )
        object.__setattr__(self, "_canonical", canon)

    def allows(self, name: str) -> bool:
        """Whether ``name`` (as a client wrote it) is one of the allowed models."""
        if not name.strip() or "@" in name:
            return False  # a digest could name any model's blobs, whatever the name says
        wanted = canonical(name)
        canon: tuple[str, ...] = self._canonical  # type: ignore[attr-defined]
        return any(p == EVERYTHING or fnmatch.fnmatchcase(wanted, p) for p in canon)

    def check(self, names: Iterable[str]) -> None:
        """Raise NotAllowed for the first of ``names`` outside the list."""
        for name in names:
            if not self.allows(name):
                raise NotAllowed(name)


def check_pattern(pattern: object) -> str:
    """A pattern from the keys file, or ValueError saying what is wrong with it."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("each entry must be a model name or glob such as 'llama3.2:*'")
    if not _PATTERN.fullmatch(pattern.strip()):
        raise ValueError(
            f"{pattern!r}: a model name or glob has letters, digits and . _ - : / * ? + only"
        )
    return pattern.strip()


def named_models(body: bytes) -> list[str]:
    """Every model name a JSON request body gives Ollama (empty for no body).

    Every top-level field whose name folds to one of MODEL_FIELDS counts, each
    occurrence of a repeated one too. Raises Unreadable for a body that is not
    one JSON object in UTF-8, or a model field that is not a string: Ollama might
    read a name from it that the gate did not see.
    """
    if not body.strip():
        return []
    last: list[list[tuple[str, Any]]] = [[]]

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        last[0] = pairs  # the outermost object closes, and so is built, last
        return dict(pairs)

    try:
        payload = json.loads(body.decode("utf-8"), object_pairs_hook=hook)
    except (ValueError, RecursionError):
        raise Unreadable("request body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise Unreadable("request body must be a JSON object")
    names = []
    for key, value in last[0]:
        if key.casefold() not in MODEL_FIELDS or value is None or value == "":
            continue
        if not isinstance(value, str):
            raise Unreadable(f"{key} must be a string naming a model")
        names.append(value)
    return names


def entry_name(entry: Any, fields: tuple[str, ...]) -> Iterator[str]:
    """The model names one entry of a model listing carries under ``fields``."""
    if isinstance(entry, dict):
        for field_name in fields:
            value = entry.get(field_name)
            if isinstance(value, str) and value:
                yield value


# Listings to filter: path → (the list's field, the fields naming each entry's model).
LISTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "/api/tags": ("models", ("name", "model")),
    "/api/ps": ("models", ("name", "model")),
    "/v1/models": ("data", ("id",)),
}


def filter_listing(path: str, body: bytes, allow: AllowList) -> bytes:
    """The listing answer ``body`` of ``path`` with only the models ``allow`` lets through.

    An entry stays only when every name it carries is allowed (and it carries
    one). Raises Unreadable when the body is not the listing it should be.
    """
    field_name, fields = LISTINGS[path]
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise Unreadable(f"upstream's {path} answer is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(field_name) or [], list):
        raise Unreadable(f"upstream's {path} answer has no {field_name} list")
    entries = doc.get(field_name) or []
    kept = []
    for entry in entries:
        names = list(entry_name(entry, fields))
        if names and all(allow.allows(name) for name in names):
            kept.append(entry)
    if field_name in doc:
        doc[field_name] = kept
    return json.dumps(doc).encode()
