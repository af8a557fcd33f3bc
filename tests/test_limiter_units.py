"""The limiter's pure parts: limit strings, keys file, identities, headers, budgets, 429 cache."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from limits import parse_many

from limiter.budget import budget_state
from limiter.fastpath import RejectCache
from limiter.headers import REQUESTS, TOKENS, Quota, binding, limit_headers, retry_after
from limiter.identity import client_address, presented_secret
from limiter.keys import Keyring, KeysFileError, hash_secret, load_keys, parse_keys
from limiter.mint import new_secret, stanza
from limiter.policy import Rate, burst_room, normalize_limit, parse_limit
from pipeline import pipeline_of

# -- limit strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1/second",
        "60/minute;5/second",
        "10 per 5 seconds",
        "5/2 minutes",
        " 100 / hour ",
        "1/day|2/month,3/year",
        "7 PER Minute",
        "3000/minute;100/second",
    ],
)
def test_limit_grammar_agrees_with_the_limits_library(text: str) -> None:
    ours = [(rate.amount, rate.seconds) for rate in parse_limit(text)]
    theirs = [(item.amount, item.get_expiry()) for item in parse_many(text)]
    assert ours == theirs


@pytest.mark.parametrize(
    "text", ["fast", "5/minit", "5 every minute", "5/minute;", "/minute", "5/", "5/minute 6/hour"]
)
def test_limit_strings_the_limits_library_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_many(text)
    with pytest.raises(ValueError):
        parse_limit(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "'off'"),
        ("5/minit", "unknown period 'minit'"),
        ("0/minute", "1 or more"),  # limits accepts it; a limit that admits nothing is a typo
        ("5/0 minutes", "period must be 1 or more"),
    ],
)
def test_limit_errors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_limit(text)


def test_off_disables_and_limits_are_trimmed() -> None:
    assert parse_limit("OFF") == ()
    assert normalize_limit(" Off ") == "off"
    assert normalize_limit(" 60/minute ") == "60/minute"


def test_burst_room_is_the_smallest_count() -> None:
    assert burst_room("off") is None
    assert burst_room("60/minute;5/second") == Rate(5, 1)
    assert burst_room("120/minute;1000/day") == Rate(120, 60)


def test_a_limit_that_refuses_a_queue_share_burst_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from limiter.extension import GateLimiter
    from settings import Settings

    GateLimiter(Settings())  # the defaults admit a whole queue share at once
    assert "bursts the queue would hold" not in caplog.text
    GateLimiter(Settings(limit_inference="60/minute;5/second", queue_max_per_client=32))
    assert "GATE_LIMIT_INFERENCE=60/minute;5/second admits 5 requests per 1 s" in caplog.text
    assert "GATE_LIMIT_EMBED" not in caplog.text


# -- the keys file -------------------------------------------------------------------------

ALICE = "alice-secret"
ROOT = "root-secret"

KEYS = f"""
# the gate's keys
[keys.alice]
key_sha256 = "{hash_secret(ALICE)}"
role = "user"
limit_inference = "30/minute"
limit_light = "off"
tokens_per_minute = 20000
priority = "interactive"

