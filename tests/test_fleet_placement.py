"""Placement over several backends: a fleet of one is today's Scheduler; then each rule;
then random runs over random fleets."""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event
from hypothesis import strategies as st

import tests.test_key_caps as key_caps_tests
import tests.test_workqueue_core as core_tests
from errors import ClientShareFull, QueueFull
from fleet.config import Backend
from fleet.placement import FleetScheduler, View
from tests.machines import PICK, initialize, invariant, machine_test, picked, rule
from tests.test_key_caps import CapsMachine
from tests.test_workqueue_core import SchedulerMachine
from workqueue import Admission, Scheduler

RUNNING = Admission.RUNNING
WAITING = Admission.WAITING
GB = 10**9


def fleet_of_one(
    *, concurrency: int = 1, max_active_models: int = 1, **kwargs: Any
) -> FleetScheduler:
    """A FleetScheduler taking Scheduler's arguments, with one backend that knows nothing."""
    solo = Backend("solo", "http://127.0.0.1:11434", max_active_models, concurrency)
    return FleetScheduler([solo], **kwargs)


def where(s: FleetScheduler, job_id: Hashable) -> str:
    """The name of the backend a running job was placed on."""
    placed = s.backend_of(job_id)
    assert placed is not None
    return placed.name


def backend(name: str, max_models: int = 1, slots: int = 1, **kwargs: Any) -> Backend:
    return Backend(name, f"http://{name}:11434", max_models, slots, **kwargs)


# A fleet of one decides exactly as Scheduler does.

CORE_RULE_TESTS = [
    name
    for name, function in inspect.getmembers(core_tests, inspect.isfunction)
    if name.startswith("test_") and "make(" in inspect.getsource(function)
]


def test_the_core_rule_tests_are_found() -> None:
    assert len(CORE_RULE_TESTS) >= 25


@pytest.mark.parametrize("name", CORE_RULE_TESTS)
def test_each_core_rule_holds_for_a_fleet_of_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_tests, "make", fleet_of_one)
    test: Callable[..., None] = getattr(core_tests, name)
    marks = getattr(test, "pytestmark", [])
    params = [mark for mark in marks if mark.name == "parametrize"]
    if not params:
        test()
        return
    (mark,) = params
    for values in mark.args[1]:
        test(*values) if isinstance(values, tuple) else test(values)


class FleetOfOneMachine(SchedulerMachine):
    """Today's scheduler state machine, every check included, run on a fleet of one."""

    @initialize(
        concurrency=st.integers(1, 3),
        c_slots=st.integers(1, 3),
        max_active=st.integers(1, 2),
        queue_max=st.integers(2, 10),
        per_client=st.integers(1, 5),
        timeout=st.sampled_from([3.0, 5.0, 30.0]),
        switch_after=st.sampled_from([0.0, 1.0, 2.5]),
        admin_slots=st.integers(1, 2),
        job_max=st.sampled_from([1.0, 2.5, 6.0]),
        aging=st.sampled_from([1.5, 4.0, 60.0]),
    )
    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.s = fleet_of_one(  # type: ignore[assignment]
            concurrency=kwargs["concurrency"],
            overrides={"c": kwargs["c_slots"]},
            max_active_models=kwargs["max_active"],
            queue_max=kwargs["queue_max"],
            queue_max_per_client=kwargs["per_client"],
            queue_timeout=kwargs["timeout"],
            switch_after=kwargs["switch_after"],
            admin_concurrency=kwargs["admin_slots"],
            priority_aging=kwargs["aging"],
        )


test_scheduler_rules_hold_for_a_fleet_of_one = machine_test(
    FleetOfOneMachine, max_examples=100, step_count=50
)


class SideBySide:
    """The same events to a Scheduler and a fleet of one: every answer is the same."""

    @initialize(
        concurrency=st.integers(1, 3),
        max_active=st.integers(1, 3),
        queue_max=st.integers(2, 12),
        per_client=st.integers(1, 6),
        timeout=st.sampled_from([3.0, 30.0]),
        switch_after=st.sampled_from([0.0, 1.0, 2.5]),
        aging=st.sampled_from([1.5, 60.0]),
        caps=st.tuples(st.sampled_from([None, 1, 2]), st.sampled_from([None, 1])),
    )
    def setup(self, **kwargs: Any) -> None:
        # Clients' running caps (an API key's max_running); z has none.
        self.caps: dict[str, int | None] = {"x": kwargs["caps"][0], "y": kwargs["caps"][1]}
        args = {
            "concurrency": kwargs["concurrency"],
            "overrides": {"c": 2},
            "max_active_models": kwargs["max_active"],
            "queue_max": kwargs["queue_max"],
            "queue_max_per_client": kwargs["per_client"],
            "queue_timeout": kwargs["timeout"],
            "switch_after": kwargs["switch_after"],
            "priority_aging": kwargs["aging"],
        }
        self.old = Scheduler(**args)
        self.new = fleet_of_one(**args)
        self.now = 0.0
        self.ids = itertools.count()
        self.live: set[int] = set()

    def both(self, call: Callable[[Any], Any]) -> Any:
        outcomes = []
        for s in (self.old, self.new):
            try:
                outcomes.append(("ok", call(s)))
            except (QueueFull, ClientShareFull) as exc:
                outcomes.append((type(exc).__name__, exc.retry_after))
        assert outcomes[0] == outcomes[1]
        return outcomes[0]

    @rule(
        model=st.sampled_from(["a", "b", "c", "d"] + [f"m{i}" for i in range(20)]),
        client=["x", "y", "z"],
        admin=[False, False, False, True],
        priority=["interactive", "normal", "normal", "batch"],
    )
    def submit(self, model: str, client: str, admin: bool, priority: str) -> None:
        job_id = next(self.ids)
        cap = self.caps.get(client)
        kind, _ = self.both(
            lambda s: s.submit(
                job_id, model, client, self.now, admin=admin, max_running=cap, priority=priority
            )
        )
        if kind == "ok":
            self.live.add(job_id)

    @rule(pick=PICK)
    def finish(self, pick: int) -> None:
        if not self.live:
            return
        job_id = picked(self.live, pick)
        self.live.discard(job_id)
        self.both(lambda s: s.finish(job_id, self.now))

    @rule(step=[0.0, 0.5, 1.0, 2.0, 4.0, 400.0])
    def advance(self, step: float) -> None:
        self.now += step
        kind, (expired, _) = self.both(lambda s: s.expire(self.now))
        self.live.difference_update(expired)
        self.both(lambda s: s.tick(self.now))

    @invariant()
    def same_view(self) -> None:
        if not hasattr(self, "old"):
            return
        assert self.old.next_deadline() == self.new.next_deadline()
        assert self.old.pending_switch(self.now) == self.new.pending_switch(self.now)
        assert self.old.retry_after(self.now) == self.new.retry_after(self.now)
        old, new = self.old.snapshot(self.now), self.new.snapshot(self.now)
        backends = new.pop("backends")
        assert old == new
        (solo,) = backends
        assert solo["running"] == sum(row["running"] for row in old["models"].values())
        for job_id in self.live:
            assert self.old.job_state(job_id) == self.new.job_state(job_id)


test_a_fleet_of_one_answers_as_the_scheduler = machine_test(
    SideBySide, max_examples=100, step_count=60
)


# The placement rules, one by one


def test_a_job_goes_where_its_model_is_loaded() -> None:
    s = FleetScheduler([backend("a"), backend("b"), backend("c")])
    s.observe("b", View(loaded={"llama3.2": 2 * GB}), 0.0)
    assert s.submit(1, "llama3.2", "x", 0.0) is RUNNING
    assert where(s, 1) == "b"


