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
    text = record.strip()
    if text.startswith(b"{"):
        # One JSON document (a non-streamed answer, an NDJSON line): the common case.
        try:
            return _usage_in(parse_json(text))
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            lines = text.splitlines()
    else:
        lines = [line[5:] for line in text.splitlines() if line.startswith(b"data:")]
    found = None
    for line in lines:
        try:
            usage = _usage_in(parse_json(line))
        except (ValueError, RecursionError):
            continue
        if usage is not None:
            found = usage
    return found


_raw_decode = json.JSONDecoder().raw_decode


def parse_json(data: bytes) -> Any:
    """``json.loads(data)``: the same document, or the same kind of error (ValueError,
    RecursionError), a few µs sooner for text that starts as UTF-8 JSON does.

    json.loads guesses the encoding of bytes (UTF-16 and UTF-32 too) before it decodes
    them: a text opening with ``{`` or ``[`` not followed by a NUL byte is UTF-8 to it.
    """
    if data[:1] in (b"{", b"[") and data[1:2] != b"\x00":
        text = data.decode("utf-8", "surrogatepass")
        doc, end = _raw_decode(text)
        # json.loads allows JSON whitespace after the document, and nothing else.
        if end != len(text) and text[end:].strip(" \t\n\r"):
            raise json.JSONDecodeError("Extra data", text, end)
        return doc
    return json.loads(data)


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
