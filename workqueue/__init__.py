"""When a compute job may run: per-model slots, a fair bounded queue, no model thrashing.

``core.Scheduler`` makes every decision from events stamped with the time; ``gate.WorkQueue``
lets gevent greenlets wait on it. With Redis storage, ``shared.SharedWorkQueue`` applies the
same rules to state in Redis (``scripts.py``), for every worker and host (docs/SHARED_QUEUE.md).
Both are a ``core.JobQueue``. See DESIGN.md, "Scheduling rules (workqueue/)".

The names below are loaded on first use, so that ``import workqueue.core`` (the pure
scheduler, which the fleet's placement builds on) loads the standard library only, not
Flask, gevent or redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .admission import Admitter, init_app
    from .core import Admission, JobQueue, JobSlot, QueueSnapshot, Scheduler
    from .gate import ClientGone, Slot, WorkQueue
    from .shared import SharedSlot, SharedWorkQueue

_HOMES = {
    "Admission": "core",
    "Admitter": "admission",
    "ClientGone": "gate",
    "JobQueue": "core",
    "JobSlot": "core",
    "QueueSnapshot": "core",
    "Scheduler": "core",
    "SharedSlot": "shared",
    "SharedWorkQueue": "shared",
    "Slot": "gate",
    "WorkQueue": "gate",
    "init_app": "admission",
}

__all__ = [
    "Admission",
    "Admitter",
    "ClientGone",
    "JobQueue",
    "JobSlot",
    "QueueSnapshot",
    "Scheduler",
    "SharedSlot",
    "SharedWorkQueue",
    "Slot",
    "WorkQueue",
    "init_app",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
