"""The test harness itself: gates stop at once, and the hypothesis profiles."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import settings

from fakeollama import FakeOllama
from tests.support import Gate, alive, example_count, hypothesis_profile


def test_a_gate_stops_at_once_with_its_workers(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url)
    workers = gate.worker_pids()
    assert workers
    assert gate.stop() == -9  # SIGKILL to the group: no graceful drain
    assert [pid for pid in workers if alive(pid)] == []


@pytest.mark.parametrize(
    "environ, profile",
    [
        ({"CI": "true"}, "ci"),
        ({"CI": "1"}, "ci"),
        ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
        ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"),
        ({}, "dev"),
        ({"CI": "false"}, "dev"),
        ({"CI": ""}, "dev"),
    ],
)
def test_ci_loads_the_ci_profile(environ: dict[str, str], profile: str) -> None:
    assert hypothesis_profile(environ) == profile


@pytest.mark.parametrize("profile, count", [("ci", 500), ("dev", 100)])
def test_ci_runs_every_example_and_local_runs_a_fifth(profile: str, count: int) -> None:
    loaded = settings.get_current_profile_name()
    settings.load_profile(profile)
    try:
        assert example_count(500) == count
        assert example_count(20) == (20 if profile == "ci" else 10)
    finally:
        settings.load_profile(loaded)
