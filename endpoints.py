"""Endpoint classes and model names: the contract's table, shared by every layer.

Pure functions only (no Flask, no I/O), so the limiter, the work queue and the
proxy agree on what a request is without importing each other.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final, Literal

EndpointClass = Literal["inference", "embed", "admin", "light"]

INFERENCE: Final = "inference"
EMBED: Final = "embed"
ADMIN: Final = "admin"
LIGHT: Final = "light"

CLASSES: Final[tuple[EndpointClass, ...]] = ("inference", "embed", "admin", "light")

# (rule, methods, class, whether the JSON body must name a model). The order is
# the contract's table (docs/DESIGN.md, "Endpoint classes"); anything not listed is "light".
ROUTES: Final[tuple[tuple[str, tuple[str, ...], EndpointClass, bool], ...]] = (
    ("/api/generate", ("POST",), "inference", True),
    ("/api/chat", ("POST",), "inference", True),
    ("/v1/chat/completions", ("POST",), "inference", True),
    ("/v1/completions", ("POST",), "inference", True),
    ("/v1/responses", ("POST",), "inference", True),
    ("/v1/messages", ("POST",), "inference", True),
    ("/api/embed", ("POST",), "embed", True),
    ("/api/embeddings", ("POST",), "embed", True),
    ("/v1/embeddings", ("POST",), "embed", True),
    ("/api/pull", ("POST",), "admin", True),
    ("/api/push", ("POST",), "admin", True),
    ("/api/create", ("POST",), "admin", True),
    ("/api/copy", ("POST",), "admin", False),
    ("/api/delete", ("DELETE",), "admin", True),
    ("/api/blobs/<digest>", ("HEAD", "POST"), "admin", False),
    ("/", ("GET", "HEAD"), "light", False),
    ("/api/version", ("GET", "HEAD"), "light", False),
    ("/api/tags", ("GET", "HEAD"), "light", False),
    ("/api/ps", ("GET", "HEAD"), "light", False),
    ("/api/show", ("POST",), "light", True),
    ("/v1/models", ("GET", "HEAD"), "light", False),
    ("/v1/models/<path:model>", ("GET", "HEAD"), "light", False),
)

#: The blueprint under which proxy/views.py registers the routes above.
PROXY_BLUEPRINT: Final = "proxy"


def view_name(rule: str, cls: EndpointClass, needs_model: bool) -> str:
    """The proxy's view for a route: one per class and body kind ("inference_model")."""
    blob = rule.startswith("/api/blobs/")  # streamed through, never read whole
    return cls + ("_model" if needs_model else "") + ("_blob" if blob else "")


#: The proxy's catch-all view: anything else Ollama serves is forwarded as light.
OTHER_VIEW: Final = "light_other"

#: The endpoint class of each Flask endpoint the proxy registers ("proxy.inference_model": ...),
#: which is how the limiter and the status page know a request's class.
ENDPOINT_CLASSES: Final[dict[str, EndpointClass]] = {
    f"{PROXY_BLUEPRINT}.{view_name(rule, cls, needs_model)}": cls
    for rule, _methods, cls, needs_model in ROUTES
}
ENDPOINT_CLASSES[f"{PROXY_BLUEPRINT}.{OTHER_VIEW}"] = "light"

# Model endpoints that go through the work queue (admin jobs take their own lane).
QUEUED_CLASSES: Final = frozenset({"inference", "embed", "admin"})

_TAG = re.compile(r":[^/]+$")


@functools.lru_cache(maxsize=1024)
def normalize_model(name: str) -> str:
    """Return ``name`` as ``name:tag`` as Ollama does (``llama3.2`` is ``llama3.2:latest``).

    Cached: the lane and the work queue ask it of every call's model, and a gate serves
    few models (bounded all the same: the names come from clients).
    """
    name = name.strip()
    if not name:
        return name
    if "@" in name:  # pinned by digest: name@sha256:...
        return name
    return name if _TAG.search(name) else f"{name}:latest"


class AmbiguousModel(ValueError):
    """A body spells its model field twice with different values (Ollama might read either)."""


def _field(body: dict[str, Any], name: str) -> Any:
    """The value of top-level field ``name`` as Ollama's Go decoder reads it.

    Go matches JSON keys to fields ignoring case, so ``"Model"`` sets the model too.
    Keys that differ only in case and carry different values are refused: which one
    Go keeps depends on their order in the text, which a parsed dict no longer shows.
    """
    value = body.get(name)
    for key, other in body.items():
        if key != name and key.casefold() == name:
            if value is not None and other != value:
                raise AmbiguousModel(f"request body gives {name!r} twice, as {key!r} too")
            value = other
    return value


def model_of(body: Any) -> str | None:
    """The model a JSON request body names (``model``, or the legacy ``name``), normalised.

    Raises AmbiguousModel for a body whose model field is spelt twice with different
    values (``{"model": "a", "Model": "b"}``): the queue and placement must see the
    model Ollama will run.
    """
    if not isinstance(body, dict):
        return None
    value = _field(body, "model") or _field(body, "name")
    if not isinstance(value, str) or not value.strip():
        return None
    return normalize_model(value)
