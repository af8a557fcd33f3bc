"""One forwarded request as every layer sees it: its class, model, client and outcome."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from endpoints import EndpointClass
from workqueue.core import DEFAULT_PRIORITY


@dataclass
class Call:
    """What the limiter, the work queue and the status page know of one forwarded request."""

    cls: EndpointClass
    method: str
    path: str
    client: str
    model: str | None = None
    payload: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0  # seconds spent in the work queue
    ttfb: float | None = None  # seconds until the upstream's response headers
    status: int | None = None  # the upstream's status
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "ok", "client_gone" (left mid-answer) or "upstream_error" (broke mid-answer)
    outcome: str = "ok"
    ended: float | None = None
    address: str | None = None  # the client's address (behind trusted proxies, the real one)
    # The class its job is served at in the work queue (workqueue.core.PRIORITIES): the
    # API key's ceiling, or lower if the request asked (X-Gate-Priority).
    priority: str = DEFAULT_PRIORITY

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def count_usage(self, record: bytes) -> None:
        """Read token counts from a final record, in any of the API shapes the upstream speaks."""
        usage = usage_of(record)
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage


def usage_of(record: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens a record reports, or None.

    Ollama's final chunk carries ``prompt_eval_count``/``eval_count``; OpenAI's
    ``usage.prompt_tokens``/``completion_tokens``; Anthropic's and the Responses
    API's ``usage.input_tokens``/``output_tokens``. SSE records are ``data:`` lines.
    Cheap substring tests keep this off the per-token path. Whatever the record
    holds, this never raises: the relay calls it on the upstream's bytes.
    """
    if b"eval_count" not in record and b"usage" not in record:
        return None
    found = None
    for doc in _documents(record):
        usage = _usage_in(doc)
        if usage is not None:
            found = usage
    return found


def _documents(record: bytes) -> list[Any]:
    """The JSON documents in a record: a JSON body, NDJSON lines, or SSE ``data:`` lines."""
    text = record.strip()
    if text.startswith(b"{"):
        try:
            return [json.loads(text)]
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            lines = text.splitlines()
    else:
        lines = [line[5:] for line in text.splitlines() if line.startswith(b"data:")]
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return docs


def _usage_in(doc: Any) -> tuple[int, int] | None:
    if not isinstance(doc, dict):
        return None
    if "eval_count" in doc or "prompt_eval_count" in doc:
        return _ints(doc.get("prompt_eval_count"), doc.get("eval_count"))
    for holder in (doc, doc.get("response"), doc.get("message")):
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if isinstance(usage, dict):
            if "prompt_tokens" in usage or "completion_tokens" in usage:
                return _ints(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if "input_tokens" in usage or "output_tokens" in usage:
                return _ints(usage.get("input_tokens"), usage.get("output_tokens"))
    return None


#: The most tokens one count may claim: more is no answer Ollama gives, and a budget
#: storage (Redis INCRBY: 64 bits) must never be handed a number it cannot hold.
MAX_TOKENS = 2**31 - 1


def _ints(a: Any, b: Any) -> tuple[int, int]:
    return (_count(a), _count(b))


def _count(value: Any) -> int:
    """A token count as reported, or 0 when it is not a whole number; kept within MAX_TOKENS."""
    if not isinstance(value, int) or isinstance(value, bool):
        return 0
    return min(max(value, 0), MAX_TOKENS)
