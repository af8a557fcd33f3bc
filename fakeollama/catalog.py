"""The installed models (what /api/tags lists) and how Ollama spells their names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .wire import iso

DEFAULT_MODELS: tuple[str, ...] = (
    "llama3.2:latest",
    "qwen2.5:0.5b",
    "nomic-embed-text:latest",
    "m1:latest",
    "m2:latest",
    "m3:latest",
    "m4:latest",
    "m5:latest",
    "m6:latest",
)

DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_BYTES_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
_TAG_RE = re.compile(r":[^/]+$")
_SIZE_TAG_RE = re.compile(r"^(\d+(?:\.\d+)?)([bm])$", re.IGNORECASE)


def normalize_model(name: str) -> str:
    """``llama3.2`` -> ``llama3.2:latest``, the way Ollama resolves a model name."""
    name = name.strip()
    if not name or "@" in name:
        return name
    return name if _TAG_RE.search(name) else f"{name}:latest"


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"4.7GB"``, ``"24GiB"`` or ``"512MB"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    else:
        m = _BYTES_RE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError(
                f"not a size (bytes, or a number with B, KB, MB, GB, GiB...): {value!r}"
            )
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive: {value!r}")
    return size


def model_field(body: Any) -> str | None:
    """The raw model a JSON body names (``model``, or the legacy ``name``)."""
    if not isinstance(body, dict):
        return None
    value = _folded(body, "model") or _folded(body, "name")
    if isinstance(value, str) and value.strip():
        return value
    return None


def _folded(body: dict[str, Any], name: str) -> Any:
    """Field ``name`` as Go's JSON decoder reads it: keys match ignoring case, the last wins."""
    value = None
    for key, found in body.items():
        if key.casefold() == name:
            value = found
    return value


class Model:
    """One installed model: its name, digest, size in bytes and details."""

    __slots__ = ("name", "digest", "size", "modified_at", "created", "details", "embedding")

    def __init__(
        self,
        name: str,
        *,
        details: dict[str, Any] | None = None,
        embedding: bool | None = None,
        digest: str | None = None,
        size: int | None = None,
    ) -> None:
        guessed, guessed_embedding, guessed_size = _guess_details(name)
        self.name = name
        self.details = details if details is not None else guessed
        self.embedding = guessed_embedding if embedding is None else embedding
        self.digest = digest or hashlib.sha256(f"fakeollama:{name}".encode()).hexdigest()
        self.size = size if size is not None else guessed_size
        modified = datetime.now(UTC)
        self.modified_at = iso(modified)
        # /v1/models' "created": Ollama gives the model's modification time, which stays put.
        self.created = int(modified.timestamp())

    def tag(self) -> dict[str, Any]:
        """The model's entry in /api/tags."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": dict(self.details),
        }

    def copy(self, name: str) -> Model:
        return Model(
            name,
            details=dict(self.details),
            embedding=self.embedding,
            digest=self.digest,
            size=self.size,
        )

    @property
    def family(self) -> str:
        return str(self.details.get("family") or "llama")


def _guess_details(name: str) -> tuple[dict[str, Any], bool, int]:
    """Plausible details, embedding-ness and size from a model's name alone."""
    base, _, tag = name.partition(":")
    base = base.rsplit("/", 1)[-1].lower()
    embedding = "embed" in base or base.startswith(("all-minilm", "bge-", "snowflake-arctic"))
    if embedding:
        family, params, quant = ("nomic-bert" if "nomic" in base else "bert"), "137M", "F16"
    elif base.startswith("qwen"):
        family, params, quant = "qwen2", "7.6B", "Q4_K_M"
    elif base.startswith("llama3.2"):
        family, params, quant = "llama", "3.2B", "Q4_K_M"
    else:
        family, params, quant = "llama", "1B", "Q4_K_M"
    m = _SIZE_TAG_RE.match(tag)
    if m:
        params = f"{m.group(1)}{m.group(2).upper()}"
    num = float(re.sub(r"[^0-9.]", "", params) or 1)
    count = num * (1e9 if params.endswith("B") else 1e6)
    size = int(count * (2.0 if quant == "F16" else 0.6)) + len(name)
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params,
        "quantization_level": quant,
    }
    return details, embedding, size


def build_catalog(entries: Iterable[tuple[str, int | None]] | None) -> dict[str, Model]:
    """The catalog of ``(name, size or None)`` entries (the defaults when None), in order.
    A model without a size gets one guessed from its name."""
    if entries is None:
        entries = ((name, None) for name in DEFAULT_MODELS)
    return {name: Model(name, size=size) for name, size in entries}
