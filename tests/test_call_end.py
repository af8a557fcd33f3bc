"""The quick paths that end a call, each held to the plain code it stands for.

``parse_json`` to ``json.loads``, ``Labels`` (which skips ``expire`` until a name may
be due) to a plain OrderedDict that checks on every call, ``Metrics.call_finished`` (which finds a
call's series once per label values) to one that looks each up on every call,
and ``first_header`` to geventhttpclient's own ``get``: same answers, same errors.
"""

from __future__ import annotations

import codecs
import json
import math
from collections import OrderedDict
from typing import Any

import pytest
from geventhttpclient.response import HTTPResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from endpoints import QUEUED_CLASSES
from pipeline import Call, parse_json
from proxy.transport import first_header, header_lines
from proxy.views import GATE_HEADERS, REQUEST_SKIP, upstream_headers
from settings import Settings
from status.board import OTHER, Labels
from status.metrics import MAX_MODELS, MODEL_IDLE, Metrics
from tests.support import example_count
from workqueue.core import PRIORITIES

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


@settings(max_examples=example_count(100))
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    ),
    st.sampled_from(["", " ", "\n", "\r\n\t", " x", "]"]),
)
def test_parse_json_reads_any_document_as_json_loads_does(doc: Any, tail: str) -> None:
    data = (json.dumps(doc) + tail).encode()
    found, expected = outcome(parse_json, data), outcome(json.loads, data)
    assert found[0] == expected[0] and _same(found, expected)


# -- Labels ----------------------------------------------------------------------------------


class PlainLabels:
    """Labels as they were: every miss checks for expired names from the oldest on."""

    def __init__(self, cap: int, idle: float = math.inf) -> None:
        self.cap, self.idle = cap, idle
        self.seen: OrderedDict[str, float] = OrderedDict()

    def label(self, name: str, now: float, *, claim: bool = True) -> str:
        if name in self.seen:
            self.seen[name] = now
            self.seen.move_to_end(name)
            return name
        self.expire(now)
        if not claim or len(self.seen) >= self.cap:
            return OTHER
        self.seen[name] = now
        return name

    def expire(self, now: float) -> list[str]:
        gone = []
        while self.seen:
            name, seen = next(iter(self.seen.items()))
            if seen + self.idle > now:
                break
            del self.seen[name]
            gone.append(name)
        return gone


