"""Ollama's OpenAI-compatible API: /v1/chat/completions, completions, responses, embeddings
and models. Errors take OpenAI's shape (see :meth:`.Exchange.error`)."""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

from aiohttp import web

from .catalog import normalize_model
from .exchange import Exchange, Handler, Items, gone_response
from .scheduler import Ticket
from .wire import EMBED_DIM, SSE, sse, text, token, vector, words


async def chat_completions(x: Exchange) -> web.StreamResponse:
    return await _text(x, chat=True)


async def completions(x: Exchange) -> web.StreamResponse:
    return await _text(x, chat=False)


async def _text(x: Exchange, *, chat: bool) -> web.StreamResponse:
    body = x.body()
    raw, m = x.installed(body)
    if m.embedding:
        return x.error(400, f'"{raw}" does not support generate')
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return x.error(400, "invalid message format")
        prompt_words = words(messages)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt_words = words(body.get("prompt"))
        cap = body.get("max_tokens")
    n = x.token_count(cap=cap)
    capped = x.cfg["tokens"] > n and isinstance(cap, int) and n == cap
    finish = "length" if capped else "stop"
    interval = x.interval()
    stream = bool(body.get("stream"))
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    created = int(time.time())
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{x.sim.next_id()}"
    usage = {
        "prompt_tokens": prompt_words,
        "completion_tokens": n,
        "total_tokens": prompt_words + n,
    }
    base = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": raw,
        "system_fingerprint": "fp_ollama",
    }

    def chunk(content: str, reason: str | None) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": content}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"text": content, "index": 0, "finish_reason": reason}
        return sse({**base, "choices": [choice]})

    async def work(ticket: Ticket) -> web.StreamResponse:
        if not stream:
            if not await x.stays(n * interval):
                return gone_response()
            answer = text(n)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": finish,
                }
                obj = "chat.completion"
            else:
                choice = {"text": answer, "index": 0, "finish_reason": finish}
                obj = "text_completion"
            out = {**base, "object": obj, "choices": [choice], "usage": usage}
            return x.reply(out, completed=True)

        def items() -> Items:
            for i in range(1, n + 1):
                yield interval, chunk(token(i), None)
            yield 0.0, chunk("", finish)
            if include_usage:
                yield 0.0, sse({**base, "choices": [], "usage": usage})
            yield 0.0, b"data: [DONE]\n\n"

        return await x.stream(items(), SSE, completed=True)

    return await x.scheduled(m.name, work)


async def embeddings(x: Exchange) -> web.StreamResponse:
    body = x.body()
    raw, m = x.installed(body)
    inputs = body.get("input")
    if inputs is None or inputs == "" or inputs == []:
        return x.error(400, "invalid input")
    if isinstance(inputs, list):
        texts = [v if isinstance(v, str) else json.dumps(v) for v in inputs]
    else:
        texts = [str(inputs)]
    dim = body.get("dimensions")
    dim = dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else EMBED_DIM
    as_base64 = body.get("encoding_format") == "base64"
    interval = x.interval()

    def encode(vec: list[float]) -> Any:
        if as_base64:
            return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        return vec

    async def work(ticket: Ticket) -> web.StreamResponse:
        if not await x.stays(interval):
            return gone_response()
        n = words(texts)
        out = {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": encode(vector(t, dim)), "index": i}
                for i, t in enumerate(texts)
            ],
            "model": raw,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
        return x.reply(out, completed=True)

    return await x.scheduled(m.name, work)


async def models(x: Exchange) -> web.StreamResponse:
    data = [
        {"id": name, "object": "model", "created": m.created, "owned_by": "library"}
        for name, m in x.sim.catalog.items()
    ]
    return x.reply({"object": "list", "data": data})


async def model(x: Exchange) -> web.StreamResponse:
    raw = x.request.match_info["model"]
    found = x.sim.catalog.get(normalize_model(raw))
    if found is None:
        return x.error(404, f"model '{raw}' not found")
    out = {"id": raw, "object": "model", "created": found.created, "owned_by": "library"}
    return x.reply(out)


async def responses(x: Exchange) -> web.StreamResponse:
    body = x.body()
    raw, m = x.installed(body)
    if m.embedding:
        return x.error(400, f'"{raw}" does not support generate')
    prompt_words = words(body.get("input")) + words(body.get("instructions"))
    cap = body.get("max_output_tokens")
    n = x.token_count(cap=cap)
    interval = x.interval()
    stream = bool(body.get("stream"))
    seq = x.sim.next_id()
    rid, mid = f"resp_{seq:024x}", f"msg_{seq:024x}"
    created = int(time.time())
    usage = {
        "input_tokens": prompt_words,
        "output_tokens": n,
        "total_tokens": prompt_words + n,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }

    def part(content: str) -> dict[str, Any]:
        return {"type": "output_text", "text": content, "annotations": [], "logprobs": []}

    def item(content: str | None, status: str) -> dict[str, Any]:
        parts = [] if content is None else [part(content)]
        return {
            "type": "message",
            "id": mid,
            "status": status,
            "role": "assistant",
            "content": parts,
        }

    def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": cap,
            "model": raw,
            "output": output,
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "metadata": {},
            "usage": usage if with_usage else None,
        }

    async def work(ticket: Ticket) -> web.StreamResponse:
        answer = text(n)
        if not stream:
            if not await x.stays(n * interval):
                return gone_response()
            out = response("completed", [item(answer, "completed")], True)
            return x.reply(out, completed=True)

        counter = iter(range(1_000_000))

        def ev(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(counter), **fields}, kind)

        where = {"item_id": mid, "output_index": 0, "content_index": 0}

        def items() -> Items:
            yield 0.0, ev("response.created", response=response("in_progress", [], False))
            added = item(None, "in_progress")
            yield 0.0, ev("response.output_item.added", output_index=0, item=added)
            yield 0.0, ev("response.content_part.added", **where, part=part(""))
            for i in range(1, n + 1):
                delta = ev("response.output_text.delta", **where, delta=token(i), logprobs=[])
                yield interval, delta
            yield 0.0, ev("response.output_text.done", **where, text=answer, logprobs=[])
            yield 0.0, ev("response.content_part.done", **where, part=part(answer))
            done_item = item(answer, "completed")
            yield 0.0, ev("response.output_item.done", output_index=0, item=done_item)
            final = response("completed", [done_item], True)
            yield 0.0, ev("response.completed", response=final)

        return await x.stream(items(), SSE, completed=True)

    return await x.scheduled(m.name, work)


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/embeddings", embeddings),
    ("POST", "/v1/responses", responses),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{model:.+}", model),
)
