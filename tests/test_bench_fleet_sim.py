"""bench/fleet_sim.py drives the real FleetScheduler through bench/fleet.py's flood in
virtual time.

What is asserted holds by construction, not as a performance figure: every job of the
plan ends, the simulated backends never exceed their places or slots, no makespan beats
the bench's lower bound, and a fixed plan that copies the gate's own layout schedules
exactly as the gate does (so the plans ``--search`` compares are on the gate's footing).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("fleet_sim", ROOT / "bench" / "fleet_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = module
    spec.loader.exec_module(module)
    return module


sim = _load()


class Watched(sim.SimBackend):  # type: ignore[misc,name-defined]
    """A simulated backend that records the most models and jobs it ever held."""

    peak_models = 0
    peak_slots = 0

    def _admit(self, job: Any) -> None:
        super()._admit(job)
        resident = len(self.loaded) + (self.loading is not None)
        Watched.peak_models = max(Watched.peak_models, resident)
        Watched.peak_slots = max(Watched.peak_slots, max(self.running.values()))


@pytest.mark.parametrize("mix", ["even", "skewed"])
def test_the_gate_in_virtual_time_ends_every_job_within_places_and_slots(
    mix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim, "SimBackend", Watched)
    Watched.peak_models = Watched.peak_slots = 0
    result, run = sim.simulate(mix)
    setup = run.setup
    assert all(job.ended is not None for job in run.jobs.values())
    assert sum(sum(where.values()) for where in result["placement"].values()) == setup.jobs
    counts = Counter(model.removesuffix(":latest") for c in setup.plan() for model in c)
    assert {m: sum(w.values()) for m, w in result["placement"].items()} == dict(counts)
    assert Watched.peak_models <= max(setup.places)
    assert Watched.peak_slots <= setup.num_parallel
    assert result["loads"] >= setup.models
    assert result["makespan"] >= sim.lower_bound(setup)["seconds"]


def test_a_plan_of_the_gates_own_layout_schedules_as_the_gate() -> None:
    gate, _ = sim.simulate("skewed")
    layout = sim.arrival_layout(sim.LOADED)
    assert sorted(m for models in layout.initial for m in models) == sorted(
        sim.bench_setup("skewed").model_names
    )
    assert sim.plan_run(layout, sim.LOADED) == (gate["makespan"], gate["loads"])


def test_a_plan_that_leaves_a_model_no_place_never_ends() -> None:
    layout = sim.arrival_layout(sim.LOADED)
    (a_first, a_second), (b_model,), c = layout.initial
    # b's model gives its place to a's second model at 1 s, and never gets one back.
    plan = sim.Plan(layout.initial, ((1.0, 1, b_model, a_second),))
    makespan, _ = sim.plan_run(plan, sim.LOADED)
    assert makespan == float("inf")
