"""The scheduling core, driven by events and an explicit clock: each rule, then random runs."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from errors import BUSY_TEXT, ClientShareFull, QueueFull
from settings import Settings
from tests.machines import PICK, initialize, invariant, machine_test, picked, rule
from tests.support import ROOT, example_count
from workqueue import Admission, Scheduler
from workqueue.core import (
    DEFAULT_JOB_SECONDS,
    MAX_IDLE_MODELS,
    PRIORITIES,
    estimate_wait,
    served_priority,
)

RUNNING = Admission.RUNNING
WAITING = Admission.WAITING


def make(**kwargs: object) -> Scheduler:
    return Scheduler(**kwargs)  # type: ignore[arg-type]


# Slots and places


def test_first_job_runs_and_the_next_waits_for_its_slot() -> None:
    s = make()
    assert s.submit(1, "llama3.2", "x", 0.0) is RUNNING
    assert s.submit(2, "llama3.2:latest", "y", 0.0) is WAITING
    assert s.job_state(2) is WAITING
    assert s.finish(1, 1.0) == [2]
    assert s.job_state(2) is RUNNING
    assert s.finish(2, 2.0) == []
    assert s.idle()


def test_model_concurrency_and_overrides() -> None:
    s = make(concurrency=2, overrides={"nomic-embed-text": 3}, max_active_models=2)
    assert [s.submit(i, "nomic-embed-text", "x", 0.0) for i in range(4)] == [RUNNING] * 3 + [
        WAITING
    ]
    assert [s.submit(i, "llama3.2", "x", 0.0) for i in range(10, 13)] == [RUNNING] * 2 + [WAITING]
    snap = s.snapshot(0.0)["models"]
    assert snap["nomic-embed-text:latest"]["slots"] == 3
    assert snap["llama3.2:latest"]["slots"] == 2


def test_from_settings_reads_every_queue_setting() -> None:
    config = Settings(
        model_concurrency=2,
        model_concurrency_overrides={"bge-m3:latest": 4},
        max_active_models=3,
        queue_max=7,
        queue_max_per_client=5,
        queue_timeout=12.0,
        switch_after=3.0,
        admin_concurrency=2,
        priority_aging=30.0,
    )
    s = Scheduler.from_settings(config)
    assert (s.concurrency, s.overrides, s.max_active_models) == (2, {"bge-m3:latest": 4}, 3)
    assert (s.queue_max, s.queue_max_per_client) == (7, 5)
    assert (s.queue_timeout, s.switch_after, s.admin_concurrency) == (12.0, 3.0, 2)
    assert s.priority_aging == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"max_active_models": 0},
        {"queue_max": 0},
        {"priority_aging": 0.0},
        {"queue_timeout": 0},
        {"switch_after": -1},
        {"admin_concurrency": 0},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make(**kwargs)


def test_max_active_models_caps_distinct_running_models() -> None:
    s = make(max_active_models=2)
    assert s.submit(1, "a", "x", 0.0) is RUNNING
    assert s.submit(2, "b", "x", 0.0) is RUNNING
    assert s.submit(3, "c", "x", 0.0) is WAITING
    assert s.snapshot(0.0)["totals"]["active_models"] == ["a:latest", "b:latest"]
    assert s.finish(1, 1.0) == [3]
    assert s.snapshot(1.0)["totals"]["active_models"] == ["b:latest", "c:latest"]


def test_duplicate_job_ids_and_missing_models_are_refused() -> None:
    s = make()
    s.submit(1, "a", "x", 0.0)
    with pytest.raises(ValueError):
        s.submit(1, "a", "x", 0.0)
    with pytest.raises(ValueError):
        s.submit(2, "  ", "x", 0.0)


# Affinity and switching


def test_running_model_takes_its_own_jobs_before_a_switch() -> None:
    s = make(switch_after=10.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 1.0)  # another model waits for the place
    s.submit("a2", "a", "x", 2.0)
    s.submit("a3", "a", "x", 3.0)
    assert s.finish("a1", 4.0) == ["a2"]  # a is running: it goes on
    assert s.finish("a2", 5.0) == ["a3"]
    assert s.finish("a3", 6.0) == ["b1"]  # a has nothing left: the place goes to b


def test_switch_after_drains_the_running_model_then_switches() -> None:
    s = make(concurrency=2, switch_after=10.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 1.0)
    assert s.next_deadline() == 11.0  # when b's wait forces a switch
    assert s.submit("a2", "a", "x", 5.0) is RUNNING  # a's free slot, no switch due yet
    assert s.snapshot(10.9)["switch"]["pending"] is False
    assert s.tick(11.0) == []
    snap = s.snapshot(11.0)
    assert snap["switch"] == {
        "pending": True,
        "target": "b:latest",
        "waited": 10.0,
        "draining": ["a:latest"],
    }
    assert snap["models"]["a:latest"]["draining"] is True
    assert s.pending_switch(11.0) == ("b:latest", ["a:latest"])
    assert s.submit("a3", "a", "x", 12.0) is WAITING  # a drains: no new jobs
    assert s.finish("a1", 13.0) == []  # a's free slot stays empty
    assert s.finish("a2", 14.0) == ["b1"]  # a drained: b gets the place
    snap = s.snapshot(14.0)
    assert snap["totals"]["active_models"] == ["b:latest"]
    assert snap["totals"]["forced_switches"] == 1
    assert snap["switch"]["pending"] is False


def test_a_model_switched_in_runs_at_least_switch_after() -> None:
    # Two busy models swap once per switch_after, not after every job.
    s = make(switch_after=10.0, queue_timeout=1000.0)
    s.submit("a0", "a", "x", 0.0)
    for i in range(1, 30):
        s.submit(f"a{i}", "a", "x", 0.0)
        s.submit(f"b{i}", "b", "y", 0.0)
    order = ["a"]
    running, now = "a0", 0.0
    while running:  # every job takes 1 s
        now += 1.0
        started = s.finish(running, now)
        assert len(started) <= 1
        running = str(started[0]) if started else ""
        order.append(running[:1])
    runs = [(model, len(list(group))) for model, group in itertools.groupby(order[:-1])]
    # b's wait forces a switch at 10; from then on each model keeps the place for
    # switch_after (10 jobs) before the other one's wait may force it back.
    assert runs[:5] == [("a", 10), ("b", 10), ("a", 10), ("b", 10), ("a", 10)]


def test_switch_after_zero_switches_as_soon_as_a_place_frees() -> None:
    s = make(switch_after=0.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 0.0)
    assert s.submit("a2", "a", "x", 0.0) is WAITING
    assert s.finish("a1", 1.0) == ["b1"]
    assert s.finish("b1", 2.0) == ["a2"]


def test_cancelling_the_job_that_forced_a_switch_lets_the_running_model_go_on() -> None:
    s = make(concurrency=2, switch_after=5.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 0.0)
    assert s.submit("a2", "a", "x", 6.0) is WAITING  # draining for b
    assert s.cancel("b1", 7.0) == ["a2"]
    assert s.snapshot(7.0)["switch"]["pending"] is False


def test_free_place_goes_to_the_model_whose_oldest_job_waited_longest() -> None:
    s = make(switch_after=100.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("c1", "c", "x", 1.0)
    s.submit("b1", "b", "x", 2.0)
    s.submit("b2", "b", "y", 3.0)
    assert s.finish("a1", 4.0) == ["c1"]
    assert s.finish("c1", 5.0) == ["b1"]


# Round-robin between clients


def test_one_clients_flood_does_not_starve_another_clients_single_job() -> None:
    s = make()
    s.submit("x0", "a", "x", 0.0)
    for i in range(1, 6):
        s.submit(f"x{i}", "a", "x", 0.0)
    s.submit("y1", "a", "y", 1.0)
    assert s.finish("x0", 2.0) == ["x1"]
    assert s.finish("x1", 3.0) == ["y1"]  # y's turn comes before x's second job


def test_clients_take_turns_round_robin() -> None:
    s = make(queue_max_per_client=10)
    s.submit("first", "a", "w", 0.0)
    for i in range(3):
        for client in "xyz":
            s.submit(f"{client}{i}", "a", client, 0.0)
    order = []
    running: Hashable = "first"
    for t in range(1, 10):
        (running,) = s.finish(running, float(t))
        order.append(running)
    assert order == ["x0", "y0", "z0", "x1", "y1", "z1", "x2", "y2", "z2"]


def test_a_client_joining_takes_its_turn_at_the_end_of_the_round() -> None:
    s = make()
    s.submit("x0", "a", "x", 0.0)
    s.submit("y0", "a", "y", 0.0)
    s.submit("y1", "a", "y", 0.0)
    s.submit("z0", "a", "z", 0.0)
    assert s.finish("x0", 1.0) == ["y0"]
    s.submit("x1", "a", "x", 1.5)  # the round is now z, y; x joins behind them
    assert s.finish("y0", 2.0) == ["z0"]
    assert s.finish("z0", 3.0) == ["y1"]
    assert s.finish("y1", 4.0) == ["x1"]


# Priority classes


def test_a_higher_class_goes_first_within_a_model() -> None:
    s = make(queue_max_per_client=10)
    s.submit("run", "a", "w", 0.0)
    s.submit("b1", "a", "x", 0.0, priority="batch")
    s.submit("n1", "a", "y", 1.0)
    s.submit("i1", "a", "z", 2.0, priority="interactive")
    assert s.finish("run", 3.0) == ["i1"]
    assert s.finish("i1", 4.0) == ["n1"]
    assert s.finish("n1", 5.0) == ["b1"]


def test_clients_take_turns_within_a_class_and_classes_stay_apart() -> None:
    s = make(queue_max_per_client=10)
    s.submit("run", "a", "w", 0.0)
    for i in range(2):
        s.submit(f"x{i}", "a", "x", 0.0, priority="batch")
        s.submit(f"y{i}", "a", "y", 0.0, priority="batch")
    # The same client's interactive job goes ahead of its own batch jobs.
    s.submit("x-chat", "a", "x", 1.0, priority="interactive")
    order = []
    running: Hashable = "run"
    for t in range(2, 7):
        (running,) = s.finish(running, float(t))
        order.append(running)
    assert order == ["x-chat", "x0", "y0", "x1", "y1"]


def test_an_interactive_job_is_next_behind_a_batch_flood() -> None:
    s = make(queue_max_per_client=200)
    s.submit("b0", "a", "nightly", 0.0, priority="batch")
    for i in range(1, 101):
        assert s.submit(f"b{i}", "a", "nightly", 0.0, priority="batch") is WAITING
    s.submit("chat", "a", "alice", 0.5, priority="interactive")
    assert s.finish("b0", 1.0) == ["chat"]
    assert s.snapshot(1.0)["priorities"] == {
        "interactive": {"waiting": 0, "running": 1},
        "normal": {"waiting": 0, "running": 0},
        "batch": {"waiting": 100, "running": 0},
    }


def test_a_job_aged_at_the_front_of_its_line_is_served_first() -> None:
    s = make(priority_aging=10.0, queue_max_per_client=50)
    s.submit("b1", "a", "nightly", 0.0, priority="batch")
    s.submit("b2", "a", "nightly", 0.0, priority="batch")  # b2 waits at nightly's front
    running: Hashable = "b1"
    t = 0.0
    for i in range(40):  # a steady interactive stream: one chat always waits
        s.submit(f"chat{i}", "a", "alice", t, priority="interactive")
        t += 1.0
        (running,) = s.finish(running, t)
        if running == "b2":
            break
    # b2 became nightly's next job at 0.0, so it aged at 10.0 and takes the slot freed then.
    assert running == "b2" and t == 10.0


def test_aging_counts_from_the_front_of_the_clients_line() -> None:
    """A batch backlog does not age as a whole: only each client's next job ages, so a
    flood does not outrank the interactive jobs that arrive while it is worked off."""
    s = make(priority_aging=10.0, queue_max_per_client=50)
    s.submit("b0", "a", "nightly", 0.0, priority="batch")
    for i in range(1, 31):
        s.submit(f"b{i}", "a", "nightly", 0.0, priority="batch")
    running: Hashable = "b0"
    for t in range(1, 25):  # batch jobs run back to back, each for a second
        (running,) = s.finish(running, float(t))
    assert running == "b24"
    s.submit("chat", "a", "alice", 24.5, priority="interactive")
    # b25 has waited 25 s since it arrived, but has been nightly's next job for 1 s.
    assert s.finish("b24", 25.0) == ["chat"]


def test_an_interactive_model_switches_in_at_half_the_switch_time_a_batch_one_at_twice() -> None:
    s = make(switch_after=10.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("a2", "a", "x", 0.0)
    s.submit("b1", "b", "y", 0.0, priority="batch")
    assert s.next_deadline() == 20.0  # a batch model forces a switch after 2 × 10 s
    s.submit("c1", "c", "z", 1.0, priority="interactive")
    assert s.next_deadline() == 6.0  # an interactive one after ½ × 10 s
    assert s.pending_switch(6.0) == ("c:latest", ["a:latest"])
    assert s.finish("a1", 7.0) == ["c1"]  # a drains; the interactive model goes first
    s.submit("n1", "b", "y", 7.5)  # b now also has a normal job: due 10 s after c's place
    assert s.next_deadline() == 17.0


def test_a_model_whose_oldest_job_waited_the_aging_time_switches_as_interactive() -> None:
    s = make(switch_after=10.0, priority_aging=12.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 0.0, priority="batch")
    # Batch: due at 20 s; but aged at 12 s it counts as interactive (½ × 10 s is past).
    assert s.next_deadline() == 12.0


def test_the_next_free_place_goes_to_the_model_whose_switch_falls_due_first() -> None:
    s = make(switch_after=10.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "x", 1.0, priority="batch")
    s.submit("c1", "c", "y", 2.0)
    s.submit("d1", "d", "z", 3.0, priority="interactive")
    assert s.finish("a1", 4.0) == ["d1"]
    assert s.finish("d1", 5.0) == ["c1"]
    assert s.finish("c1", 6.0) == ["b1"]


def test_served_priority_lowers_never_raises() -> None:
    assert served_priority("interactive", None) == "interactive"
    assert served_priority("interactive", "batch") == "batch"
    assert served_priority("normal", " Batch ") == "batch"
    assert served_priority("batch", "interactive") == "batch"  # above the ceiling: ignored
    assert served_priority("normal", "interactive") == "normal"
    with pytest.raises(ValueError, match="interactive, normal, batch"):
        served_priority("normal", "urgent")
    with pytest.raises(ValueError, match="priority must be one of"):
        make().submit("j", "a", "x", 0.0, priority="high")


# Bounds and rejections


def test_queue_max_rejects_with_ollamas_busy_text() -> None:
    s = make(queue_max=2)
    s.submit(0, "a", "x", 0.0)  # running jobs do not count
    s.submit(1, "a", "x", 0.0)
    s.submit(2, "a", "y", 0.0)
    with pytest.raises(QueueFull) as caught:
        s.submit(3, "a", "z", 0.0)
    assert caught.value.status == 503
    assert caught.value.message == BUSY_TEXT
    assert 1.0 <= caught.value.retry_after <= s.queue_timeout  # type: ignore[operator]
    assert s.snapshot(0.0)["models"]["a:latest"]["rejected"]["queue_full"] == 1
    assert s.job_state(3) is None
    s.finish(0, 1.0)
    assert s.submit(3, "a", "z", 1.0) is WAITING


def test_client_share_rejects_with_429() -> None:
    s = make(queue_max_per_client=2)
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "x", 0.0)
    s.submit(2, "b", "x", 0.0)  # the share counts every model of the client
    with pytest.raises(ClientShareFull) as caught:
        s.submit(3, "a", "x", 0.0)
    assert caught.value.status == 429
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1.0
    assert s.submit(4, "a", "y", 0.0) is WAITING  # other clients still queue
    snap = s.snapshot(0.0)
    assert snap["models"]["a:latest"]["rejected"]["client_queue_full"] == 1
    assert snap["totals"]["rejected"]["client_queue_full"] == 1
    assert snap["clients"]["x"] == {"waiting": 2, "running": 1}


def test_client_share_is_checked_before_the_total() -> None:
    s = make(queue_max=2, queue_max_per_client=2)
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "x", 0.0)
    s.submit(2, "a", "x", 0.0)
    with pytest.raises(ClientShareFull):
        s.submit(3, "a", "x", 0.0)
    with pytest.raises(QueueFull):
        s.submit(4, "a", "y", 0.0)


def test_waiting_jobs_time_out_and_next_deadline_says_when() -> None:
    s = make(queue_timeout=30.0, switch_after=100.0)
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "x", 1.0)
    s.submit(2, "a", "y", 5.0)
    assert s.next_deadline() == 31.0
    assert s.expire(30.9) == ([], [])
    assert s.expire(31.0) == ([1], [])
    assert s.next_deadline() == 35.0
    assert s.expire(40.0) == ([2], [])
    assert s.next_deadline() is None
    snap = s.snapshot(40.0)
    assert snap["models"]["a:latest"]["rejected"]["queue_timeout"] == 2
    assert snap["totals"]["waiting"] == 0


def test_timeout_of_the_job_that_forced_a_switch_lets_the_running_model_go_on() -> None:
    s = make(concurrency=2, switch_after=5.0, queue_timeout=10.0)
    s.submit("a1", "a", "x", 0.0)
    s.submit("b1", "b", "y", 0.0)
    assert s.submit("a2", "a", "x", 6.0) is WAITING
    assert s.next_deadline() == 10.0
    assert s.expire(10.0) == (["b1"], ["a2"])


# Leaving the queue


def test_cancel_a_waiting_job_is_counted_and_idempotent() -> None:
    s = make()
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "y", 0.0)
    s.submit(2, "a", "z", 0.0)
    assert s.cancel(1, 1.0) == []
    assert s.cancel(1, 1.0) == []
    assert s.finish(0, 2.0) == [2]
    snap = s.snapshot(2.0)
    assert snap["models"]["a:latest"]["rejected"]["cancelled"] == 1
    assert snap["models"]["a:latest"]["admitted"] == 2


def test_cancel_a_running_job_frees_its_slot() -> None:
    s = make()
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "y", 0.0)
    assert s.cancel(0, 1.0) == [1]
    assert s.finish(0, 1.0) == []  # a second release does nothing
    assert s.snapshot(1.0)["models"]["a:latest"]["rejected"]["cancelled"] == 0


def test_cancel_waiting_drops_every_waiting_job_and_starts_none() -> None:
    s = make(switch_after=0.0)
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "b", "y", 0.0)
    s.submit(2, "a", "z", 0.0)
    assert set(s.cancel_waiting(1.0)) == {1, 2}
    assert s.job_state(0) is RUNNING
    assert s.finish(0, 2.0) == []
    assert s.idle()


# The admin lane


def test_admin_lane_is_independent_of_model_places() -> None:
    s = make(admin_concurrency=2, max_active_models=1)
    assert s.submit("m1", "a", "x", 0.0) is RUNNING
    assert s.submit("p1", "b", "x", 0.0, admin=True) is RUNNING
    assert s.submit("p2", "", "y", 0.0, admin=True) is RUNNING
    assert s.submit("p3", "c", "x", 0.0, admin=True) is WAITING
    assert s.submit("m2", "d", "y", 0.0) is WAITING  # admin jobs took no model place
    snap = s.snapshot(0.0)
    assert snap["totals"]["active_models"] == ["a:latest"]
    assert snap["admin"]["running"] == 2
    assert snap["admin"]["waiting"] == 1
    assert "c:latest" not in snap["models"]
    assert s.finish("p1", 1.0) == ["p3"]
    assert s.finish("m1", 1.0) == ["m2"]


def test_admin_jobs_count_towards_the_bounds() -> None:
    s = make(queue_max=1)
    s.submit("p1", "a", "x", 0.0, admin=True)
    s.submit("p2", "a", "x", 0.0, admin=True)
    s.submit("m1", "a", "x", 0.0)
    with pytest.raises(QueueFull):
        s.submit("m2", "a", "y", 0.0)


# Reports


def test_snapshot_reports_models_clients_admin_and_totals() -> None:
    s = make(concurrency=1, max_active_models=1, switch_after=10.0, queue_timeout=60.0)
    s.submit(1, "a", "alice", 0.0)
    s.submit(2, "a", "bob", 1.0)
    s.submit(3, "b", "bob", 2.0)
    s.submit(4, "x", "root", 2.0, admin=True)
    s.cancel(2, 3.0)
    s.submit(5, "a", "carol", 3.0)
    snap = s.snapshot(4.0)
    rejected_none = {"queue_full": 0, "client_queue_full": 0, "queue_timeout": 0, "cancelled": 0}
    assert snap["models"] == {
        "a:latest": {
            "running": 1,
            "slots": 1,
            "waiting": 1,
            "oldest_wait": 1.0,
            "clients_waiting": 1,
            "admitted": 1,
            "rejected": {**rejected_none, "cancelled": 1},
            "avg_seconds": None,
            "active": True,
            "draining": False,
        },
        "b:latest": {
            "running": 0,
            "slots": 1,
            "waiting": 1,
            "oldest_wait": 2.0,
            "clients_waiting": 1,
            "admitted": 0,
            "rejected": rejected_none,
            "avg_seconds": None,
            "active": False,
            "draining": False,
        },
    }
    assert snap["admin"] == {
        "running": 1,
        "slots": 1,
        "waiting": 0,
        "oldest_wait": 0.0,
        "clients_waiting": 0,
        "admitted": 1,
        "rejected": rejected_none,
        "avg_seconds": None,
        "active": False,
        "draining": False,
    }
    assert snap["clients"] == {
        "alice": {"waiting": 0, "running": 1},
        "bob": {"waiting": 1, "running": 0},
        "carol": {"waiting": 1, "running": 0},
        "root": {"waiting": 0, "running": 1},
    }
    totals = snap["totals"]
    assert (totals["running"], totals["waiting"], totals["admitted"]) == (2, 2, 2)
    assert totals["rejected"] == {**rejected_none, "cancelled": 1}
    assert totals["active_models"] == ["a:latest"]
    assert snap["switch"] == {"pending": False, "target": None, "waited": 0.0, "draining": []}
    assert 1.0 <= snap["retry_after"] <= 60.0
    assert (snap["closed"], snap["shared"], snap["fallback"]) == (False, False, False)


def test_snapshot_keeps_a_bounded_number_of_idle_models() -> None:
    s = make(queue_timeout=1.0)
    for i in range(MAX_IDLE_MODELS + 50):
        s.submit(i, f"model{i}", "x", float(i))
        s.finish(i, float(i))
    last = float(MAX_IDLE_MODELS + 50)
    s.submit("busy", "busy", "x", last)
    models = s.snapshot(last)["models"]
    assert len(models) == MAX_IDLE_MODELS + 1
    assert "busy:latest" in models
    assert "model0:latest" not in models
    assert f"model{MAX_IDLE_MODELS + 49}:latest" in models


def test_retry_after_grows_with_the_queue_and_stays_in_range() -> None:
    s = make(queue_timeout=100.0, concurrency=2)
    assert s.retry_after(0.0) == pytest.approx(DEFAULT_JOB_SECONDS / 2)  # no history
    s.submit(0, "a", "x", 0.0)
    s.submit(1, "a", "x", 0.0)
    s.finish(0, 4.0)  # held 4 s
    s.finish(1, 4.0)
    assert s.snapshot(4.0)["totals"]["avg_seconds"] == pytest.approx(4.0)
    for i in range(2, 12):
        s.submit(i, "a", f"c{i}", 4.0)
    # 8 waiting, 2 slots, 4 s each: (8 + 1) * 4 / 2
    assert s.retry_after(4.0) == pytest.approx(18.0)
    assert s.retry_after(4.0, "a") == pytest.approx(18.0)
    for i in range(12, 100):
        s.submit(i, "a", f"c{i}", 4.0)
    assert s.retry_after(4.0) == 100.0  # clamped to queue_timeout
    quick = make(queue_timeout=100.0)
    quick.submit(0, "a", "x", 0.0)
    quick.finish(0, 0.01)
    assert quick.retry_after(0.01) == 1.0  # at least a second
    assert make(queue_timeout=0.2).retry_after(0.0) == 1.0


def test_time_going_backwards_is_treated_as_standing_still() -> None:
    s = make(queue_timeout=10.0)
    s.submit(0, "a", "x", 5.0)
    s.submit(1, "a", "x", 5.0)
    assert s.expire(3.0) == ([], [])
    assert s.next_deadline() == 15.0


# Random runs: arrivals, completions, cancellations and clock steps, with the invariants
# checked after every event against the test's own record of the jobs.

ADMIN = "<admin>"
MODELS = ("a:latest", "b:latest", "c:latest")
CLIENTS = ("x", "y", "z")


FACTORS = {0: 0.5, 1: 1.0, 2: 2.0}  # the switch clock of each class (DESIGN.md)


@dataclass
class Job:
    lane: str
    client: str
    submitted: float
    seq: int
    rank: int = 1  # 0 interactive, 1 normal, 2 batch
    front: float = math.nan  # when it became its client's next job of its class
    started: float = math.nan


class SchedulerMachine:
    """Drives a Scheduler like the timer greenlet would, jobs lasting at most ``job_max``."""

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
    def setup(
        self,
        concurrency: int,
        c_slots: int,
        max_active: int,
        queue_max: int,
        per_client: int,
        timeout: float,
        switch_after: float,
        admin_slots: int,
        job_max: float,
        aging: float,
    ) -> None:
        self.s = Scheduler(
            concurrency=concurrency,
            overrides={"c": c_slots},
            max_active_models=max_active,
            queue_max=queue_max,
            queue_max_per_client=per_client,
            queue_timeout=timeout,
            switch_after=switch_after,
            admin_concurrency=admin_slots,
            priority_aging=aging,
        )
        self.aging = aging
        self.slots = {
            "a:latest": concurrency,
            "b:latest": concurrency,
            "c:latest": c_slots,
            ADMIN: admin_slots,
        }
        self.max_active, self.queue_max, self.per_client = max_active, queue_max, per_client
        self.timeout, self.switch_after, self.job_max = timeout, switch_after, job_max
        self.now = 0.0
        self.ids = itertools.count()
        self.waiting: dict[int, Job] = {}
        self.running: dict[int, Job] = {}
        self.slice_start = -math.inf  # when a model last took a place
        self.admissions: Counter[tuple[str, int, str]] = Counter()
        # (lane, class, client) -> admission counts and the other clients' jobs of that
        # class waiting at that client's last admission, to check that none of them is
        # skipped before its next turn (unless that one is taken through aging).
        self.turn_marks: dict[
            tuple[str, int, str], tuple[Counter[tuple[str, int, str]], dict[int, str]]
        ] = {}
        self.finished: list[int] = []
        # While the events of one instant are applied one by one, the checks that need all
        # of them (timeouts, the starvation bound) wait until the instant is settled.
        self.settling = False

    # The test's own view of the rules

    def active(self) -> set[str]:
        return {job.lane for job in self.running.values() if job.lane != ADMIN}

    def due(self, jobs: list[Job]) -> float:
        """When a lane whose waiting jobs are ``jobs`` may force a switch: each class's
        oldest job's switch clock, and the lane counting as interactive once its oldest
        job has waited the aging time."""
        due = math.inf
        for rank, factor in FACTORS.items():
            first = min((job.submitted for job in jobs if job.rank == rank), default=None)
            if first is not None:
                due = min(due, max(first, self.slice_start) + self.switch_after * factor)
        first = min(job.submitted for job in jobs)
        aged = max(first + self.aging, max(first, self.slice_start) + self.switch_after / 2)
        return min(due, aged)

    def next_model(self, active: set[str]) -> tuple[str, float] | None:
        """The waiting model without a place whose switch falls due first (ties: oldest)."""
        lanes: dict[str, list[Job]] = {}
        for job in self.waiting.values():
            if job.lane != ADMIN and job.lane not in active:
                lanes.setdefault(job.lane, []).append(job)
        if not lanes:
            return None
        order = {lane: (self.due(jobs), min(j.seq for j in jobs)) for lane, jobs in lanes.items()}
        lane = min(order, key=order.__getitem__)
        return lane, order[lane][0]

    def switch_due(self, active: set[str]) -> tuple[str, float] | None:
        return self.next_model(active)

    def line(self, job: Job) -> list[int]:
        """The waiting jobs of ``job``'s client and class in its lane, oldest first."""
        return sorted(
            i
            for i, w in self.waiting.items()
            if (w.lane, w.rank, w.client) == (job.lane, job.rank, job.client)
        )

    def aged(self, job_id: int, job: Job, now: float) -> bool:
        """Whether a waiting job is its line's first and has been for the aging time."""
        return self.line(job)[0] == job_id and job.front + self.aging <= now

    def leave(self, job_id: int, now: float) -> Job:
        """A waiting job leaves (starts, is cancelled, expires): its line's next is first now."""
        job = self.waiting[job_id]
        line = self.line(job)
        del self.waiting[job_id]
        if line[0] == job_id and len(line) > 1:
            self.waiting[line[1]].front = now
        return job

    def check_order(self, job_id: int, job: Job, now: float) -> None:
        """A job starting goes ahead of no aged job that aged before it, and, unless aged
        itself, of no job of a higher class: a higher class never waits behind a lower one
        for a free slot of its model, except through aging."""
        others = {i: w for i, w in self.waiting.items() if w.lane == job.lane and i != job_id}
        aged = [w for i, w in others.items() if self.aged(i, w, now)]
        if self.aged(job_id, job, now):
            event("aged job served")
            assert all(job.front <= w.front for w in aged), "an aged job was passed over"
        else:
            assert not aged, "a job went ahead of one that had aged"
            assert all(w.rank >= job.rank for w in others.values()), "a lower class went first"

    def target(self, now: float, active: set[str]) -> str | None:
        due = self.switch_due(active)
        return due[0] if due is not None and due[1] <= now else None

    # Applying what the scheduler decided

    def admit(self, job_id: int, job: Job, now: float, pre_active: set[str]) -> None:
        key = (job.lane, job.rank, job.client)
        self.check_order(job_id, job, now)
        if key in self.turn_marks and not self.aged(job_id, job, now):
            counts, others = self.turn_marks[key]
            for other_id, other in others.items():
                if other_id in self.waiting:
                    event("turn checked")
                    theirs = (job.lane, job.rank, other)
                    assert self.admissions[theirs] > counts[theirs], (
                        f"{job.client} had two turns on {job.lane} while {other} waited"
                    )
        self.turn_marks[key] = (
            self.admissions.copy(),
            {
                i: w.client
                for i, w in self.waiting.items()
                if (w.lane, w.rank) == (job.lane, job.rank) and w.client != job.client
            },
        )
        self.admissions[key] += 1
        self.leave(job_id, now)
        job.started = now
        self.running[job_id] = job
        if job.lane != ADMIN and job.lane not in pre_active:
            self.slice_start = now

    def apply(self, now: float, started: list[int], pre_active: set[str]) -> None:
        """Check and record the jobs an event started."""
        assert len(set(started)) == len(started)
        assert all(job_id in self.waiting for job_id in started), "started a job not waiting"
        model_jobs = [self.waiting[i].lane for i in started if self.waiting[i].lane != ADMIN]
        target = self.target(now, pre_active)
        if target is not None and model_jobs:
            # A switch is due: running models take no new jobs; the place goes to the target.
            assert model_jobs[0] == target, (target, model_jobs)
            event("forced switch")
        if target is not None:
            event("switch due")
        placed: set[str] = set(pre_active) | {ADMIN}
        for job_id in started:
            job = self.waiting[job_id]
            if job.lane not in placed:
                # A model taking a place is the one whose switch falls due first.
                first = self.next_model(placed)
                assert first is not None and job.lane == first[0], (job.lane, first)
                placed.add(job.lane)
            self.admit(job_id, job, now, pre_active)
        if target is None:
            # Affinity: without a switch due, a running model with jobs waiting keeps its place.
            active = self.active()
            for lane in pre_active:
                if any(job.lane == lane for job in self.waiting.values()):
                    assert lane in active, f"{lane} lost its place with no switch due"
        self.check(now)

    def check(self, now: float) -> None:
        active = self.active()
        running = Counter(job.lane for job in self.running.values())
        waiting = Counter(job.lane for job in self.waiting.values())
        assert len(active) <= self.max_active
        for lane, slots in self.slots.items():
            assert running[lane] <= slots
        assert len(self.waiting) <= self.queue_max
        clients = Counter(job.client for job in self.waiting.values())
        for client in CLIENTS:
            assert clients[client] <= self.per_client
        due = self.switch_due(active)
        target = due[0] if due is not None and due[1] <= now else None
        for job in self.waiting.values():
            assert self.settling or job.submitted + self.timeout > now, "waited past the timeout"
            # Nothing waits that could run: the lane is full, or draining, or has no place.
            if job.lane == ADMIN:
                assert running[ADMIN] == self.slots[ADMIN]
            elif job.lane in active:
                assert running[job.lane] == self.slots[job.lane] or target is not None
            else:
                assert len(active) == self.max_active
        if due is not None and not self.settling:
            # Starvation bound: jobs last at most job_max, so once the oldest waiting model
            # may force a switch, it gets a place within job_max.
            assert now < due[1] + self.job_max + 1e-9, ("starved", due, now)
        snap = self.s.snapshot(now)
        totals = snap["totals"]
        assert (totals["running"], totals["waiting"]) == (len(self.running), len(self.waiting))
        assert set(totals["active_models"]) == active
        for lane in MODELS:
            row = snap["models"].get(lane, {"running": 0, "waiting": 0})
            assert row["running"] == running[lane]
            assert row["waiting"] == waiting[lane]
        assert snap["admin"]["running"] == running[ADMIN]
        assert snap["switch"]["pending"] == (target is not None)
        assert self.s.idle() == (not self.running and not self.waiting)

    # Events

    def finish_job(self, job_id: int) -> None:
        pre_active = self.active()
        self.running.pop(job_id)
        self.finished.append(job_id)
        self.apply(self.now, self.s.finish(job_id, self.now), pre_active)  # type: ignore[arg-type]

    def cancel_waiting_job(self, job_id: int) -> None:
        pre_active = self.active()
        self.leave(job_id, self.now)
        self.apply(self.now, self.s.cancel(job_id, self.now), pre_active)  # type: ignore[arg-type]

    def timer(self, now: float) -> None:
        """What the timer greenlet does at a deadline: expire, then tick."""
        pre_active = self.active()
        expired, started = self.s.expire(now)
        for job_id in expired:
            job = self.leave(job_id, now)  # type: ignore[arg-type]
            assert job.submitted + self.timeout <= now
        self.apply(now, started, pre_active)  # type: ignore[arg-type]
        assert self.s.tick(now) == [], "time alone started a job"

    @rule(
        model=st.sampled_from(MODELS),
        client=CLIENTS,
        admin=[False, False, False, True],
        count=range(1, 5),
        rank=[0, 1, 1, 2],
        full_name=st.booleans(),
    )
    def submit(
        self, model: str, client: str, admin: bool, count: int, rank: int, full_name: bool
    ) -> None:
        """One client sends ``count`` jobs of one class for one model at once, naming it
        in full (``a:latest``, as the proxy does) or short (``a``)."""
        for _ in range(count):
            self.submit_one(model, client, admin, rank, full_name)

    def submit_one(
        self, model: str, client: str, admin: bool, rank: int = 1, full_name: bool = False
    ) -> None:
        job_id = next(self.ids)
        lane = ADMIN if admin else model
        waiting_total = len(self.waiting)
        client_waiting = sum(job.client == client for job in self.waiting.values())
        pre_active = self.active()
        job = Job(lane, client, self.now, job_id, rank)
        if not self.line(job):
            job.front = self.now
        try:
            admission = self.s.submit(
                job_id,
                model if full_name else model.split(":")[0],
                client,
                self.now,
                admin=admin,
                priority=PRIORITIES[rank],
            )
        except ClientShareFull as exc:
            event("client share full")
            assert client_waiting >= self.per_client
            assert 1.0 <= exc.retry_after <= max(1.0, self.timeout)  # type: ignore[operator]
        except QueueFull as exc:
            event("queue full")
            assert client_waiting < self.per_client and waiting_total >= self.queue_max
            assert 1.0 <= exc.retry_after <= max(1.0, self.timeout)  # type: ignore[operator]
        else:
            self.waiting[job_id] = job
            if admission is RUNNING:
                self.apply(self.now, [job_id], pre_active)
            else:
                assert client_waiting < self.per_client and waiting_total < self.queue_max
                self.check(self.now)

    @rule(how=["finish", "cancel waiting", "cancel running", "release twice"], pick=PICK)
    def end(self, how: str, pick: int) -> None:
        """A running job ends, a waiting or running job's client leaves, or a release repeats."""
        pool = {
            "finish": self.running,
            "cancel waiting": self.waiting,
            "cancel running": self.running,
            "release twice": self.finished,
        }[how]
        if not pool:
            return
        job_id = picked(pool, pick)
        if how == "finish":
            self.finish_job(job_id)
        elif how == "cancel waiting":
            self.cancel_waiting_job(job_id)
        elif how == "cancel running":
            pre_active = self.active()
            self.running.pop(job_id)
            started = self.s.cancel(job_id, self.now)
            self.apply(self.now, started, pre_active)  # type: ignore[arg-type]
        else:
            assert self.s.finish(job_id, self.now) == []

    @rule(step=st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.0, 8.0)))
    def advance(self, step: float) -> None:
        """Move the clock, ending jobs that reach job_max and running the timer at deadlines."""
        until = self.now + step
        for _ in range(10_000):
            ends = [job.started + self.job_max for job in self.running.values()]
            deadline = self.s.next_deadline()
            if deadline is not None:
                assert deadline > self.now or not self.waiting, "a deadline in the past"
                ends.append(deadline)
            at = min(ends, default=math.inf)
            if at > until:
                break
            self.now = max(self.now, at)
            self.settling = True
            for job_id, job in sorted(self.running.items(), key=lambda item: item[1].started):
                if job_id in self.running and job.started + self.job_max <= self.now:
                    self.finish_job(job_id)
            self.settling = False
            self.timer(self.now)
        else:
            raise AssertionError("the clock made no progress")
        self.now = until
        self.timer(until)

    @invariant()
    def next_deadline_is_the_earliest_expiry_or_switch(self) -> None:
        if not hasattr(self, "s"):
            return
        expected = [job.submitted + self.timeout for job in self.waiting.values()]
        due = self.switch_due(self.active())
        if due is not None and due[1] > self.now:
            expected.append(due[1])
        assert self.s.next_deadline() == min(expected, default=None)

    def teardown(self) -> None:
        """Every job leaves one way or another; nothing may stay held."""
        if not hasattr(self, "s"):
            return
        while self.waiting or self.running:
            if self.waiting:
                self.cancel_waiting_job(min(self.waiting))
            else:
                self.finish_job(min(self.running))
        assert self.s.idle()
        snap = self.s.snapshot(self.now)
        assert snap["clients"] == {}
        assert snap["totals"]["running"] == snap["totals"]["waiting"] == 0
        assert snap["totals"]["active_models"] == []
        assert snap["switch"]["pending"] is False
        for row in [*snap["models"].values(), snap["admin"]]:
            assert row["running"] == row["waiting"] == row["clients_waiting"] == 0
        assert self.s.next_deadline() is None


