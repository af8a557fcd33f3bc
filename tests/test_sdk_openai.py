"""The openai SDK on the gate's /v1 endpoints (Ollama's OpenAI-compatible API)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from fakeollama import FakeOllama
from tests.support import Gate, client_requests

TEXT8 = "tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 "


@pytest.fixture
def oai(gate: Gate) -> Any:
    with openai.OpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def only(fake: FakeOllama, method: str, path: str) -> dict[str, Any]:
    records = [r for r in fake.stats()["requests"] if (r["method"], r["path"]) == (method, path)]
    assert len(records) == 1, [(r["method"], r["path"]) for r in fake.stats()["requests"]]
    assert records[0]["headers"]["host"] == f"{fake.host}:{fake.port}"
    return records[0]


def test_chat_completion(fake: FakeOllama, oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "two words"}]
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.content == TEXT8
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.prompt_tokens == 2
    assert out.usage.completion_tokens == 8
    rec = only(fake, "POST", "/v1/chat/completions")
    assert rec["json"]["messages"] == [{"role": "user", "content": "two words"}]
    assert rec["headers"]["authorization"] == "Bearer x"


def test_chat_completion_streamed_with_usage(fake: FakeOllama, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT8
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    # include_usage: the last chunk has no choices and carries the usage.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    rec = only(fake, "POST", "/v1/chat/completions")
    assert rec["json"]["stream"] is True
    assert rec["json"]["stream_options"] == {"include_usage": True}


def test_models_list_and_retrieve(fake: FakeOllama, oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "llama3.2:latest" in ids and "qwen2.5:0.5b" in ids
    only(fake, "GET", "/v1/models")

    model = oai.models.retrieve("qwen2.5:0.5b")
    assert model.id == "qwen2.5:0.5b" and model.object == "model"
    only(fake, "GET", "/v1/models/qwen2.5:0.5b")


def test_upstream_error_in_openai_shape(fake: FakeOllama, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "model 'no-such-model' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }

    with pytest.raises(openai.APIStatusError) as failed:
        oai.with_options(max_retries=0).chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Status": "500"},
        )
    assert failed.value.status_code == 500
    assert failed.value.body == {
        "message": "fake failure",
        "type": "api_error",
        "param": None,
        "code": None,
    }


def test_gate_error_in_openai_shape(gate: Gate, fake: FakeOllama, oai: openai.OpenAI) -> None:
    # No model: the gate answers 400 itself, in OpenAI's shape, and forwards nothing.
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400
    assert info.value.body == {
        "message": "model is required",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }
    assert client_requests(fake) == []
