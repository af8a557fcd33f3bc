"""When a compute job may run: per-model slots, a fair bounded queue, no model thrashing.

``core.Scheduler`` makes every decision from events stamped with the time; ``gate.WorkQueue``
lets gevent greenlets wait on it. With Redis storage, ``shared.SharedWorkQueue`` applies the
same rules to state in Redis (``scripts.py``), for every worker and host (docs/SHARED_QUEUE.md).
See DESIGN.md, "Scheduling rules (workqueue/)".
"""

from .admission import Admitter, init_app
from .core import Admission, Scheduler
from .gate import ClientGone, Slot, WorkQueue
from .shared import SharedSlot, SharedWorkQueue

__all__ = [
    "Admission",
    "Admitter",
    "ClientGone",
    "Scheduler",
    "SharedSlot",
    "SharedWorkQueue",
    "Slot",
    "WorkQueue",
    "init_app",
]