label_steps = st.lists(
    st.tuples(
        st.sampled_from(["label", "expire"]),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        # Times that go back as well as forth: tests drive the Labels with made-up times.
        st.floats(min_value=0, max_value=50, allow_nan=False),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=example_count(200))
@given(label_steps, st.sampled_from([math.inf, 0.0, 5.0, 10.0]))
def test_labels_answer_as_labels_that_check_every_time(steps: list[Any], idle: float) -> None:
    quick, plain = Labels(3, idle), PlainLabels(3, idle)
    for op, name, now, claim in steps:
        if op == "label":
            assert quick.label(name, now, claim=claim) == plain.label(name, now, claim=claim)
        else:
            assert quick.expire(now) == plain.expire(now)
        assert list(quick._seen.items()) == list(plain.seen.items())


# -- Metrics.call_finished -------------------------------------------------------------------


class PlainMetrics(Metrics):
    """Metrics as they were: each series of a call looked up anew on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.models = PlainLabels(MAX_MODELS, MODEL_IDLE)  # type: ignore[assignment]

    def model_label(self, model: str, now: float, *, claim: bool = True) -> str:
        for gone in self.models.expire(now):
            for metric, labels in self._series.pop(gone, ()):
                metric.remove(labels)
        return self.models.label(model, now, claim=claim)

    def call_finished(self, call: Any, now: float | None = None) -> None:
        cls = call.cls
        ok = call.status is None or not 400 <= call.status < 500
        assert now is not None
        model = self.model_label(call.model or "", now, claim=ok)
        if cls in QUEUED_CLASSES:
            waited = call.waited
            self.queue_wait.observe(self._child(self.queue_wait, model, cls, model), waited)
            priority = getattr(call, "priority", None)
            if priority in PRIORITIES:
                by_priority = self.queue_wait_by_priority
                by_priority.observe(by_priority.child((priority,)), waited)
        if call.ttfb is not None:
            self.ttfb.observe(self._child(self.ttfb, model, cls, model), call.ttfb)
        self.duration.observe(self._child(self.duration, model, cls, model), call.duration)
        code = str(call.status or "")
        self._child(self.requests, model, cls, model, call.outcome, code)[0] += 1
        if call.prompt_tokens:
            self._child(self.tokens, model, model, "in")[0] += call.prompt_tokens
        if call.completion_tokens:
            self._child(self.tokens, model, model, "out")[0] += call.completion_tokens


call_steps = st.lists(
    st.tuples(
        st.sampled_from(["inference", "embed", "admin", "light"]),
        st.sampled_from([None, "m1:latest", "m2:latest", "m3:latest", "m4:latest"]),
        st.sampled_from([200, 404, 500, None, 0]),
        st.sampled_from(["ok", "client_gone", "upstream_error"]),
        st.sampled_from([None, 0.0, 0.004, 2.0, math.nan]),
        st.sampled_from([0.0, 0.3, 1000.0]),
        st.sampled_from([(0, 0), (1, 8), (0, 3)]),
        st.sampled_from([*PRIORITIES, "none"]),
        st.sampled_from([0.0, 1.0, MODEL_IDLE + 1]),  # time since the step before
    ),
    max_size=40,
)


@settings(max_examples=example_count(60))
@given(call_steps)
def test_metrics_count_calls_as_metrics_that_look_up_every_series(steps: list[Any]) -> None:
    quick, plain = Metrics(), PlainMetrics()
    now = 1000.0
    for cls, model, status, end, ttfb, waited, tokens, priority, later in steps:
        now += later
        call = Call(cls, "POST", "/api/chat", "alice", model=model, priority=priority)
        call.status, call.outcome, call.ttfb, call.waited = status, end, ttfb, waited
        call.prompt_tokens, call.completion_tokens = tokens
        call.ended = call.started + 0.25
        quick.call_finished(call, now)
        plain.call_finished(call, now)
        if later > MODEL_IDLE:  # labels expired before this call: their series went
            assert quick.exposition(None, {}) == plain.exposition(None, {})
    assert quick.exposition(None, {}) == plain.exposition(None, {})


@pytest.mark.parametrize("cls", ["inference", "light"])
def test_metrics_count_a_model_again_after_its_series_expired(cls: str) -> None:
    """The series a model's calls were counted in go when its label expires; its next
    call, alike in every label, counts in new ones that /metrics shows."""
    quick, plain = Metrics(), PlainMetrics()
    now = 1000.0
    for step in range(3):
        call = Call(cls, "POST", "/api/chat", "alice", model="m1:latest")
        call.status, call.ttfb, call.waited = 200, 0.004, 0.3
        call.prompt_tokens, call.completion_tokens = 1, 8
        call.ended = call.started + 0.25
        quick.call_finished(call, now)
        plain.call_finished(call, now)
        scrape = quick.exposition(None, {})
        assert scrape == plain.exposition(None, {})
        assert b'model="m1:latest"' in scrape, step
        now += MODEL_IDLE + 1


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


def test_header_lines_are_what_the_library_lists() -> None:
    raw = HTTPResponse()
    raw.feed(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Twice: one\r\n"
        b"Date: now\r\nx-twice: two\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert header_lines(raw) == list(raw.items())
    assert ("x-twice", "two") in header_lines(raw)


# -- upstream_headers ------------------------------------------------------------------------


def plain_upstream_headers(environ: dict[str, Any], consumed: frozenset[str]) -> dict[str, str]:
    """upstream_headers as it was: through the whole environ, key by key."""
    connection = environ.get("HTTP_CONNECTION")
    skip = REQUEST_SKIP | GATE_HEADERS
    if connection or consumed:
        names = {t.strip().lower() for t in (connection or "").split(",") if t.strip()}
        skip = skip | names | consumed
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            name, empty_counts = key[5:].replace("_", "-").title(), True
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name, empty_counts = key.replace("_", "-").title(), False
        else:
            continue
        if name.lower() not in skip and (value or empty_counts):
            out[name] = value
    return out


environ_keys = st.sampled_from(
    [
        "REQUEST_METHOD",
        "wsgi.input",
        "HTTP_HOST",
        "HTTP_USER_AGENT",
        "HTTP_X_API_KEY",
        "HTTP_AUTHORIZATION",
        "HTTP_CONNECTION",
        "HTTP_KEEP_ALIVE",
        "HTTP_X_GATE_PRIORITY",
        "HTTP_CONTENT_TYPE",
        "HTTP_X_CUSTOM",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "C",
        "H",
        "",
    ]
)


@settings(max_examples=example_count(500))
@given(
    st.lists(
        st.lists(
            st.tuples(environ_keys, st.sampled_from(["", "x", "keep-alive, X-Custom", "close"])),
            max_size=12,
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([frozenset(), frozenset({"authorization"}), frozenset({"x-api-key"})]),
)
def test_upstream_headers_are_what_going_through_the_environ_gives(
    requests: list[list[tuple[str, str]]], consumed: frozenset[str]
) -> None:
    for items in requests + requests:  # each environ's keys found anew, then remembered
        environ = dict(items)
        assert list(upstream_headers(environ, consumed).items()) == list(
            plain_upstream_headers(environ, consumed).items()
        )


# -- the limiter's word for the light lane ---------------------------------------------------


def test_the_lane_hears_the_same_for_an_address_each_time_and_the_answers_stay_bounded() -> None:
    from limiter.extension import _ANONYMOUS_KEPT, GateLimiter

    off = {f"limit_{c}": "off" for c in ("inference", "embed", "admin", "light")}
    limiter = GateLimiter(Settings(anon_priority="normal", **off))
    limited = GateLimiter(Settings(anon_priority="normal", **{**off, "limit_light": "5/second"}))
    cases = [
        ({"REMOTE_ADDR": "10.0.0.1"}, "inference", ("10.0.0.1", "normal")),
        ({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_GATE_PRIORITY": "batch"}, "inference", "batch"),
        # A priority above the ceiling is served at the ceiling.
        ({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_GATE_PRIORITY": "interactive"}, "embed", "normal"),
        ({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_GATE_PRIORITY": "nonsense"}, "inference", None),
        ({"REMOTE_ADDR": "2001:db8::1"}, "light", ("2001:db8::/64", "normal")),
        ({}, "light", ("unknown", "normal")),
    ]
    for _ in range(2):  # found, then remembered
        for environ, cls, expected in cases:
            who = limiter.identify_lane(environ, cls)
            if expected is None:
                assert who is None  # no such class: Flask answers the 400
            elif isinstance(expected, str):
                assert who is not None and who.priority == expected
            else:
                assert who is not None and (who.client, who.priority) == expected
                assert who.consumed == frozenset()
        assert limited.identify_lane({"REMOTE_ADDR": "10.0.0.1"}, "light") is None
    for i in range(_ANONYMOUS_KEPT + 10):
        limiter.identify_lane(
            {"REMOTE_ADDR": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"}, "light"
        )
    assert len(limiter._anonymous) <= _ANONYMOUS_KEPT