[keys."ops@example.com"]
key_sha256 = "{hash_secret(ROOT).upper()}"
role = "admin"
"""


def test_keys_file_is_parsed() -> None:
    ring = parse_keys(KEYS)
    alice, ops = ring.keys
    assert (alice.name, alice.role, alice.tokens_per_minute) == ("alice", "user", 20000)
    assert alice.limits == {"inference": "30/minute", "light": "off"}
    assert (alice.priority, ops.priority) == ("interactive", "normal")  # normal by default
    assert not alice.is_admin
    assert (ops.name, ops.role, ops.limits, ops.tokens_per_minute) == (
        "ops@example.com",
        "admin",
        {},
        None,
    )
    assert ops.digest == hash_secret(ROOT)  # stored lower-case whatever the file says
    assert ring.by_name["alice"] is alice


def test_a_secret_finds_its_key_and_nothing_else() -> None:
    ring = parse_keys(KEYS)
    assert ring.lookup(ALICE) is ring.by_name["alice"]
    assert ring.lookup(ROOT) is ring.by_name["ops@example.com"]
    assert ring.lookup("alice-secret ") is None
    assert ring.lookup(hash_secret(ALICE)) is None  # the digest is not the secret
    assert ring.lookup("") is None


def _bad(text: str) -> KeysFileError:
    with pytest.raises(KeysFileError) as info:
        parse_keys(text, "keys.toml")
    return info.value


DIGEST = hash_secret("x")


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("[keys.a]\nkey_sha256 = 'abc\n", 2, "keys.toml line 2: "),
        (
            f"[keys.a]\nkey_sha256 = '{DIGEST}'\nrole = 'root'\n",
            3,
            'role must be "user" or "admin"',
        ),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\nlimit_inferance = '1/minute'\n", 3, "unknown field"),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\n\nlimit_embed = '9/minit'\n", 4, "unknown period"),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\nlimit_admin = 5\n", 3, "must be a string"),
        ("[keys.a]\nrole = 'user'\nkey_sha256 = 'not hex'\n", 3, "64 hex digits"),
        ("\n[keys.a]\nrole = 'user'\n", 2, "64 hex digits"),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\ntokens_per_minute = true\n", 3, "whole number"),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\ntokens_per_minute = 0\n", 3, "whole number"),
        (
            f"[keys.a]\nkey_sha256 = '{DIGEST}'\n\npriority = 'urgent'\n",
            4,
            "[keys.a]: priority must be 'interactive', 'normal', 'batch', not 'urgent'",
        ),
        (f"[keys.a]\nkey_sha256 = '{DIGEST}'\npriority = 0\n", 3, "priority must be"),
        (
            f"[keys.a]\nkey_sha256 = '{DIGEST}'\n[keys.b]\nkey_sha256 = '{DIGEST}'\n",
            4,
            "same key_sha256",
        ),
        (f'[keys."two words"]\nkey_sha256 = "{DIGEST}"\n', 1, "a key name is"),
        (f"[keys]\na = {{ key_sha256 = '{DIGEST}', role = 'boss' }}\n", 2, "role must be"),
        (f"[key.a]\nkey_sha256 = '{DIGEST}'\n", 1, "unexpected top-level entry 'key'"),
    ],
)
def test_keys_file_errors_name_the_file_and_line(text: str, line: int, says: str) -> None:
    error = _bad(text)
    assert (error.path, error.line) == ("keys.toml", line)
    assert str(error).startswith(f"keys.toml line {line}: ")
    assert says in str(error)


def test_a_keys_file_without_keys_is_refused(tmp_path: Path) -> None:
    assert "no keys defined" in str(_bad("# nothing yet\n"))
    with pytest.raises(KeysFileError, match="cannot read the keys file"):
        load_keys(tmp_path / "missing.toml")


def test_minted_stanza_is_a_valid_keys_file() -> None:
    secret = new_secret()
    assert secret.startswith("og-") and len(secret) > 40
    assert secret != new_secret()
    ring = parse_keys(stanza("bob.smith", secret, "admin", 500, ["llama3.2:*"]))
    (bob,) = ring.keys
    assert (bob.name, bob.role, bob.tokens_per_minute) == ("bob.smith", "admin", 500)
    assert bob.models is not None and bob.models.patterns == ("llama3.2:*",)
    assert ring.lookup(secret) is bob
    assert bob.priority == "normal"  # the default is not written
    (nightly,) = parse_keys(stanza("nightly", secret, priority="batch")).keys
    assert nightly.priority == "batch"


# -- who the client is ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("unix-socket", "unix-socket"),
        (None, "unknown"),
    ],
)
def test_client_address(addr: str | None, key: str) -> None:
    assert client_address(addr) == key


def test_presented_secret() -> None:
    assert presented_secret("Bearer s3cret", None) == ("s3cret", "authorization")
    assert presented_secret("bearer  s3cret ", None) == ("s3cret", "authorization")
    assert presented_secret("Basic dXNlcjpwYXNz", None) is None
    assert presented_secret("Bearer ", "k") == ("k", "x-api-key")
    assert presented_secret(None, None) is None


# -- headers -------------------------------------------------------------------------------

NOW = 1_000_000.0
MINUTE = Quota("inference-60s", 60, 60, 0, NOW + 12.2)
SECOND = Quota("inference-1s", 5, 1, 4, NOW + 0.5)
TOKENS_LEFT = Quota("tokens-60s", 2000, 60, 150, NOW + 80, TOKENS)


def test_headers_of_an_answer() -> None:
    ok = Quota("inference-60s", 60, 60, 41, NOW + 30.5)
    headers = limit_headers([ok, SECOND, TOKENS_LEFT], NOW, rejected=False)
    assert headers == {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": str(math.ceil(NOW + 0.5)),
        "RateLimit-Policy": '"inference-60s";q=60;w=60, "inference-1s";q=5;w=1, '
        '"tokens-60s";q=2000;w=60;qu="tokens"',
        "RateLimit": '"inference-60s";r=41;t=31, "inference-1s";r=4;t=1, "tokens-60s";r=150;t=80',
    }


def test_headers_of_a_rejection() -> None:
    headers = limit_headers([MINUTE, SECOND], NOW, rejected=True)
    assert headers["X-RateLimit-Limit"] == "60"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["Retry-After"] == "13"
    assert headers["RateLimit"] == '"inference-60s";r=0;t=13, "inference-1s";r=4;t=1'


def test_retry_after_waits_for_every_exhausted_quota() -> None:
    spent = Quota("tokens-60s", 2000, 60, 0, NOW + 40, TOKENS)
    assert retry_after([MINUTE, spent, SECOND], NOW) == 40
    assert binding([MINUTE, spent, SECOND]) is spent
    # A quota that frees in a fraction of a second still says 1.
    assert retry_after([Quota("x-1s", 1, 1, 0, NOW + 0.01)], NOW) == 1


def test_binding_prefers_request_quotas_when_none_is_exhausted() -> None:
    roomy = Quota("light-60s", 100, 60, 99, NOW + 60)
    assert binding([roomy, SECOND]) is SECOND
    assert binding([TOKENS_LEFT, roomy]) is roomy
    assert binding([TOKENS_LEFT]) is TOKENS_LEFT
    assert REQUESTS == roomy.unit


def test_no_quota_no_headers() -> None:
    assert limit_headers([], NOW, rejected=True) == {}


# -- token budgets -------------------------------------------------------------------------


def test_a_fresh_budget() -> None:
    state = budget_state(100, 60, 0, 0.0, 0, 0.0, NOW)
    assert (state.used, state.remaining, state.spent, state.reset) == (0, 100, False, NOW)


def test_a_budget_partly_used() -> None:
    # 30 s into the window: the previous window (40 tokens) counts for half.
    state = budget_state(100, 60, 40, 30.0, 50, 90.0, NOW)
    assert (state.used, state.remaining, state.spent) == (70, 30, False)
    assert state.reset == NOW + 30 + 60  # this window's tokens have left the sliding window


def test_a_budget_spent_in_this_window_frees_after_it() -> None:
    # 200 tokens this window, 10 s before it ends: 10 s, then until 200 * (60 - x) / 60 < 100.
    state = budget_state(100, 60, 0, 0.0, 200, 70.0, NOW)
    assert state.spent and state.remaining == 0
    assert state.reset == pytest.approx(NOW + 10 + 30)


def test_a_budget_spent_by_the_previous_window_frees_as_it_slides_out() -> None:
    # previous 120 counting for 45 of 60 s (90) + current 20 = 110; need 120 * p / 60 < 80.
    state = budget_state(100, 60, 120, 45.0, 20, 105.0, NOW)
    assert state.used == 110 and state.spent
    assert state.reset == pytest.approx(NOW + 45 - 40)
    later = budget_state(100, 60, 120, 45.0 - 5.01, 20, 105.0 - 5.01, NOW)
    assert not later.spent


# -- the 429 cache in front of Flask -------------------------------------------------------


class Downstream:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"forwarded"]


def _call(cache: RejectCache, path: str, method: str = "POST", addr: str = "127.0.0.1") -> tuple:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(
        cache({"PATH_INFO": path, "REQUEST_METHOD": method, "REMOTE_ADDR": addr}, start_response)
    )
    return seen["status"], seen["headers"], body


def _cache() -> tuple[RejectCache, Downstream, Counter[str]]:
    downstream = Downstream()
    rejections: Counter[str] = Counter()
    cache = RejectCache(downstream, None, rejections)
    cache.routes = {
        ("/api/generate", "POST"): "inference",
        ("/v1/chat/completions", "POST"): "inference",
        ("/api/tags", "GET"): "light",
        ("/api/tags", "HEAD"): "light",
    }
    return cache, downstream, rejections


def test_blocked_client_is_answered_without_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("limiter.fastpath.time.time", lambda: NOW)
    cache, downstream, rejections = _cache()
    cache.block("ip:127.0.0.1", "inference", NOW + 12.2, "rate limit exceeded: x", [MINUTE])
    status, headers, body = _call(cache, "/api/generate")
    assert status.startswith("429")
    assert headers["Retry-After"] == "13"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["Content-Length"] == str(len(body))
    assert json.loads(body) == {"error": "rate limit exceeded: x; retry in 13s"}
    _, _, body = _call(cache, "/v1/chat/completions")
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert downstream.calls == 0
    assert rejections == {"inference": 2}
    # Another client, another class, another method: not blocked.
    for path, method, addr in [
        ("/api/generate", "POST", "127.0.0.2"),
        ("/api/tags", "GET", "127.0.0.1"),
        ("/api/generate", "GET", "127.0.0.1"),
    ]:
        assert _call(cache, path, method, addr)[0] == "200 OK"
    assert downstream.calls == 3


def test_a_block_ends_at_its_time_and_head_gets_no_body(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [NOW]
    monkeypatch.setattr("limiter.fastpath.time.time", lambda: clock[0])
    cache, downstream, _ = _cache()
    cache.block("ip:127.0.0.1", "light", NOW + 2, "rate limit exceeded: y", [MINUTE])
    status, headers, body = _call(cache, "/api/tags", "HEAD")
    assert status.startswith("429") and body == b""
    clock[0] = NOW + 2
    assert _call(cache, "/api/tags", "GET")[0] == "200 OK"
    assert cache.blocks == {}


def test_the_extension_counts_rejections_for_the_status_page() -> None:
    from app import create_app
    from settings import Settings

    off = dict(limit_inference="off", limit_embed="off", limit_admin="off")
    app = create_app(Settings(upstream="http://127.0.0.1:9", limit_light="1/minute", **off))
    client = app.test_client()
    assert client.get("/api/tags").status_code == 502  # forwarded: nothing listens there
    assert [client.get("/api/tags").status_code for _ in range(2)] == [429, 429]
    assert client.get("/api/ps").status_code == 429  # the same class, and the same client
    assert client.get("/api/tags", environ_base={"REMOTE_ADDR": "127.0.0.2"}).status_code == 502
    limiter = pipeline_of(app).limiter
    assert limiter is not None
    stats = limiter.stats()
    assert stats["rejected"] == {"inference": 0, "embed": 0, "admin": 0, "light": 3}
    assert (stats["storage"], stats["storage_fallback"]) == ("memory://", False)


def test_the_gates_own_endpoints_are_in_no_class() -> None:
    from app import create_app
    from settings import Settings

    limits = {f"limit_{cls}": "1/minute" for cls in ("inference", "embed", "admin", "light")}
    app = create_app(Settings(upstream="http://127.0.0.1:9", **limits))
    client = app.test_client()
    for path in ("/gate/status.json", "/metrics"):
        for _ in range(3):
            answer = client.get(path)
            assert answer.status_code == 200
            assert "X-RateLimit-Limit" not in answer.headers


@pytest.mark.parametrize("reachable", [True, False])
def test_flask_limiter_fallback_is_read_through_its_public_properties(reachable: bool) -> None:
    # counting_in_memory reads Flask-Limiter's fallback from its public `limiter` and
    # `storage` properties; should the library stop swapping strategies that way, this fails.
    from flask import Flask
    from flask_limiter import Limiter

    from limiter.extension import counting_in_memory, storage_options
    from tests.support import free_port

    uri = "memory://" if reachable else f"redis://127.0.0.1:{free_port()}/0"
    app = Flask(__name__)
    limits = Limiter(
        key_func=lambda: "client",
        app=app,
        default_limits=["5/minute"],
        storage_uri=uri,
        storage_options=storage_options(uri),
        in_memory_fallback_enabled=True,
        in_memory_fallback=["5/minute"],
        swallow_errors=True,
    )
    app.add_url_rule("/", view_func=lambda: "ok")
    assert not counting_in_memory(limits)
    with app.test_client() as client:
        assert [client.get("/").status_code for _ in range(6)] == [200] * 5 + [429]
    assert counting_in_memory(limits) is not reachable


# -- the failed-key guard ------------------------------------------------------------------


class CountingKeyring(Keyring):
    """A keyring that counts how often a secret is compared."""

    compared = 0

    def lookup(self, secret: str) -> Any:
        CountingKeyring.compared += 1
        return super().lookup(secret)


def test_a_shut_out_address_is_refused_before_any_key_is_compared() -> None:
    from limits.storage import MemoryStorage

    from limiter.guard import AuthGuard

    keyring = CountingKeyring(parse_keys(KEYS).keys)
    guard = AuthGuard("3/minute", MemoryStorage())
    downstream = Downstream()
    cache = RejectCache(downstream, keyring, Counter(), guard)
    cache.block("key:alice", "inference", 2e9, "x", [MINUTE])  # the cache looks keys up
    cache.routes = {("/api/generate", "POST"): "inference"}
    seen: dict[str, Any] = {}

    def call(addr: str, path: str = "/api/generate", **headers: str) -> str:
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "POST", "REMOTE_ADDR": addr, **headers}
        b"".join(cache(environ, lambda status, _: seen.update(status=status)))
        return str(seen["status"])

    bearer = {"HTTP_AUTHORIZATION": f"Bearer {ALICE}"}
    for _ in range(2):
        guard.failed("127.0.0.1")
    assert call("127.0.0.1", **bearer).startswith("429")  # alice's own block, looked up
    assert CountingKeyring.compared == 1
    guard.failed("127.0.0.1")  # the third: the window is full
    assert guard.blocked_until("127.0.0.1") is not None
    assert call("127.0.0.1", **bearer) == "429 TOO MANY REQUESTS"
    assert call("127.0.0.1") == "429 TOO MANY REQUESTS"  # with no key at all too
    assert CountingKeyring.compared == 1  # nothing compared for the shut-out address
    assert call("127.0.0.1", path="/gate/status.json") == "200 OK"  # its own pages, keyless
    assert call("127.0.0.2", path="/api/tags") == "200 OK"  # another address
    assert guard.stats() == {"limit": "3/minute", "blocked": 1, "refused": 2, "failures": 3}


def test_the_guard_is_off_with_off_or_without_keys(tmp_path: Path) -> None:
    from app import create_app
    from settings import Settings

    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    base = Settings(upstream="http://127.0.0.1:9", api_keys_file=str(keys))
    on = create_app(base).extensions["gate"].limiter
    assert on is not None and on.stats()["auth_guard"]["limit"] == "20/minute"
    for settings in (base.replace(auth_fail_limit="off"), Settings(upstream="http://127.0.0.1:9")):
        limiter = create_app(settings).extensions["gate"].limiter
        assert limiter is not None and limiter.stats()["auth_guard"] is None