test_scheduler_rules_hold_in_random_runs = machine_test(
    SchedulerMachine, max_examples=500, step_count=50
)


@settings(max_examples=example_count(300), deadline=None)
@given(
    slots=st.integers(1, 3),
    aging=st.sampled_from([1.0, 2.5, 6.0]),
    job_max=st.sampled_from([0.5, 1.0, 2.0]),
    arrivals=st.lists(
        st.tuples(
            st.sampled_from(CLIENTS),
            st.sampled_from([0, 0, 1, 2]),  # interactive most
            st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5]),  # seconds after the previous job
            st.floats(0.5, 1.0),  # its run time, a fraction of job_max
        ),
        min_size=1,
        max_size=80,
    ),
)
@example(  # a steady interactive stream while one batch job waits
    slots=1,
    aging=1.0,
    job_max=1.0,
    arrivals=[("x", 0, 0.0, 1.0), ("y", 2, 0.0, 1.0)] + [("x", 0, 0.5, 1.0)] * 30,
)
def test_no_job_waits_longer_than_the_aging_bound_plus_the_running_jobs(
    slots: int, aging: float, job_max: float, arrivals: list[tuple[str, int, float, float]]
) -> None:
    """Once a job has been its client's next job of its class for the aging time, the
    slots its model frees go to the aged jobs, oldest first: it runs within the aging
    bound plus one run of the jobs running then per round of the aged jobs ahead of it
    (at most one per other client and class), whatever the higher classes send."""
    s = Scheduler(
        concurrency=slots,
        queue_max=1000,
        queue_max_per_client=1000,
        queue_timeout=1e9,
        priority_aging=aging,
    )
    lines = len({(client, rank) for client, rank, _, _ in arrivals})
    bound = aging + job_max * math.ceil(lines / slots)
    jobs: dict[int, tuple[str, int, float]] = {}  # id -> client, class, run time
    line_of: dict[tuple[str, int], list[int]] = {}  # each client and class's waiting jobs
    front: dict[int, float] = {}
    ends: dict[int, float] = {}  # running jobs' end times
    pending = []
    t = 0.0
    for n, (client, rank, gap, fraction) in enumerate(arrivals):
        t += gap
        pending.append((t, n))
        jobs[n] = (client, rank, fraction * job_max)

    def started(ids: list[Hashable], now: float) -> None:
        for job_id in ids:
            assert isinstance(job_id, int)
            client, rank, run = jobs[job_id]
            line = line_of[(client, rank)]
            assert line[0] == job_id  # a client's jobs of a class run in their order
            line.pop(0)
            if line:
                front[line[0]] = now
            assert now - front[job_id] <= bound + 1e-9, (job_id, front[job_id], now, bound)
            ends[job_id] = now + run

    while pending or ends:
        next_end = min(ends.values(), default=math.inf)
        if pending and pending[0][0] < next_end:
            now, job_id = pending.pop(0)
            client, rank, _ = jobs[job_id]
            line = line_of.setdefault((client, rank), [])
            if not line:
                front[job_id] = now
            line.append(job_id)
            if s.submit(job_id, "a", client, now, priority=PRIORITIES[rank]) is RUNNING:
                started([job_id], now)
        else:
            job_id = min(ends, key=lambda i: ends[i])
            now = ends.pop(job_id)
            started(s.finish(job_id, now), now)
    assert s.idle()


