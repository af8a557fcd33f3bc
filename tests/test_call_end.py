"""The quick paths that end a call, each held to the plain code it stands for.

``parse_json`` to ``json.loads``, ``CallSignal.send_call`` to blinker's ``send``
and ``first_header`` to geventhttpclient's own ``get``: same answers, same errors.
"""

from __future__ import annotations

import codecs
import gc
import json
from typing import Any

import pytest
from geventhttpclient.response import HTTPResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import parse_json
from proxy.transport import first_header
from signals import CallSignal
from tests.support import example_count

# -- parse_json ----------------------------------------------------------------------------

JSON_TEXTS = [
    b'{"model": "llama3.2", "messages": []}',
    b'{"a": 1}\n',
    b'{"a": 1} \t\r\n',
    b'{"a": 1}\x0b',  # not JSON whitespace: extra data
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b"[1, 2, 3]",
    b"[1, 2",
    b"{",
    b"{}",
    b'{"a": NaN, "b": Infinity}',
    b'{"a": "\\ud800"}',  # a lone surrogate, escaped
    b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, raw: json passes it (surrogatepass)
    b'{"a": "\xff"}',  # not UTF-8
    b'{"a": 1, "a": 2}',
    b" {}",
    b"\n[]",
    b'"text"',
    b"12",
    b"",
    b"{\x00",
    b"{\x00\x00\x00",
    b"[\x00]",
    codecs.BOM_UTF8 + b'{"a": 1}',
    '{"a": 1}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-16-le"),
    '{"a": 1}'.encode("utf-16-be"),
    '{"a": 1}'.encode("utf-32"),
    '{"a": 1}'.encode("utf-32-le"),
    b"[" * 100_000 + b"]" * 100_000,
]


def outcome(parse: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(data)
    except RecursionError:
        return "deep", None
    except ValueError as exc:
        return "error", type(exc).__name__


@pytest.mark.parametrize("data", JSON_TEXTS)
def test_parse_json_is_json_loads(data: bytes) -> None:
    found, expected = outcome(parse_json, data), outcome(json.loads, data)
    assert found == expected or (found[0] == expected[0] == "ok" and _same(found, expected))


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN != NaN


@settings(max_examples=example_count(500))
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    ),
    st.sampled_from(["", " ", "\n", "\r\n\t", " x", "]"]),
)
def test_parse_json_reads_any_document_as_json_loads_does(doc: Any, tail: str) -> None:
    data = (json.dumps(doc) + tail).encode()
    found, expected = outcome(parse_json, data), outcome(json.loads, data)
    assert found[0] == expected[0] and _same(found, expected)


# -- CallSignal ------------------------------------------------------------------------------


class Sender:
    """A sender blinker refers to weakly, as it does to a Flask app."""


def test_send_call_reaches_whom_send_reaches_as_connections_change() -> None:
    signal = CallSignal("test")
    sender, other = Sender(), Sender()
    got: list[tuple[str, Any, Any]] = []

    def receiver(name: str) -> Any:
        def receive(s: Any, call: Any = None, **_: Any) -> None:
            got.append((name, s, call))

        return receive

    def both(s: Any) -> list[set[tuple[str, Any, Any]]]:
        got.clear()
        signal.send(s, call=1)
        by_send = set(got)
        got.clear()
        signal.send_call(s, 1)
        return [by_send, set(got)]

    to_sender, to_any, to_other = receiver("sender"), receiver("any"), receiver("other")
    assert both(sender) == [set(), set()]
    signal.connect(to_sender, sender=sender, weak=False)
    first, second = both(sender)
    assert first == second == {("sender", sender, 1)}
    signal.connect(to_any, weak=False)  # for every sender
    assert both(sender)[0] == both(sender)[1] == {("sender", sender, 1), ("any", sender, 1)}
    signal.connect(to_other, sender=other, weak=False)
    assert both(other)[0] == both(other)[1] == {("other", other, 1), ("any", other, 1)}
    signal.disconnect(to_any)
    assert both(sender)[0] == both(sender)[1] == {("sender", sender, 1)}
    signal.disconnect(to_sender, sender=sender)
    assert both(sender) == [set(), set()]
    with signal.connected_to(to_any):
        assert both(sender)[1] == {("any", sender, 1)}
    assert both(sender) == [set(), set()]


def test_send_call_forgets_a_receiver_that_died_and_a_sender_that_died() -> None:
    signal = CallSignal("test")
    sender = Sender()
    got: list[str] = []

    class Receiver:
        def receive(self, s: Any, call: Any = None) -> None:
            got.append("weak")

    held = Receiver()
    signal.connect(held.receive, sender=sender)  # weakly, as the limiter's bound method
    signal.send_call(sender, 1)
    assert got == ["weak"]
    del held
    gc.collect()
    signal.send_call(sender, 1)
    signal.send(sender, call=1)
    assert got == ["weak"] and not signal.receivers

    kept = Receiver()
    signal.connect(kept.receive, sender=sender)
    signal.send_call(sender, 1)
    assert got == ["weak", "weak"]
    del sender
    gc.collect()
    new = Sender()  # may take the dead sender's id(): its receivers must not follow
    signal.send_call(new, 1)
    assert got == ["weak", "weak"]


# -- first_header ----------------------------------------------------------------------------


def test_first_header_is_the_first_of_what_the_library_gives() -> None:
    raw = HTTPResponse()
    raw.feed(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Twice: one\r\n"
        b"x-twice: two\r\nContent-Length: 2\r\n\r\n{}"
    )
    for name in ("content-type", "x-twice", "content-length", "connection"):
        given_ = raw.get(name)
        first = given_[0] if isinstance(given_, list) else given_
        assert first_header(raw, name) == first  # type: ignore[arg-type]
    assert first_header(raw, "x-twice") == "one"
    assert first_header(raw, "connection") is None
