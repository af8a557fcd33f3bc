"""Per-key model allow-lists, the pure part: names as Ollama reads them, bodies, listings."""

from __future__ import annotations

import json

import pytest

from limiter.allow import AllowList, Unreadable, canonical, filter_listing, named_models
from limiter.keys import KeysFileError, hash_secret, parse_keys

CHAT = AllowList(("llama3.2:*", "nomic-embed-text"))


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("llama3.2", "registry.ollama.ai/library/llama3.2:latest"),
        ("Llama3.2:1B", "registry.ollama.ai/library/llama3.2:1b"),
        ("library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"),
        ("https://registry.ollama.ai/library/m:3b", "registry.ollama.ai/library/m:3b"),
        ("llama3.2:1b+Q4_0", "registry.ollama.ai/library/llama3.2:1b"),
        ("hf.co/org/model:q4", "hf.co/org/model:q4"),
        ("localhost:5000/ns/m", "localhost:5000/ns/m:latest"),
        ("alice/llama3.2", "registry.ollama.ai/alice/llama3.2:latest"),
    ],
)
def test_names_take_ollamas_defaults(name: str, full: str) -> None:
    assert canonical(name) == full


@pytest.mark.parametrize(
    "name",
    [
        "llama3.2",
        "llama3.2:latest",
        "LLAMA3.2:1b",
        "library/llama3.2:3b",
        "registry.ollama.ai/library/llama3.2",
        "http://registry.ollama.ai/library/Llama3.2:1b",
        " nomic-embed-text ",
        "Nomic-Embed-Text:latest",
    ],
)
def test_every_spelling_of_an_allowed_model_is_allowed(name: str) -> None:
    assert CHAT.allows(name)


@pytest.mark.parametrize(
    "name",
    [
        "qwen2.5:0.5b",
        "llama3.1",
        "llama3.2-vision",  # the glob is name:tag, not a name prefix
        "nomic-embed-text:v1.5",  # a pattern without a tag means :latest, as a name does
        "alice/llama3.2",  # another namespace
        "hf.co/library/llama3.2",  # another registry
        "llama3.2@sha256:" + "0" * 64,  # a digest could point anywhere
        "@sha256:" + "0" * 64,
        "",
        "llama3.2:1b/../../qwen2.5",
    ],
)
def test_other_models_are_not(name: str) -> None:
    assert not CHAT.allows(name)


def test_a_star_alone_allows_every_model() -> None:
    everything = AllowList(("*",))
    assert everything.allows("hf.co/org/model:q4") and everything.allows("qwen2.5")
    assert not AllowList(()).allows("llama3.2")


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"", []),
        (b'{"model": "a", "prompt": "hi"}', ["a"]),
        (b'{"name": "a"}', ["a"]),
        (b'{"source": "a", "destination": "b"}', ["a", "b"]),
        (b'{"model": "new", "from": "base"}', ["new", "base"]),
        # Go's encoding/json matches field names without regard to case (and folds ſ to s).
        (b'{"model": "a", "Model": "b", "MODEL": "c"}', ["a", "b", "c"]),
        ('{"\u017fource": "a"}'.encode(), ["a"]),
        # A repeated field: every occurrence counts, whichever one Ollama keeps.
        (b'{"model": "a", "model": "b"}', ["a", "b"]),
        # Nested objects name nothing Ollama reads as the model.
        (b'{"model": "a", "options": {"model": "x"}, "messages": [{"name": "y"}]}', ["a"]),
        (b'{"model": "", "name": null}', []),
    ],
)
def test_every_model_field_of_a_body_is_read(body: bytes, names: list[str]) -> None:
    assert named_models(body) == names


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["model", "a"]',
        b'{"model": "a"} {"model": "b"}',  # Go's decoder reads the first value only
        b'{"model": "a", "x": "\xff"}',  # not UTF-8: Go would read it, Python cannot
        b'{"model": ["a"]}',
        b'{"Name": 7}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_a_body_the_gate_cannot_read_as_ollama_would_is_refused(body: bytes) -> None:
    with pytest.raises(Unreadable):
        named_models(body)


def test_listings_keep_only_allowed_models() -> None:
    tags = {
        "models": [
            {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 1},
            {"name": "qwen2.5:0.5b", "model": "qwen2.5:0.5b"},
            {"name": "llama3.2:1b", "model": "qwen2.5:0.5b"},  # both names must be allowed
            {"name": "nomic-embed-text:latest"},
            {"size": 3},  # names nothing: not shown
        ]
    }
    out = json.loads(filter_listing("/api/tags", json.dumps(tags).encode(), CHAT))
    assert [m["name"] for m in out["models"]] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert out["models"][0]["size"] == 1
    openai = {"object": "list", "data": [{"id": "llama3.2:latest"}, {"id": "m1:latest"}]}
    out = json.loads(filter_listing("/v1/models", json.dumps(openai).encode(), CHAT))
    assert out == {"object": "list", "data": [{"id": "llama3.2:latest"}]}
    assert json.loads(filter_listing("/api/ps", b'{"models": null}', CHAT)) == {"models": []}
    for bad in (b"<html>", b'{"models": "all"}', b"[]"):
        with pytest.raises(Unreadable):
            filter_listing("/api/tags", bad, CHAT)


DIGEST = hash_secret("x")


def test_the_keys_file_takes_an_allow_list() -> None:
    ring = parse_keys(
        f"[keys.a]\nkey_sha256 = '{DIGEST}'\nmodels = ['llama3.2:*', 'nomic-embed-text']\n"
        f"[keys.b]\nkey_sha256 = '{hash_secret('y')}'\n"
    )
    assert ring.by_name["a"].models == CHAT
    assert ring.by_name["b"].models is None  # no list: every model


@pytest.mark.parametrize(
    ("models", "says"),
    [
        ("'llama3.2'", "models must be a list"),
        ("['llama3.2', 3]", "models: each entry must be a model name or glob"),
        ("['']", "models: each entry must be"),
        ("['llama[3]']", "letters, digits and"),
    ],
)
def test_a_bad_allow_list_names_file_line_and_field(models: str, says: str) -> None:
    with pytest.raises(KeysFileError) as info:
        parse_keys(f"[keys.a]\nkey_sha256 = '{DIGEST}'\n\nmodels = {models}\n", "keys.toml")
    assert (info.value.path, info.value.line) == ("keys.toml", 4)
    assert "[keys.a]: " in str(info.value) and says in str(info.value)