def test_then_where_it_fits_without_evicting_then_where_an_idle_model_makes_way() -> None:
    big, small = backend("big", max_models=2), backend("small", max_models=1)
    s = FleetScheduler([small, big])
    s.observe("small", View(loaded={"other": GB}), 0.0)
    s.observe("big", View(loaded={"other": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert where(s, 1) == "big"  # room for a second model: nothing evicted
    s.finish(1, 1.0)
    s.observe("big", View(loaded={"other": GB, "n": GB}), 1.0)
    assert s.submit(2, "m2", "x", 1.0) is RUNNING
    assert s.backend_of(2).name == "small"  # both full: the least busy evicts (weights equal)


def test_the_least_busy_backend_for_its_weight_takes_a_model_loaded_everywhere() -> None:
    s = FleetScheduler([backend("a", slots=4), backend("b", slots=4, weight=3.0)])
    for name in ("a", "b"):
        s.observe(name, View(loaded={"m": GB}), 0.0)
    placed = []
    for job in range(8):
        assert s.submit(job, "m", "x", 0.0) is RUNNING
        placed.append(where(s, job))
    # b, three times the weight, takes three jobs for each of a's until it is full
    assert placed[:4] == ["b", "b", "a", "b"]
    assert sorted(placed) == ["a"] * 4 + ["b"] * 4


def test_vram_budget_counts_the_sizes_of_the_models_running_there() -> None:
    gpu = backend("gpu", max_models=3, vram=10 * GB)
    s = FleetScheduler([gpu])
    s.observe("gpu", View(installed={"a": 6 * GB, "b": 3 * GB, "c": 3 * GB, "huge": 11 * GB}), 0)
    assert s.submit(1, "a", "x", 0.0) is RUNNING
    assert s.submit(2, "b", "x", 0.0) is RUNNING
    assert s.submit(3, "c", "x", 0.0) is WAITING  # 6 + 3 + 3 > 10
    assert s.finish(2, 1.0) == []  # b ran there since the last reading: loaded, held
    installed = {"a": 6 * GB, "b": 3 * GB, "c": 3 * GB, "huge": 11 * GB}
    assert s.observe("gpu", View(installed=installed, loaded={"a": 6 * GB}), 1.0) == [3]
    snap = s.snapshot(1.0)["backends"][0]
    assert snap["models"] == {
        "a:latest": {"running": 1, "slots": 1},
        "c:latest": {"running": 1, "slots": 1},
    }


def test_a_model_too_big_for_a_backend_or_not_allowed_there_never_runs_there() -> None:
    s = FleetScheduler(
        [backend("small", vram=4 * GB), backend("pinned", models=("llama3.2:*",)), backend("any")]
    )
    s.observe("small", View(installed={"big": 8 * GB, "llama3.2": 2 * GB}), 0.0)
    assert s.submit(1, "big", "x", 0.0) is RUNNING
    assert where(s, 1) == "any"
    assert s.submit(2, "big", "y", 0.0) is WAITING  # not on small (VRAM), not on pinned
    assert s.submit(3, "llama3.2", "x", 0.0) is RUNNING
    assert where(s, 3) == "small"
    assert s.submit(4, "llama3.2:latest", "y", 0.0) is WAITING  # no copy for a short queue
    assert s.submit(5, "llama3.2", "z", 0.0) is WAITING
    assert s.tick(0.0) == [4]  # a deep queue: a copy where it is allowed
    assert where(s, 4) == "pinned"


def test_a_model_not_installed_on_a_backend_does_not_go_there() -> None:
    s = FleetScheduler([backend("a"), backend("b")])
    s.observe("a", View(installed={"x": GB}), 0.0)
    assert s.submit(1, "y", "c", 0.0) is RUNNING
    assert where(s, 1) == "b"


def test_an_unhealthy_backend_takes_nothing_and_its_waiting_work_goes_elsewhere() -> None:
    s = FleetScheduler([backend("a"), backend("b")])
    s.observe("a", View(loaded={"m": GB}), 0.0)
    s.observe("b", View(healthy=False), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "m", "x", 0.0) is WAITING  # b is down
    # b rejoins with m loaded: the waiting job goes there
    assert s.observe("b", View(loaded={"m": GB}), 1.0) == [2]
    assert where(s, 2) == "b"
    s.observe("a", View(healthy=False), 2.0)
    assert s.submit(3, "m", "y", 2.0) is WAITING
    assert s.finish(2, 3.0) == [3]
    assert where(s, 3) == "b"
    # Jobs running on a backend that went down keep their slot until they end.
    assert where(s, 1) == "a"
    assert s.finish(1, 4.0) == []


def test_a_job_whose_backend_failed_keeps_its_place_and_goes_elsewhere() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=1)
    s.observe("a", View(loaded={"m": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "m", "y", 1.0) is RUNNING  # b: loads m there, the queue is empty
    assert where(s, 2) == "b"
    assert s.submit(3, "m", "z", 2.0) is WAITING
    s.observe("a", View(healthy=False), 3.0)
    assert s.retry(1, 3.0) == []  # job 1 waits again, ahead of job 3 (it came first)
    assert s.job_state(1) is WAITING
    assert s.finish(2, 4.0) == [1]
    assert where(s, 1) == "b"
    assert s.snapshot(4.0)["totals"]["admitted"] == 2  # a retried job is admitted once
    assert s.finish(1, 5.0) == [3]


def test_jobs_placed_again_go_first_in_the_order_they_first_started_whoever_sent_them() -> None:
    s = FleetScheduler([backend("a"), backend("b")])
    for name in ("a", "b"):
        s.observe(name, View(loaded={"m": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "m", "y", 1.0) is RUNNING
    assert (where(s, 1), where(s, 2)) == ("a", "b")
    assert s.submit(3, "m", "y", 2.0) is WAITING
    assert s.submit(4, "m", "y", 3.0) is WAITING
    # a fails job 1, whose place there job 3 takes (a is not known to be down yet) ...
    assert s.retry(1, 4.0) == [3]
    # ... then refuses job 3 too: both wait again, job 1 (started first) ahead of job 3,
    # though job 3's client was the one whose turn came next.
    s.observe("a", View(healthy=False), 4.0)
    assert s.retry(3, 4.0) == []
    assert s.finish(2, 5.0) == [1]
    assert s.finish(1, 6.0) == [3]
    assert s.finish(3, 7.0) == [4]
    assert s.finish(4, 8.0) == []
    assert s.idle()


def test_a_job_placed_again_goes_before_aged_jobs_and_higher_classes() -> None:
    s = FleetScheduler([backend("a"), backend("b")], priority_aging=10.0)
    for name in ("a", "b"):
        s.observe(name, View(loaded={"m": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0, priority="batch") is RUNNING
    assert s.submit(2, "m", "y", 0.0) is RUNNING
    assert s.submit(4, "m", "z", 1.0) is WAITING  # aged from 11 on
    assert s.submit(3, "m", "y", 15.0, priority="interactive") is WAITING
    s.observe("a", View(healthy=False), 20.0)
    assert s.retry(1, 20.0) == []
    # The batch job 1 had its place before either was there: it runs next, then the aged
    # job 4, then the interactive job 3.
    assert s.finish(2, 21.0) == [1]
    assert s.finish(1, 22.0) == [4]
    assert s.finish(4, 23.0) == [3]
    assert s.finish(3, 24.0) == []
    assert s.idle()


def test_a_job_placed_again_does_not_take_its_clients_turn_again() -> None:
    s = FleetScheduler([backend("a"), backend("b")])
    for name in ("a", "b"):
        s.observe(name, View(loaded={"m": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "m", "y", 0.0) is RUNNING
    for job_id, client in ((3, "z"), (4, "x"), (5, "y")):  # turns: z, x, y
        assert s.submit(job_id, "m", client, 1.0) is WAITING
    s.observe("a", View(healthy=False), 2.0)
    assert s.retry(1, 2.0) == []
    # Job 1 runs first; x keeps its turn between z and y (x had its turn for job 1
    # before it failed, and does not pay for it again).
    assert s.finish(2, 3.0) == [1]
    assert s.finish(1, 4.0) == [3]
    assert s.finish(3, 5.0) == [4]
    assert s.finish(4, 6.0) == [5]
    assert s.finish(5, 7.0) == []
    assert s.idle()


def test_waiting_jobs_whose_model_has_no_healthy_holder_any_more_are_dropped() -> None:
    s = FleetScheduler([backend("a"), backend("b")], queue_timeout=300.0)
    s.observe("a", View(installed={"m": GB, "n": GB}), 0.0)
    s.observe("b", View(installed={"n": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert where(s, 1) == "a"
    assert s.submit(2, "m", "y", 1.0) is WAITING  # only a has m, and its slot is taken
    assert s.submit(3, "n", "z", 1.0) is RUNNING
    assert where(s, 3) == "b"
    assert s.submit(4, "n", "z", 2.0) is WAITING
    assert s.drop_unavailable(2.0) == ([], [])  # every model still has a healthy holder
    # a goes down: m is on no healthy backend; n is still on b and keeps its place.
    assert s.observe("a", View(healthy=False, installed={"m": GB, "n": GB}), 3.0) == []
    assert s.drop_unavailable(3.0) == ([2], [])
    assert s.job_state(2) is None and s.job_state(4) is WAITING
    snap = s.snapshot(3.0)
    assert snap["models"]["m:latest"]["rejected"]["model_unavailable"] == 1
    assert snap["totals"]["rejected"]["model_unavailable"] == 1
    assert snap["totals"]["rejected"]["queue_timeout"] == 0
    assert snap["totals"]["waiting"] == 1 and snap["clients"].get("y") is None
    assert s.drop_unavailable(4.0) == ([], [])  # dropped once
    assert s.finish(1, 5.0) == []  # the job running on a keeps its slot until it ends
    assert s.finish(3, 6.0) == [4]
    assert s.finish(4, 7.0) == []
    assert s.idle()


def test_a_retried_job_is_dropped_once_every_backend_left_for_it_is_down() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=1)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "m", "x", 0.0) is RUNNING
    assert s.retry(1, 1.0) == []  # a failed job 1; only b is left for it, and it is busy
    assert s.drop_unavailable(1.0) == ([], [])
    s.observe("b", View(healthy=False), 2.0)
    assert s.drop_unavailable(2.0) == ([1], [])  # a is up, but it failed this job
    assert s.finish(2, 3.0) == []
    assert s.idle()


def test_a_retried_job_never_goes_back_to_the_backend_that_failed_it() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=1)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert where(s, 1) == "a"
    assert s.submit(2, "m", "x", 0.0) is RUNNING
    assert where(s, 2) == "b"
    assert s.retry(1, 1.0) == []  # a still has the slot free, but not for job 1
    assert s.finish(2, 2.0) == [1]
    assert where(s, 1) == "b"


def failed_on_pinned_backend(*, keep_running: bool) -> FleetScheduler:
    """b1 runs anything but is full with x's job of a (x capped at 1); b2 is pinned to c
    (``c:*``, 2 slots) and runs y's jobs c1 and c2; c1 fails there, b2 goes down, c1 waits
    to be placed again (b1 busy) and b2 heals. ``keep_running``: c2 still runs on b2 then
    (c keeps its place there), else it ended while b2 was down."""
    s = FleetScheduler([backend("b1"), backend("b2", slots=2, models=("c:*",))])
    assert s.submit("a1", "a", "x", 0.0, max_running=1) is RUNNING
    assert s.submit("c1", "c", "y", 0.0) is RUNNING
    assert s.submit("c2", "c", "y", 0.0) is RUNNING
    assert (where(s, "a1"), where(s, "c1"), where(s, "c2")) == ("b1", "b2", "b2")
    assert s.observe("b2", View(healthy=False), 1.0) == []
    assert s.retry("c1", 1.0) == []  # never on b2 again; b1 has no room
    assert s.drop_unavailable(1.0) == ([], [])  # b1 could run it
    if not keep_running:
        assert s.finish("c2", 1.0) == []
    assert s.observe("b2", View(), 2.0) == []  # healed: nothing waits that may go there
    return s


@pytest.mark.parametrize("keep_running", [True, False])
def test_a_job_placed_again_does_not_hold_back_jobs_behind_it_where_it_may_not_go(
    keep_running: bool,
) -> None:
    # A new job of c, from an uncapped client, takes b2 at once: the job waiting ahead of
    # it (placed again) may not run there, so the new job goes ahead of nobody there. With
    # c still running on b2 it takes c's free slot; else c's place there.
    s = failed_on_pinned_backend(keep_running=keep_running)
    assert s.submit("c3", "c", "z", 3.0) is RUNNING
    assert where(s, "c3") == "b2"
    # x is at its cap: its job of c waits, taking nothing; z's next takes the last slot
    # (or waits for it).
    assert s.submit("c4", "c", "x", 3.0, max_running=1) is WAITING
    assert s.submit("c5", "c", "z", 3.0) is (WAITING if keep_running else RUNNING)
    assert s.tick(3.0) == []
    if keep_running:
        assert s.finish("c2", 4.0) == ["c5"]  # c5's turn: c1 may not run on b2, x is capped
    # b1 frees: c1, placed again, goes first (and x's own job ended: its c4 may run).
    assert s.finish("a1", 5.0) == ["c1"]
    assert where(s, "c1") == "b1"
    assert s.finish("c3", 6.0) == ["c4"]
    assert where(s, "c4") == "b2"
    for job_id in ("c1", "c4", "c5"):
        assert s.finish(job_id, 7.0) == []
    assert s.idle()


@pytest.mark.parametrize("keep_running", [True, False])
def test_jobs_waiting_behind_a_job_placed_again_take_the_healed_backend(
    keep_running: bool,
) -> None:
    # c3 waited while b2 was down (submitted after c1 failed); the heal lets it start
    # there, though c1, ahead of it, may not.
    s = FleetScheduler([backend("b1"), backend("b2", slots=2, models=("c:*",))])
    assert s.submit("a1", "a", "x", 0.0, max_running=1) is RUNNING
    assert s.submit("c1", "c", "y", 0.0) is RUNNING
    assert s.submit("c2", "c", "y", 0.0) is RUNNING
    assert s.observe("b2", View(healthy=False), 1.0) == []
    assert s.retry("c1", 1.0) == []
    assert s.submit("c3", "c", "z", 1.0) is WAITING  # b2 is down, b1 busy
    if not keep_running:
        assert s.finish("c2", 1.5) == []
    assert s.observe("b2", View(), 2.0) == ["c3"]
    assert where(s, "c3") == "b2"
    assert s.job_state("c1") is WAITING


def test_a_job_placed_again_whose_model_runs_only_where_it_failed_takes_a_place_elsewhere() -> None:
    # c runs on b2 only, where c1 failed: for c1 that is no place, so b1 is not a copy
    # of c waiting for a deep queue. c1 forces a switch there as a model with no place
    # does, and takes b1 once it drains, while c's other jobs keep b2 busy.
    s = failed_on_pinned_backend(keep_running=True)
    assert s.pending_switch(9.0) is None
    assert s.pending_switch(10.0) == ("c:latest", ["a:latest"])
    assert s.submit("a2", "a", "x", 10.0) is WAITING  # b1 drains for c
    assert s.submit("c3", "c", "z", 10.0) is RUNNING  # c's free slot on b2
    assert where(s, "c3") == "b2"
    assert s.finish("a1", 11.0) == ["c1"]
    assert where(s, "c1") == "b1"
    assert s.finish("c1", 12.0) == ["a2"]


def test_a_job_placed_again_takes_a_free_backend_though_its_model_runs_where_it_failed() -> None:
    s = failed_on_pinned_backend(keep_running=True)
    assert s.finish("a1", 3.0) == ["c1"]
    assert where(s, "c1") == "b1"


def test_a_second_copy_opens_for_a_deep_queue_and_closes_when_it_drains() -> None:
    s = FleetScheduler([backend("a", max_models=2), backend("b", max_models=2)], copy_depth=2)
    s.observe("a", View(loaded={"m": GB}), 0.0)
    s.observe("b", View(loaded={"other": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING  # on a, where it is loaded
    assert s.submit(2, "m", "x", 0.0) is WAITING  # depth 1 < 2 × 1 slot: no copy yet
    assert s.tick(0.0) == []
    assert s.submit(3, "m", "y", 0.0) is WAITING  # depth 2: a copy on b, with room ...
    assert s.tick(0.0) == [2]  # ... opened by the next look at the queue
    assert where(s, 2) == "b"
    assert s.snapshot(0.0)["backends"][1]["models"] == {"m:latest": {"running": 1, "slots": 1}}
    assert s.finish(2, 1.0) == [3]  # the copy takes its model's next job (affinity)
    assert s.finish(3, 2.0) == []  # queue empty: the copy gives its place up
    assert s.snapshot(2.0)["backends"][1]["models"] == {}


def test_a_copy_for_a_deep_queue_may_evict_an_idle_model() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=2)
    s.observe("b", View(loaded={"other": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert where(s, 1) == "a"
    assert s.submit(2, "m", "x", 0.0) is WAITING
    assert s.tick(0.0) == []  # one waiting: no copy (b would have to evict)
    assert s.submit(3, "m", "y", 0.0) is WAITING
    assert s.tick(0.0) == [2]  # two waiting for one slot: a copy on b, "other" makes way
    assert where(s, 2) == "b"
    assert s.finish(2, 1.0) == [3]  # the copy goes on while m's jobs wait
    assert s.finish(3, 2.0) == []  # and gives its place up when they are done
    assert s.snapshot(2.0)["backends"][1]["models"] == {}


def test_a_copy_does_not_evict_a_model_that_had_work_within_the_switch_interval() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=2, switch_after=5.0)
    s.observe("b", View(loaded={"other": GB}), 0.0)
    assert s.submit(1, "other", "x", 0.0) is RUNNING
    assert where(s, 1) == "b"
    assert s.finish(1, 1.0) == []  # other is idle on b, held until 6.0
    assert s.submit(2, "m", "x", 1.0) is RUNNING
    assert where(s, 2) == "a"
    assert s.submit(3, "m", "x", 1.0) is WAITING
    assert s.submit(4, "m", "y", 1.0) is WAITING
    assert s.tick(1.0) == []  # a deep queue, but no copy in other's place yet
    assert s.submit(5, "other", "z", 2.0) is RUNNING  # its next job takes the place back
    assert where(s, 5) == "b"
    assert s.finish(5, 3.0) == []
    assert s.next_deadline() == 8.0  # the hold ends switch_after after other's last job
    assert s.tick(7.9) == []
    assert s.tick(8.0) == [3]  # then the copy opens and other makes way
    assert where(s, 3) == "b"
    assert s.snapshot(8.0)["backends"][1]["activations"] == 2  # other once, then m


def test_a_model_that_ran_since_the_last_reading_is_held_though_the_reading_lacks_it() -> None:
    # It loaded and served between two /api/ps readings: idle for an instant, its place
    # is still its own, not room for a copy of a busier model.
    installed = {"m": GB, "light": GB}
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=2, switch_after=10.0)
    s.observe("a", View(installed=installed), 0.0)
    s.observe("b", View(installed=installed), 0.0)
    assert s.submit(1, "light", "x", 0.0) is RUNNING
    assert where(s, 1) == "a"
    assert s.submit(2, "m", "y", 0.0) is RUNNING
    assert where(s, 2) == "b"
    for job in (3, 4, 5):
        assert s.submit(job, "m", f"c{job}", 0.0) is WAITING  # deep: a copy would open
    assert s.finish(1, 1.0) == []  # light is held on a (no reading lists it yet)
    assert s.submit(6, "light", "x", 1.0) is RUNNING  # its next job takes its place back
    assert where(s, 6) == "a"
    assert s.snapshot(1.0)["backends"][0]["activations"] == 1


def test_a_copy_gives_its_place_up_to_a_model_that_has_none() -> None:
    s = FleetScheduler([backend("a"), backend("b")], copy_depth=2, switch_after=10.0)
    s.observe("a", View(installed={"m": GB, "late": GB}), 0.0)
    s.observe("b", View(installed={"m": GB, "late": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    for job in (2, 3, 4, 5):
        assert s.submit(job, "m", f"c{job}", 0.0) is WAITING
    assert s.tick(0.0) == [2]  # a deep queue: a copy of m takes b, the last free place
    assert {where(s, 1), where(s, 2)} == {"a", "b"}
    assert s.submit(6, "late", "z", 0.5) is WAITING  # no place anywhere: one of m's yields
    assert s.finish(1, 1.0) == [6]  # the first of m's places to free goes to late ...
    assert where(s, 6) == "a"
    assert s.finish(2, 1.5) == [3]  # ... and m goes on in the other one
    assert where(s, 3) == "b"
    assert s.finish(6, 2.0) == []  # late is held on a; m, still deep, takes no place there
    assert s.snapshot(2.0)["backends"][0]["models"] == {}
    assert s.submit(7, "late", "z", 2.5) is RUNNING
    assert where(s, 7) == "a"


def test_a_model_waits_for_a_held_place_until_its_switch_is_due() -> None:
    s = FleetScheduler([backend("a", max_models=2, slots=1)], switch_after=4.0)
    s.observe("a", View(loaded={"m": GB, "n": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "n", "y", 0.0) is RUNNING
    assert s.finish(2, 1.0) == []  # n is held: its client's next job comes right after
    assert s.submit(3, "p", "z", 1.5) is WAITING  # p may not replace n yet
    assert s.submit(4, "n", "y", 2.0) is RUNNING  # n takes its place back, ahead of p
    assert s.finish(4, 3.0) == []
    assert s.next_deadline() == 5.5  # p's switch: its job waited 4 s (n's hold ends at 7)
    assert s.tick(5.4) == []
    assert s.pending_switch(5.5) == ("p:latest", ["m:latest"])
    assert s.tick(5.5) == [3]  # n's held place goes to p at once, m drains
    assert s.submit(5, "m", "x", 5.5) is WAITING
    assert s.snapshot(5.5)["backends"][0]["forced_switches"] == 1


def test_a_model_loaded_beside_a_held_one_runs_there_since_it_replaces_nothing() -> None:
    s = FleetScheduler([backend("a"), backend("b")], switch_after=5.0)
    s.observe("b", View(loaded={"m": GB}), 0.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.finish(1, 1.0) == []  # m is held on b
    s.observe("b", View(loaded={"m": GB, "e": GB}), 1.0)  # e loaded on b from outside
    assert s.submit(2, "e", "x", 1.0) is RUNNING
    assert where(s, 2) == "b"  # where it is loaded: m stays loaded too


def test_the_oldest_model_without_a_place_reserves_its_backends() -> None:
    s = FleetScheduler([backend("a"), backend("b")], switch_after=5.0)
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "n", "x", 0.0) is RUNNING
    assert s.submit(3, "p", "x", 1.0) is WAITING  # p could run on both: reserves both
    assert s.submit(4, "q", "x", 2.0) is WAITING
    assert s.finish(1, 3.0) == [3]  # the oldest model gets the first place
    assert s.finish(2, 4.0) == [4]


def test_a_switch_drains_only_the_backends_that_can_run_the_waiting_model() -> None:
    s = FleetScheduler(
        [backend("a", models=("m", "p")), backend("b", models=("n",))], switch_after=2.0
    )
    assert s.submit(1, "m", "x", 0.0) is RUNNING
    assert s.submit(2, "n", "x", 0.0) is RUNNING
    assert s.submit(3, "p", "y", 1.0) is WAITING
    assert s.submit(4, "m", "x", 1.5) is WAITING
    assert s.submit(5, "n", "x", 1.5) is WAITING
    assert s.next_deadline() == 3.0
    assert s.tick(3.0) == []
    assert s.pending_switch(3.0) == ("p:latest", ["m:latest"])  # only a drains
    assert s.finish(2, 3.5) == [5]  # b goes on with n
    assert s.finish(1, 4.0) == [3]  # a's place goes to p, m's next job waits
    snap = s.snapshot(4.0)
    assert snap["backends"][0]["forced_switches"] == 1
    assert snap["backends"][0]["draining_for"] is None


def test_a_new_place_names_the_idle_model_it_replaces_for_unloading_once() -> None:
    s = FleetScheduler([backend("a"), backend("b", models=("x",))])
    s.observe("a", View(loaded={"old": GB}), 0.0)
    assert s.take_unloads("a") == []
    assert s.submit(1, "new", "c", 0.0) is RUNNING  # one place on a: old makes way
    assert where(s, 1) == "a"
    assert s.take_unloads("a") == ["old:latest"]
    assert s.take_unloads("a") == []  # once
    assert s.take_unloads("b") == []


def test_the_model_to_unload_is_the_idle_one_no_job_waits_for_then_the_least_recent() -> None:
    s = FleetScheduler([backend("a", max_models=3)], switch_after=1.0)
    s.observe("a", View(loaded={"busy": GB, "recent": GB, "stale": GB}), 0.0)
    assert s.submit(1, "busy", "x", 0.0) is RUNNING
    assert s.submit(2, "recent", "x", 0.0) is RUNNING
    assert s.finish(2, 1.0) == []
    assert s.submit(3, "new", "y", 1.5) is RUNNING  # no hold left: one place must go
    assert s.take_unloads("a") == ["stale:latest"]  # never busy, which runs


def test_no_unload_once_the_backend_no_longer_reports_the_model_loaded() -> None:
    s = FleetScheduler([backend("a"), backend("b", models=("x",))])
    s.observe("a", View(loaded={"old": GB}), 0.0)
    assert s.submit(1, "new", "c", 0.0) is RUNNING
    s.observe("a", View(loaded={"new": GB}), 0.5)  # Ollama evicted it by itself
    assert s.take_unloads("a") == []


def test_a_model_with_room_to_load_replaces_nothing() -> None:
    s = FleetScheduler([backend("a", max_models=2, vram=8 * GB), backend("b", models=("x",))])
    s.observe("a", View(installed={"old": 4 * GB, "new": 4 * GB}, loaded={"old": 4 * GB}), 0.0)
    assert s.submit(1, "new", "c", 0.0) is RUNNING
    assert s.take_unloads("a") == []


# Replacements: a loaded model that keeps getting work is not replaced at once


class ClosedLoop:
    """Clients that each send one job after another (the next as the previous ends), and
    Ollama's side, clock-free: a backend loads a model when a job of it starts there,
    evicts its least recently used idle model when it holds too many, and every change
    of what it has loaded reaches the scheduler as its ``/api/ps`` would."""

    def __init__(self, s: FleetScheduler, clients: dict[str, Callable[[int], str]]) -> None:
        self.s, self.clients = s, clients
        self.now = 0.0
        self.ids = itertools.count()
        self.client_of: dict[Hashable, str] = {}
        self.sent: dict[str, int] = dict.fromkeys(clients, 0)
        self.ends: dict[Hashable, float] = {}
        self.loaded: dict[str, dict[str, None]] = {b.name: {} for b in s.backends}  # LRU first
        self.running: dict[str, dict[str, int]] = {b.name: {} for b in s.backends}
        self.limits = {b.name: b.max_models for b in s.backends}
        self.loads = dict.fromkeys(self.loaded, 0)
        self.evictions = dict.fromkeys(self.loaded, 0)
        self.done = 0

    def send(self, client: str) -> None:
        job_id = next(self.ids)
        model = self.clients[client](self.sent[client])
        self.sent[client] += 1
        self.client_of[job_id] = client
        if self.s.submit(job_id, model, client, self.now) is RUNNING:
            self.started([job_id])

    def started(self, jobs: list[Hashable]) -> None:
        for job_id in jobs:
            where = self.s.backend_of(job_id)
            assert where is not None
            model = normalize_model_of(self.s, job_id)
            loaded, running = self.loaded[where.name], self.running[where.name]
            running[model] = running.get(model, 0) + 1
            # a job's length varies with its id, so a model's jobs end one by one
            self.ends[job_id] = self.now + 0.6 + (int(job_id) * 0.37) % 1.0
            if model in loaded:
                loaded[model] = loaded.pop(model)  # most recently used last
                continue
            loaded[model] = None
            self.loads[where.name] += 1
            while len(loaded) > self.limits[where.name]:
                idle = next(name for name in loaded if not running.get(name))
                del loaded[idle]
                self.evictions[where.name] += 1
            view = View(loaded=dict.fromkeys(loaded, GB))
            self.started(self.s.observe(where.name, view, self.now))

    def run(self, until: float) -> None:
        for client in self.clients:
            self.send(client)
        while True:
            end = min(self.ends.items(), key=lambda item: (item[1], str(item[0])), default=None)
            deadline = self.s.next_deadline()
            at = min(end[1] if end else math.inf, deadline if deadline is not None else math.inf)
            if at > until:
                return
            self.now = max(self.now, at)
            if end is not None and end[1] <= self.now:
                job_id = end[0]
                del self.ends[job_id]
                where = self.s.backend_of(job_id)
                assert where is not None
                self.running[where.name][normalize_model_of(self.s, job_id)] -= 1
                self.started(self.s.finish(job_id, self.now))
                self.done += 1
                self.send(self.client_of.pop(job_id))
            else:
                self.started(self.s.tick(self.now))


def normalize_model_of(s: FleetScheduler, job_id: Hashable) -> str:
    return s._jobs[job_id].model  # noqa: SLF001 - the test's Ollama needs the model's name


def dedicated(model: str) -> Callable[[int], str]:
    return lambda _: model


def test_models_that_keep_getting_work_are_not_replaced_before_the_switch_interval() -> None:
    """Four models, one client each, one backend holding two: a model's place is empty
    between its client's jobs, yet each load is a switch, and a model switched in runs at
    least switch_after before it is replaced (the core's rule)."""
    switch_after, until = 8.0, 200.0
    s = FleetScheduler([backend("big", max_models=2, slots=2)], switch_after=switch_after)
    models = ("m1", "m2", "m3", "m4")
    loop = ClosedLoop(s, {f"client-{m}": dedicated(m) for m in models})
    loop.run(until)
    assert loop.done > until  # work went on
    assert loop.loads["big"] <= until / switch_after + len(models), loop.loads
    snap = s.snapshot(loop.now)["backends"][0]
    assert snap["activations"] <= until / switch_after + len(models), snap


def test_the_demo_load_switches_each_backend_at_most_once_per_switch_interval() -> None:
    """make demo's fleet: gpu-big holds two models, gpu-small one (m4 installed on big only),
    eight clients asking one model after another at random."""
    switch_after, until = 8.0, 200.0
    big = backend("gpu-big", max_models=2, slots=2)
    small = backend("gpu-small", max_models=1, slots=1, models=("m1", "m2", "m3"))
    s = FleetScheduler([big, small], switch_after=switch_after)
    models = ("m1", "m2", "m3", "m4")

    def picks(seed: int) -> Callable[[int], str]:
        return lambda n: models[(seed * 7 + n * 5 + n * n * 3) % len(models)]

    loop = ClosedLoop(s, {f"c{seed}": picks(seed) for seed in range(8)})
    loop.run(until)
    assert loop.done > until
    for name, loads in loop.loads.items():
        assert loads <= until / switch_after + len(models), (name, loop.loads)


# Random runs over random fleets

MODELS = ("a:latest", "b:latest", "c:latest", "d:latest")
CLIENTS = ("x", "y", "z")
SIZES = {"a:latest": 4 * GB, "b:latest": 3 * GB, "c:latest": 6 * GB, "d:latest": 1 * GB}


@dataclass
class Job:
    model: str
    client: str
    submitted: float
    started: float = math.nan
    backend: str = ""


@st.composite
def fleets(draw: st.DrawFn) -> list[Backend]:
    count = draw(st.integers(1, 3))
    backends = []
    for index in range(count):
        pinned = draw(st.sampled_from([(), ("a", "b"), ("c:*",), ("d", "a")]))
        backends.append(
            Backend(
                f"b{index}",
                f"http://b{index}:11434",
                max_models=draw(st.integers(1, 2)),
                model_concurrency=draw(st.integers(1, 2)),
                vram=draw(st.sampled_from([None, 7 * GB, 10 * GB])),
                models=pinned,
                weight=draw(st.sampled_from([1.0, 2.0])),
            )
        )
    return backends


class FleetMachine:
    """Random fleets, health flips and failures: the bounds hold and nothing starves."""

    # Clients' running caps (an API key's max_running): none here, FleetCapsMachine sets
    # some; ``at_cap`` says when each client was last seen at its cap.
    caps: dict[str, int | None] = dict.fromkeys(CLIENTS)
    draining = False  # FleetCapsMachine's teardown works the whole queue off

    @initialize(
        backends=fleets(),
        switch_after=st.sampled_from([0.0, 1.0, 2.5]),
        job_max=st.sampled_from([1.0, 2.5]),
        copy_depth=st.integers(1, 3),
        residency=st.booleans(),
    )
    def setup(
        self,
        backends: list[Backend],
        switch_after: float,
        job_max: float,
        copy_depth: int,
        residency: bool,
    ) -> None:
        self.backends = {backend.name: backend for backend in backends}
        self.s = FleetScheduler(
            backends,
            queue_max=40,
            queue_max_per_client=20,
            queue_timeout=1000.0,
            switch_after=switch_after,
            copy_depth=copy_depth,
        )
        self.installed = {
            name: {model: SIZES[model] for model in MODELS if model != "b:latest" or index}
            for index, name in enumerate(self.backends)
        }
        self.healthy = dict.fromkeys(self.backends, True)
        # With residency, each backend reports what it loaded (as /api/ps would): a model
        # stays loaded after its jobs until another must take its place.
        self.residency = residency
        self.loaded: dict[str, dict[str, None]] = {name: {} for name in self.backends}
        self.last_work: dict[tuple[str, str], float] = {}
        self.read_at = dict.fromkeys(self.backends, 0.0)  # each backend's last reading
        for name in self.backends:
            self.s.observe(name, View(installed=self.installed[name]), 0.0)
        self.switch_after, self.job_max = switch_after, job_max
        self.copy_depth = copy_depth
        self.now = 0.0
        self.ids = itertools.count()
        self.waiting: dict[Hashable, Job] = {}
        self.running: dict[Hashable, Job] = {}
        self.failed: dict[Hashable, set[str]] = {}
        self.starts = itertools.count()
        self.first_start: dict[Hashable, int] = {}  # the order in which jobs first started
        self.at_cap: dict[str, float] = dict.fromkeys(CLIENTS, -math.inf)

    def could_run(self, model: str, name: str) -> bool:
        backend = self.backends[name]
        return (
            backend.allows(model)
            and model in self.installed[name]
            and (backend.vram is None or SIZES[model] <= backend.vram)
        )

    def apply(self, started: list[Hashable], *, ended: bool = False) -> None:
        """Check the jobs ``started`` (``ended``: after a job ended, whose place may go on
        with its model's next job or be given up, so copies are not checked then)."""
        loads = []
        waiting = Counter(job.model for job in self.waiting.values())
        places = {(job.backend, job.model) for job in self.running.values()}
        for job_id in started:
            job = self.waiting.pop(job_id)
            where = self.s.backend_of(job_id)
            assert where is not None
            assert self.healthy[where.name], "placed on an unhealthy backend"
            assert self.could_run(job.model, where.name), "placed where it may not run"
            assert where.name not in self.failed.get(job_id, set()), "back where it failed"
            self.no_job_placed_again_passed_over(job_id, job, where.name)
            self.first_start.setdefault(job_id, next(self.starts))
            if not ended:
                self.copies_bounded(job_id, job.model, where.name, waiting, places)
            waiting[job.model] -= 1
            places.add((where.name, job.model))
            if any(other.model == job.model for other in self.running.values()):
                if all(other.backend != where.name for other in self.running.values()):
                    event("a second backend for a model")
            job.started, job.backend = self.now, where.name
            self.running[job_id] = job
            self.last_work[where.name, job.model] = self.now
            loads.append((where.name, job.model))
        self.check()
        for name in {name for name, _ in loads}:
            self.unload(name)
        if self.residency:
            for name, model in loads:
                self.load(name, model)

    def no_job_placed_again_passed_over(self, job_id: Hashable, job: Job, name: str) -> None:
        """Jobs placed again after their backend failed keep their place: a job starting on
        ``name`` passes over none of its model that could take the place there and first
        started before it did (one that never started, before any)."""
        first = self.first_start.get(job_id, math.inf)
        for other_id, other in self.waiting.items():
            if other_id in self.failed and other.model == job.model and other_id != job_id:
                usable = name not in self.failed[other_id] and not self.capped(other.client)
                earlier = self.first_start[other_id] < first
                assert not (usable and earlier), ("a job placed again passed over", other_id)

    def copies_bounded(
        self,
        job_id: Hashable,
        model: str,
        name: str,
        waiting: Counter[str],
        places: set[tuple[str, str]],
    ) -> None:
        """A model running on a healthy backend takes a new place on another (a copy) only
        where it is loaded already, or for a queue of at least copy_depth jobs per slot it
        has: copies are bounded by the queue, not opened for every waiting job. A place
        only where a job placed again failed is none for it (no copy: a new place)."""
        if (name, model) in places:
            return
        placed = {b for b, m in places if m == model and self.healthy[b]}
        if not placed:
            return
        if placed <= self.failed.get(job_id, set()) or any(
            other.model == model
            and not self.capped(other.client)
            and placed <= self.failed.get(other_id, set())
            for other_id, other in self.waiting.items()
        ):
            event("a new place for a job placed again")
            return
        event("a copy opened")
        view = self.s._by_name[name].view  # noqa: SLF001 - what the core thinks is loaded
        if model in view.loaded:
            return
        slots = sum(self.backends[b].model_concurrency for b in placed)
        assert waiting[model] >= self.copy_depth * slots, ("copy for a short queue", model, name)

    def load(self, name: str, model: str) -> None:
        loaded = self.loaded[name]
        if model in loaded:
            return
        loaded[model] = None
        busy = {job.model for job in self.running.values() if job.backend == name}
        backend = self.backends[name]
        while len(loaded) > backend.max_models or (
            backend.vram is not None and sum(SIZES[m] for m in loaded) > backend.vram
        ):
            del loaded[next(m for m in loaded if m not in busy)]
        self.read(name)

    def held(self, name: str) -> bool:
        """Whether an idle model loaded on ``name`` had work there within switch_after;
        loaded: per the last reading, or run there since it."""
        since = {m for (b, m), t in self.last_work.items() if b == name and t > self.read_at[name]}
        return any(
            self.last_work.get((name, model), -math.inf) + self.switch_after > self.now
            for model in set(self.loaded[name]) | since
        )

    def read(self, name: str) -> None:
        """The catalogue's reading of ``name`` reaches the placement."""
        self.read_at[name] = self.now
        self.apply(self.s.observe(name, self.view(name), self.now))

    def capped(self, client: str) -> bool:
        """Whether ``client`` runs as many jobs as its cap allows (it may start none)."""
        cap = self.caps[client]
        return cap is not None and sum(j.client == client for j in self.running.values()) >= cap

    def note_caps(self) -> None:
        for client in CLIENTS:
            if self.capped(client):
                self.at_cap[client] = self.now

    def check(self) -> None:
        self.note_caps()
        for client, cap in self.caps.items():
            running = sum(job.client == client for job in self.running.values())
            assert cap is None or running <= cap, ("above its running cap", client, running)
        for name, backend in self.backends.items():
            here = [job for job in self.running.values() if job.backend == name]
            models = {job.model for job in here}
            assert len(models) <= backend.max_models, "above a backend's models"
            for model in models:
                assert sum(job.model == model for job in here) <= backend.model_concurrency
            if backend.vram is not None:
                assert sum(SIZES[model] for model in models) <= backend.vram
        snap = self.s.snapshot(self.now)
        assert snap["totals"]["running"] == len(self.running)
        assert snap["totals"]["waiting"] == len(self.waiting)

    @rule(model=MODELS, client=CLIENTS, count=range(1, 4))
    def submit(self, model: str, client: str, count: int) -> None:
        for _ in range(count):
            job_id = next(self.ids)
            if not any(self.could_run(model, name) for name in self.backends):
                continue  # the gate answers 404 before queueing
            try:
                admission = self.s.submit(
                    job_id, model, client, self.now, max_running=self.caps[client]
                )
            except (QueueFull, ClientShareFull):
                event("turned away")
                continue
            self.waiting[job_id] = Job(model, client, self.now)
            if admission is RUNNING:
                self.apply([job_id])

    @rule(pick=PICK)
    def fail_one(self, pick: int) -> None:
        """A running job's backend failed before answering: it goes down, the job retries."""
        if not self.running:
            return
        job_id = sorted(self.running, key=str)[pick % len(self.running)]
        job = self.running[job_id]
        self.note_caps()
        self.healthy[job.backend] = False
        self.read(job.backend)
        self.failed.setdefault(job_id, set()).add(job.backend)
        self.waiting[job_id] = self.running.pop(job_id)
        self.apply(self.s.retry(job_id, self.now))
        event("retried")
        self.drop_unavailable()

    def drop_unavailable(self) -> None:
        """Waiting jobs that no healthy backend could run leave the queue, and only those."""
        expected = {
            job_id
            for job_id, job in self.waiting.items()
            if not any(
                self.healthy[name]
                and self.could_run(job.model, name)
                and name not in self.failed.get(job_id, set())
                for name in self.backends
            )
        }
        before = self.s.snapshot(self.now)["totals"]["rejected"].get("model_unavailable", 0)
        dropped, started = self.s.drop_unavailable(self.now)
        assert set(dropped) == expected
        assert len(dropped) == len(expected)
        if dropped:
            event("dropped: model unavailable")
        for job_id in dropped:
            del self.waiting[job_id]
        after = self.s.snapshot(self.now)["totals"]["rejected"].get("model_unavailable", 0)
        assert after == before + len(dropped)
        self.apply(started)

    def unload(self, name: str) -> None:
        """The gate unloads what new places on ``name`` replaced, before their jobs reach
        it: never a model running there, only one loaded or run there, each once."""
        models = self.s.take_unloads(name)
        assert len(set(models)) == len(models)
        running = {job.model for job in self.running.values() if job.backend == name}
        for model in models:
            assert model not in running, ("unload of a running model", name, model)
            known = model in self.loaded[name] or (name, model) in self.last_work
            assert known, ("unload of a model never there", name, model)
            event("an unload")
            self.loaded[name].pop(model, None)

    @rule(pick=PICK)
    def heal(self, pick: int) -> None:
        name = picked(self.backends, pick)
        self.healthy[name] = True
        self.read(name)
        self.drop_unavailable()

    def view(self, name: str) -> View:
        loaded = {model: SIZES[model] for model in self.loaded[name]}
        return View(healthy=self.healthy[name], installed=self.installed[name], loaded=loaded)

    def finish(self, job_id: Hashable) -> None:
        self.note_caps()
        job = self.running.pop(job_id)
        self.last_work[job.backend, job.model] = self.now
        self.apply(self.s.finish(job_id, self.now), ended=True)

    @rule(step=[0.5, 1.0, 3.0])
    def advance(self, step: float) -> None:
        until = self.now + step
        while True:
            ends = [job.started + self.job_max for job in self.running.values()]
            deadline = self.s.next_deadline()
            if deadline is not None:
                ends.append(deadline)
            at = min(ends, default=math.inf)
            if at > until:
                break
            self.now = max(self.now, at)
            for job_id, job in sorted(self.running.items(), key=lambda item: item[1].started):
                if job.started + self.job_max <= self.now:
                    self.finish(job_id)
            self.apply(self.s.tick(self.now))
        self.now = until
        self.apply(self.s.tick(self.now))
        self.starvation_bound()

    def starvation_bound(self) -> None:
        """A job that some healthy backend could run does not wait past the switch bound.

        Jobs last at most job_max, so the oldest waiting job gets a place within
        switch_after + job_max of arriving, plus one job_max per model ahead of it on
        the backends that could run it: the bound below is generous but finite. A job
        of a client at its running cap waits for its client's own jobs: its wait counts
        from when the client was last at its cap.
        """
        if self.draining:
            return  # a whole queue worked off by the fleet at the end: no bound but the end
        runnable = [
            Job(job.model, job.client, max(job.submitted, self.at_cap[job.client]))
            for job_id, job in self.waiting.items()
            if not self.capped(job.client)
            and any(
                self.healthy[name]
                and self.could_run(job.model, name)
                and name not in self.failed.get(job_id, set())
                for name in self.backends
            )
        ]
        if not runnable or not all(self.healthy.values()):
            return
        event("starvation bound checked")
        oldest = min(runnable, key=lambda job: job.submitted)
        ahead = len(MODELS) * len(CLIENTS) * 3
        bound = self.switch_after + self.job_max * (ahead + 2)
        assert self.now - oldest.submitted <= bound, ("starved", oldest, self.now)

    @invariant()
    def no_backend_idles_while_a_job_it_could_run_waits(self) -> None:
        """An empty healthy backend that could run a waiting job's model is never left idle,
        unless the model runs elsewhere where the job may run (a copy waits for a deep
        queue), the job failed there, or an idle model loaded there is held (it had work
        within switch_after). A job placed again holds back no job behind it, and a place
        of its model only where it failed is none for it."""
        if not hasattr(self, "s"):
            return
        busy = {job.backend for job in self.running.values()}
        for job_id, job in self.waiting.items():
            if self.capped(job.client):
                continue  # it waits for its own client's jobs, holding nothing
            failed = self.failed.get(job_id, set())
            if any(
                other.model == job.model
                and self.healthy[other.backend]
                and other.backend not in failed
                for other in self.running.values()
            ):
                continue
            for name in self.backends:
                if not self.healthy[name] or name in busy or name in failed:
                    continue
                if self.held(name):
                    event("an idle backend holds a model")
                else:
                    assert not self.could_run(job.model, name), ("idle backend", name, job)

    def heal_all(self) -> None:
        for name in self.backends:
            self.healthy[name] = True
            self.read(name)

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self.heal_all()
        while self.waiting or self.running:
            if self.running:
                self.finish(min(self.running, key=str))
            else:
                job_id = min(self.waiting, key=str)
                self.waiting.pop(job_id)
                self.apply(self.s.cancel(job_id, self.now))
        assert self.s.idle()
        for row in self.s.snapshot(self.now)["backends"]:
            assert row["running"] == 0 and row["models"] == {}


test_fleet_bounds_hold_in_random_runs = machine_test(FleetMachine, max_examples=300, step_count=50)


# A key's running cap (max_running) across the fleet

CAP_RULE_TESTS = [
    key_caps_tests.test_a_capped_clients_extra_jobs_wait_without_holding_a_slot,
    key_caps_tests.test_a_capped_client_neither_wins_a_model_place_nor_forces_a_switch,
    key_caps_tests.test_a_model_whose_jobs_waited_for_a_cap_takes_a_free_place_without_a_switch,
    key_caps_tests.test_a_job_that_brings_its_client_to_its_cap_calls_off_the_switch_its_others_made_due,
    functools.partial(key_caps_tests.test_turns_pass_over_a_capped_client_and_keep_its_place, 1),
    functools.partial(key_caps_tests.test_turns_pass_over_a_capped_client_and_keep_its_place, 2),
]


@pytest.mark.parametrize("test", CAP_RULE_TESTS)
def test_each_cap_rule_holds_for_a_fleet_of_one(
    test: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(key_caps_tests, "Scheduler", fleet_of_one)
    test()


class CapsOfOneMachine(CapsMachine):
    """The running caps' state machine (tests/test_key_caps.py) on a fleet of one."""

    make = staticmethod(fleet_of_one)


test_caps_hold_for_a_fleet_of_one = machine_test(CapsOfOneMachine, max_examples=150, step_count=40)


def test_a_capped_keys_jobs_wait_on_every_backend_and_take_no_slot_there() -> None:
    s = FleetScheduler([backend("a", slots=2), backend("b", slots=2)])
    assert s.submit("b1", "m", "batch", 0.0, max_running=1) is RUNNING
    # batch's jobs for m and for n wait, although both backends have free slots ...
    assert s.submit("b2", "m", "batch", 0.0, max_running=1) is WAITING
    assert s.submit("b3", "n", "batch", 0.0, max_running=1) is WAITING
    assert s.tick(0.0) == []  # ... and open no copy or place anywhere
    # ... and take none from another key: alice's jobs run at once, on both backends.
    assert s.submit("a1", "m", "alice", 0.0) is RUNNING
    assert s.submit("a2", "n", "alice", 0.0) is RUNNING
    m_at, n_at = where(s, "b1"), where(s, "a2")
    assert {m_at, n_at} == {"a", "b"} and where(s, "a1") == m_at
    assert s.snapshot(0.0)["clients"]["batch"] == {"waiting": 2, "running": 1}
    assert s.finish("a1", 1.0) == []  # a slot frees, but batch is at its cap
    # batch's job ends: its next one runs (m, where m ran: affinity) ...
    assert s.finish("b1", 2.0) == ["b2"]
    assert where(s, "b2") == m_at
    # ... and after it, its job for n, on the other backend, where n runs.
    assert s.finish("b2", 3.0) == ["b3"]
    assert where(s, "b3") == n_at
    assert s.snapshot(3.0)["clients"]["batch"] == {"waiting": 0, "running": 1}


def test_a_capped_key_neither_wins_a_backend_nor_forces_a_switch_on_a_fleet() -> None:
    s = FleetScheduler([backend("a"), backend("b")], switch_after=1.0)
    assert s.submit("b1", "m", "batch", 0.0, max_running=1) is RUNNING
    assert s.submit("x1", "n", "x", 0.0) is RUNNING  # both backends hold a model now
    assert s.submit("b2", "p", "batch", 0.0, max_running=1) is WAITING
    # Long past switch_after, yet nothing is due: batch's waiting job may not run anyway.
    assert s.pending_switch(100.0) is None
    assert s.tick(100.0) == []
    assert s.submit("y1", "q", "y", 100.0) is WAITING  # q waits for a place, ahead of p
    assert s.pending_switch(101.0) == ("q:latest", ["m:latest", "n:latest"])
    assert s.finish("x1", 101.0) == ["y1"]  # the place goes to q, not to batch's p
    assert s.finish("b1", 102.0) == ["b2"]  # batch's job ended: p takes the place it left


class FleetCapsMachine(FleetMachine):
    """Random fleets with capped clients: caps hold, a capped client's waiting jobs take
    no slot, place or switch from others, nothing starves, and every job runs in the end."""

    @initialize(caps=st.tuples(st.integers(1, 2), st.sampled_from([1, 3, None])))
    def cap(self, caps: tuple[int, int | None]) -> None:
        self.caps = {"x": caps[0], "y": caps[1], "z": None}

    @invariant()
    def no_slot_of_a_running_model_idles_for_a_job_that_may_run(self) -> None:
        """Where a model runs, its free slots go to its waiting jobs whose client is below
        its cap, unless the backend drains for a switch; and a backend drains only for a
        model with such a job."""
        if not hasattr(self, "s"):
            return
        rows = {row["name"]: row for row in self.s.snapshot(self.now)["backends"]}
        for name, row in rows.items():
            target = row["draining_for"]
            if target is not None:
                assert any(
                    job.model == target and not self.capped(job.client)
                    for job in self.waiting.values()
                ), ("drains for capped jobs only", name, target)
        for job_id, job in self.waiting.items():
            if self.capped(job.client):
                event("a capped client's job waits")
                continue
            for name, row in rows.items():
                here = sum(
                    other.model == job.model and other.backend == name
                    for other in self.running.values()
                )
                if not here or not self.healthy[name] or name in self.failed.get(job_id, ()):
                    continue
                slots = self.backends[name].model_concurrency
                if here < slots and self.gives_way(name, job.model):
                    event("a copy's place gives way")
                    continue
                assert here == slots or row["draining_for"] is not None, ("slot idle", name, job)

    def gives_way(self, name: str, model: str) -> bool:
        """Whether ``model``'s place on ``name`` may be a copy that gives way (it takes no
        new jobs there): the model runs on another healthy backend too, and a job whose
        client is below its cap waits for a model that runs on no healthy backend and
        could run on ``name``."""
        if not any(
            job.model == model and job.backend != name and self.healthy[job.backend]
            for job in self.running.values()
        ):
            return False
        placed = {job.model for job in self.running.values() if self.healthy[job.backend]}
        return any(
            job.model not in placed
            and not self.capped(job.client)
            and self.could_run(job.model, name)
            and name not in self.failed.get(job_id, ())
            for job_id, job in self.waiting.items()
        )

    def teardown(self) -> None:
        """Every job waiting at the end runs once the backends are up: none is left behind."""
        if not hasattr(self, "s"):
            return
        self.heal_all()
        self.drop_unavailable()
        self.draining = True
        for _ in range(10_000):
            if not self.waiting and not self.running:
                break
            self.advance(self.job_max)  # jobs end; a hold or a switch may fall due
        assert not self.waiting and not self.running
        assert self.s.idle()
        snap = self.s.snapshot(self.now)
        assert snap["totals"]["rejected"]["queue_timeout"] == 0


test_fleet_caps_hold_in_random_runs = machine_test(
    FleetCapsMachine, max_examples=300, step_count=50
)
