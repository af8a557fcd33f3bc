"""GATE_ACCESS_LOG under real gunicorn: one line per request, in logfmt or JSON lines.

A streamed answer, a non-streamed one, and refusals (no key, a bad body) each give
one line with who, what, status, wait, time to first byte, duration and tokens;
never a prompt or a secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import requests

from fakeollama import FakeOllama
from settings import Settings, SettingsError
from status.accesslog import FIELDS, AccessLog
from tests.status_support import fetch, wait_until
from tests.support import Gate

SECRET = "alice-secret-0123456789"
PROMPT = "the words of a private prompt"
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_text(line: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in LOGFMT.findall(line):
        out[name] = json.loads(value) if value.startswith('"') else value
    return out


def access_lines(gate: Gate, fmt: str) -> list[dict[str, Any]]:
    """The access log's lines, without start_gate's readiness probes (GET /api/version)."""
    lines = gate.logs().splitlines()
    if fmt == "json":
        found = [json.loads(line) for line in lines if line.startswith('{"time"')]
    else:
        found = [parse_text(line) for line in lines if line.startswith("time=")]
    return [line for line in found if line["path"] != "/api/version"]


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nkey_sha256 = "{sha256(SECRET.encode()).hexdigest()}"\n')
    return path


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_writes_one_line_per_request(
    fmt: str, fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = gate_factory(
        fake.url,
        {
            "GATE_ACCESS_LOG": "1" if fmt == "text" else "json",
            "GATE_API_KEYS_FILE": str(keys_file(tmp_path)),
        },
    )
    alice = {"Authorization": f"Bearer {SECRET}"}
    body = {"model": "m1", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    with requests.post(
        gate.url + "/api/chat", json=body, headers=alice, stream=True, timeout=10
    ) as r:
        assert r.status_code == 200
        records = [json.loads(line) for line in r.iter_lines() if line]
    assert records[-1]["done"] is True
    answer = fetch(
        gate.url + "/api/generate",
        "POST",
        json={"model": "m2", "prompt": PROMPT, "stream": False},
        headers=alice,
    )
    assert answer.status == 200
    assert fetch(gate.url + "/api/generate", "POST", json={"model": "m1"}).status == 401
    assert fetch(gate.url + "/api/chat?x=1", "POST", data=b"{", headers=alice).status == 400

    lines = wait_until(lambda: len(found := access_lines(gate, fmt)) >= 4 and found)
    by_path = {(line["path"], line["status"] and int(line["status"])): line for line in lines}
    assert len(lines) == 4, lines  # one each, and gunicorn's own access log stays quiet

    streamed = by_path[("/api/chat", 200)]
    assert streamed["client"] == "alice" and streamed["method"] == "POST"
    assert streamed["model"] == "m1:latest" and streamed["outcome"] == "ok"
    assert int(streamed["tokens_out"]) == 8 and int(streamed["tokens_in"]) > 0
    assert float(streamed["wait"]) >= 0
    assert 0 < float(streamed["ttfb"]) <= float(streamed["duration"])
    assert streamed["reason"] in (None, "-")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", streamed["time"])

    plain = by_path[("/api/generate", 200)]
    assert plain["model"] == "m2:latest" and int(plain["tokens_out"]) == 8

    no_key = by_path[("/api/generate", 401)]
    assert no_key["client"] == "127.0.0.1"  # no key: the address
    assert no_key["outcome"] == "refused" and no_key["reason"] == "invalid_api_key"
    assert float(no_key["duration"]) >= 0

    bad = by_path[("/api/chat", 400)]
    assert bad["client"] == "alice" and bad["reason"] == "invalid_request"
    assert bad["path"] == "/api/chat"  # never the query

    log = gate.logs()
    assert SECRET not in log and PROMPT not in log
    if fmt == "json":
        assert all(list(line)[: len(FIELDS)] == list(FIELDS) for line in lines)


def test_access_log_names_the_real_client_behind_a_trusted_proxy(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_ACCESS_LOG": "json", "GATE_TRUSTED_PROXIES": "1"})
    forwarded = {"X-Forwarded-For": "2001:db8::7"}
    body = {"model": "m1", "prompt": "x", "stream": False}
    assert fetch(gate.url + "/api/generate", "POST", json=body, headers=forwarded).status == 200
    (line,) = wait_until(lambda: access_lines(gate, "json"))
    assert line["client"] == "2001:db8::7"  # the address, not the limiter's /64


def test_access_log_is_off_by_default(fake: FakeOllama, gate: Gate) -> None:
    assert fetch(gate.url + "/api/generate", "POST", json={"model": "m1", "prompt": "x"}).status
    assert access_lines(gate, "text") == [] and access_lines(gate, "json") == []


def test_access_log_setting() -> None:
    assert Settings.from_env({}).access_log == "off"
    for value, fmt in (("1", "text"), ("on", "text"), ("text", "text"), ("JSON", "json")):
        assert Settings.from_env({"GATE_ACCESS_LOG": value}).access_log == fmt
    assert Settings.from_env({"GATE_ACCESS_LOG": "0"}).access_log == "off"
    with pytest.raises(SettingsError, match="GATE_ACCESS_LOG='loud': must be 1 .on. or 0"):
        Settings.from_env({"GATE_ACCESS_LOG": "loud"})


def test_text_lines_quote_what_clients_chose() -> None:
    line = AccessLog("text").format({"model": 'evil\nmodel" status=200', "path": "/api/chat"})
    assert "\n" not in line
    parsed = parse_text(line)
    assert parsed["model"] == 'evil\nmodel" status=200'
    assert parsed["status"] == "-"


def test_fast_path_refusals_are_logged_once_a_second_with_a_count(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_ACCESS_LOG": "json", "GATE_LIMIT_INFERENCE": "1/minute"})
    body = {"model": "m1", "prompt": "x", "stream": False}
    codes = [fetch(gate.url + "/api/generate", "POST", json=body).status for _ in range(6)]
    assert codes == [200] + [429] * 5

    def refusals() -> list[dict[str, Any]]:
        return [line for line in access_lines(gate, "json") if line["status"] == 429]

    # The first 429 comes from Flask-Limiter (a line of its own), the next ones from
    # the fast path: one line with their count, once the sampler has seen them.
    def counted() -> list[dict[str, Any]]:
        lines = refusals()
        return lines if sum(line.get("count", 1) for line in lines) == 5 else []

    found = wait_until(counted)
    assert found[0]["path"] == "/api/generate" and found[0]["reason"] == "rate_limit_exceeded"
    assert all(line["reason"] == "rate_limit_exceeded" for line in found)
    assert {line.get("class") for line in found[1:]} == {"inference"}
