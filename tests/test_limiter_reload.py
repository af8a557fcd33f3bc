"""SIGHUP re-reads the keys file in every worker, without a restart: real gunicorn, fake Ollama."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from limiter.reload import gunicorn_seams_missing
from tests.limiter_support import GatesFactory, quick_gates
from tests.support import Gate

SECRETS = {name: new_secret() for name in ("alice", "bob")}


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


def status_with(gate: Gate, name: str) -> int:
    """A light request (never queued behind the stream) with ``name``'s key."""
    headers = {"Authorization": f"Bearer {SECRETS[name]}"}
    return requests.get(gate.url + "/api/tags", headers=headers).status_code


def wait_for(what: str, check: object, timeout: float = 10) -> None:
    """Poll ``check()`` until it is true: the reload happens in the worker, asynchronously."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: {what}")
        time.sleep(0.05)


def test_the_gunicorn_seams_the_reload_uses_are_there() -> None:
    assert gunicorn_seams_missing() == []


def test_sighup_adds_and_removes_keys_while_a_stream_runs(
    fake: FakeOllama, gates: GatesFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(stanza("alice", SECRETS["alice"]))
    gate = gates(fake.url, {"GATE_API_KEYS_FILE": str(keys)})
    workers = gate.worker_pids()
    assert status_with(gate, "alice") == 200 and status_with(gate, "bob") == 401

    fake.configure(tokens=400, token_interval=0.02)  # about 8 s of tokens
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(
        gate.url + "/api/chat",
        json=chat,
        headers={"Authorization": f"Bearer {SECRETS['alice']}"},
        stream=True,
        timeout=30,
    ) as stream:
        lines = stream.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False

        # bob comes in, alice leaves: her running stream is not touched.
        keys.write_text(stanza("bob", SECRETS["bob"]))
        gate.proc.send_signal(signal.SIGHUP)
        wait_for("bob's key accepted", lambda: status_with(gate, "bob") == 200)
        assert status_with(gate, "alice") == 401
        assert fake.stats()["in_flight"]["llama3.2:latest"] == 1  # the stream still runs

        # A broken file is refused with the line named, and the keys in force stay.
        alice = stanza("alice", SECRETS["alice"]).replace('role = "user"', 'role = "root"')
        keys.write_text(stanza("bob", SECRETS["bob"]) + alice)
        gate.proc.send_signal(signal.SIGHUP)
        wait_for("the refusal logged", lambda: "keys file not reloaded" in gate.logs())
        assert 'keys.toml line 6: [keys.alice]: role must be "user" or "admin"' in gate.logs()
        assert status_with(gate, "bob") == 200 and status_with(gate, "alice") == 401

        rest = [json.loads(line) for line in lines]
    assert rest[-1]["done"] is True and "error" not in rest[-1]
    assert len(rest) + 1 == 401  # every token, then the final record
    assert gate.worker_pids() == workers  # nothing was restarted
    assert "Traceback" not in gate.logs()
