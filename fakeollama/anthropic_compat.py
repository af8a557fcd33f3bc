"""Ollama's Anthropic-compatible API, minimal: /v1/messages, whole or streamed."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .exchange import Exchange, Handler, Items, gone_response
from .scheduler import Ticket
from .wire import SSE, sse, text, token, words


async def messages(x: Exchange) -> web.StreamResponse:
    body = x.body()
    raw, m = x.installed(body)
    if m.embedding:
        return x.error(400, f'"{raw}" does not support generate')
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return x.error(400, "messages is required")
    prompt_words = words(msgs) + words(body.get("system"))
    cap = body.get("max_tokens")
    n = x.token_count(cap=cap)
    capped = x.cfg["tokens"] > n and isinstance(cap, int) and n == cap
    stop_reason = "max_tokens" if capped else "end_turn"
    interval = x.interval()
    stream = bool(body.get("stream"))
    mid = f"msg_{x.sim.next_id():024x}"

    def message(content: list[Any], reason: str | None, out_tokens: int) -> dict[str, Any]:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": raw,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_words, "output_tokens": out_tokens},
        }

    async def work(ticket: Ticket) -> web.StreamResponse:
        if not stream:
            if not await x.stays(n * interval):
                return gone_response()
            out = message([{"type": "text", "text": text(n)}], stop_reason, n)
            return x.reply(out, completed=True)

        def ev(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, **fields}, kind)

        def items() -> Items:
            yield 0.0, ev("message_start", message=message([], None, 0))
            block = {"type": "text", "text": ""}
            yield 0.0, ev("content_block_start", index=0, content_block=block)
            for i in range(1, n + 1):
                delta = {"type": "text_delta", "text": token(i)}
                yield interval, ev("content_block_delta", index=0, delta=delta)
            yield 0.0, ev("content_block_stop", index=0)
            yield (
                0.0,
                ev(
                    "message_delta",
                    delta={"stop_reason": stop_reason, "stop_sequence": None},
                    usage={"output_tokens": n},
                ),
            )
            yield 0.0, ev("message_stop")

        return await x.stream(items(), SSE, completed=True)

    return await x.scheduled(m.name, work)


ROUTES: tuple[tuple[str, str, Handler], ...] = (("POST", "/v1/messages", messages),)
