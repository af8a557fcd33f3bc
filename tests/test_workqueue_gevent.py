"""The work queue under gevent: greenlets really block, wake, time out, leave and shut down.

Only gevent primitives are used (spawn, sleep, Event), which work without monkey-patching.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from errors import ClientShareFull, QueueFull, QueueTimeout, ShuttingDown
from settings import Settings
from workqueue import ClientGone, WorkQueue
from workqueue.gate import Slot

pytestmark = pytest.mark.timeout(60)

MakeQueue = Callable[..., WorkQueue]


@pytest.fixture
def make_queue() -> Iterator[MakeQueue]:
    queues: list[WorkQueue] = []

    def make(**changes: Any) -> WorkQueue:
        queue = WorkQueue(Settings().replace(**changes))
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        queue.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.001)


def waiting(queue: WorkQueue) -> int:
    return int(queue.snapshot()["totals"]["waiting"])


def test_jobs_start_in_turn_as_slots_are_released(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("llama3.2", "x")
    assert holder.waited == 0.0
    order: list[str] = []
    slots: dict[str, Slot] = {}

    def job(name: str, client: str) -> None:
        slots[name] = queue.acquire("llama3.2", client)
        order.append(name)

    greenlets = [
        gevent.spawn(job, name, client) for name, client in [("x1", "x"), ("x2", "x"), ("y1", "y")]
    ]
    wait_until(lambda: waiting(queue) == 3)
    assert order == []
    holder.release()
    wait_until(lambda: len(order) == 1)
    assert order == ["x1"]  # one slot: one job at a time
    assert waiting(queue) == 2
    slots["x1"].release()
    wait_until(lambda: len(order) == 2)
    assert order == ["x1", "y1"]  # y's turn before x's second job
    slots["y1"].release()
    gevent.joinall(greenlets, timeout=5)
    assert order == ["x1", "y1", "x2"]
    slots["x2"].release()
    assert queue.idle()


def test_acquire_blocks_until_a_release_and_reports_the_wait(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    waiter = gevent.spawn(queue.acquire, "a", "y")
    wait_until(lambda: waiting(queue) == 1)
    assert not waiter.ready()
    holder.release()
    slot = waiter.get(timeout=1)
    assert isinstance(slot, Slot)
    assert slot.waited > 0
    slot.release()
    assert queue.idle()


def test_release_is_idempotent_and_slots_are_context_managers(make_queue: MakeQueue) -> None:
    queue = make_queue()
    with queue.acquire("a", "x") as slot:
        assert not slot.released
    assert slot.released
    slot.release()
    with pytest.raises(RuntimeError), queue.acquire("a", "x"):
        raise RuntimeError("the upstream failed")
    assert queue.idle()
    assert queue.snapshot()["models"]["a:latest"]["admitted"] == 2


def test_waiting_longer_than_the_queue_timeout_raises(make_queue: MakeQueue) -> None:
    queue = make_queue(queue_timeout=0.2)
    holder = queue.acquire("a", "x")
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as caught:
        queue.acquire("a", "y")
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.5
    assert caught.value.status == 503
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1.0
    snap = queue.snapshot()
    assert snap["models"]["a:latest"]["rejected"]["queue_timeout"] == 1
    assert snap["totals"]["waiting"] == 0
    holder.release()
    assert queue.idle()


def test_bounds_are_raised_at_once_with_retry_after(make_queue: MakeQueue) -> None:
    queue = make_queue(queue_max=2, queue_max_per_client=1)
    holder = queue.acquire("a", "x")
    waiters = [gevent.spawn(queue.acquire, "a", client) for client in ("x", "y")]
    wait_until(lambda: waiting(queue) == 2)
    with pytest.raises(ClientShareFull) as share:
        queue.acquire("a", "x")
    with pytest.raises(QueueFull) as full:
        queue.acquire("a", "z")
    assert share.value.status == 429 and full.value.status == 503
    assert share.value.retry_after is not None and full.value.retry_after is not None
    holder.release()
    for waiter in waiters:
        waiter.get(timeout=1).release()
    assert queue.idle()


def test_a_client_gone_while_waiting_leaves_at_once_and_never_runs(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    gone = gevent.event.Event()
    waiter = gevent.spawn(queue.acquire, "a", "y", client_gone=gone)
    wait_until(lambda: waiting(queue) == 1)
    left = time.monotonic()
    gone.set()
    with pytest.raises(ClientGone):
        waiter.get(timeout=1)
    assert time.monotonic() - left < 0.1
    snap = queue.snapshot()
    assert snap["totals"]["waiting"] == 0
    assert snap["models"]["a:latest"]["rejected"]["cancelled"] == 1
    holder.release()
    assert queue.idle()
    assert queue.snapshot()["models"]["a:latest"]["admitted"] == 1  # the holder only


def test_a_client_already_gone_is_not_queued(make_queue: MakeQueue) -> None:
    queue = make_queue()
    gone = gevent.event.Event()
    gone.set()
    with pytest.raises(ClientGone):
        queue.acquire("a", "x", client_gone=gone)
    assert queue.idle()
    assert queue.snapshot()["totals"]["admitted"] == 0


def test_a_client_gone_just_as_its_slot_came_frees_the_slot(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    gone = gevent.event.Event()
    waiter = gevent.spawn(queue.acquire, "a", "y", client_gone=gone)
    wait_until(lambda: waiting(queue) == 1)
    holder.release()  # hands the slot over ...
    gone.set()  # ... but the client leaves before the waiter runs again
    with pytest.raises(ClientGone):
        waiter.get(timeout=1)
    assert queue.idle()


def test_a_waiter_killed_from_outside_leaves_no_trace(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    waiters = [gevent.spawn(queue.acquire, "a", "y") for _ in range(2)]
    wait_until(lambda: waiting(queue) == 2)
    waiters[0].kill()
    assert waiting(queue) == 1
    waiters[1].kill(block=False)  # the kill lands first ...
    holder.release()  # ... though the slot has been handed to it already
    gevent.joinall(waiters, timeout=1)
    assert all(isinstance(waiter.value, gevent.GreenletExit) for waiter in waiters)
    assert queue.idle()


def test_a_gevent_timeout_around_acquire_leaves_no_trace(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05):
        queue.acquire("a", "y")
    assert waiting(queue) == 0
    holder.release()
    assert queue.idle()


def test_close_fails_every_waiter_and_later_acquires(make_queue: MakeQueue) -> None:
    queue = make_queue()
    holder = queue.acquire("a", "x")
    waiters = [gevent.spawn(queue.acquire, "a", client) for client in ("x", "y", "z")]
    wait_until(lambda: waiting(queue) == 3)
    queue.close()
    snap = queue.snapshot()
    assert snap["totals"]["waiting"] == 0
    assert snap["totals"]["rejected"]["cancelled"] == 3
    for waiter in waiters:
        with pytest.raises(ShuttingDown):
            waiter.get(timeout=1)
    with pytest.raises(ShuttingDown):
        queue.acquire("a", "x")
    assert queue.snapshot()["closed"] is True
    holder.release()  # slots held at close stay valid and are freed as usual
    assert queue.idle()


def test_switch_after_makes_the_running_model_drain(make_queue: MakeQueue) -> None:
    queue = make_queue(model_concurrency=2, switch_after=0.1)
    a1 = queue.acquire("a", "x")
    b = gevent.spawn(queue.acquire, "b", "y")
    wait_until(lambda: queue.snapshot()["switch"]["pending"])  # b waited past switch_after
    a2 = gevent.spawn(queue.acquire, "a", "x")
    wait_until(lambda: waiting(queue) == 2)
    assert not a2.ready()  # a has a free slot but takes no new jobs: it drains
    assert queue.snapshot()["switch"]["target"] == "b:latest"
    a1.release()
    b_slot = b.get(timeout=1)
    assert not a2.ready()
    b_slot.release()
    a2.get(timeout=1).release()
    assert queue.idle()
    assert queue.snapshot()["totals"]["forced_switches"] == 1


def test_the_timer_wakes_early_for_a_switch(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = make_queue(queue_timeout=30.0, switch_after=0.05)
    holder = queue.acquire("a", "x")
    early = gevent.spawn(queue.acquire, "a", "y")  # the timer now sleeps for 30 s
    wait_until(lambda: waiting(queue) == 1)
    with caplog.at_level(logging.INFO, logger="workqueue.gate"):
        late = gevent.spawn(queue.acquire, "b", "y")
        # Logged by the timer at the switch's deadline, long before its 30 s sleep ends.
        wait_until(lambda: "switch to b:latest due; draining a:latest" in caplog.text)
    holder.release()  # a drains: the place goes to b first
    late.get(timeout=1).release()
    early.get(timeout=1).release()
    assert queue.idle()


def test_two_thousand_waiters_all_get_their_turn(make_queue: MakeQueue) -> None:
    queue = make_queue(model_concurrency=4, queue_max=5000)
    holders = [queue.acquire("a", "first") for _ in range(4)]
    ran: list[int] = []

    def job(number: int) -> None:
        with queue.acquire("a", f"client{number % 100}"):
            ran.append(number)
            gevent.sleep(0)

    greenlets = [gevent.spawn(job, number) for number in range(2000)]
    wait_until(lambda: waiting(queue) == 2000)
    for holder in holders:
        holder.release()
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    assert sorted(ran) == list(range(2000))
    assert queue.idle()
    snap = queue.snapshot()
    assert snap["totals"]["admitted"] == 2004
    assert snap["clients"] == {}


def test_a_slot_never_released_is_freed_when_collected(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = make_queue()
    queue.acquire("a", "x")  # dropped at once, as a response generator never closed would be
    gc.collect()
    wait_until(queue.idle)  # freed by a hub callback
    assert "was never released" in caplog.text


def test_nothing_is_spawned_before_the_first_job() -> None:
    queue = WorkQueue(Settings())
    assert queue._timer is None
    assert queue.idle()
    queue.close()