# What importing the core costs


def test_importing_the_core_loads_the_standard_library_only() -> None:
    """The scheduler (and errors.py) import no web framework, event loop or Redis client."""
    probe = (
        "import sys; before = set(sys.modules); import workqueue.core, errors; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    tops = {name.split(".")[0] for name in found}
    assert not tops & {"flask", "werkzeug", "gevent", "greenlet", "redis", "geventhttpclient"}
    assert tops - set(sys.stdlib_module_names) == {"workqueue", "errors", "endpoints"}
    # The package's other names still load on first use.
    import workqueue

    assert workqueue.WorkQueue.__module__ == "workqueue.gate"
    with pytest.raises(AttributeError):
        _ = workqueue.NoSuchThing  # type: ignore[attr-defined]


def test_the_estimate_is_the_same_in_both_queues() -> None:
    s = make(concurrency=2, queue_timeout=60.0)
    assert s.retry_after(0.0) == estimate_wait(None, 0, 2, 60.0) == DEFAULT_JOB_SECONDS / 2
    assert estimate_wait(4.0, 9, 2, 60.0) == 20.0
    assert estimate_wait(4.0, 99, 2, 60.0) == 60.0  # at most the queue timeout
    assert estimate_wait(0.1, 0, 8, 60.0) == 1.0  # at least a second
