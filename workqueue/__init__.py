"""When a compute job may run: per-model slots, a fair bounded queue, no model thrashing.

``core.Scheduler`` makes every decision from events stamped with the time; ``gate.WorkQueue``
lets gevent greenlets wait on it. See DESIGN.md, "Scheduling rules (workqueue/)".
"""

from .core import Admission, Scheduler
from .gate import ClientGone, Slot, WorkQueue

__all__ = ["Admission", "ClientGone", "Scheduler", "Slot", "WorkQueue"]
