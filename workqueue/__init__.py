"""When a compute job may run: per-model slots, a fair bounded queue, no model thrashing.

``core.Scheduler`` makes every decision from events stamped with the time. See DESIGN.md,
"Scheduling rules (workqueue/)".
"""

from .core import Admission, Scheduler

__all__ = ["Admission", "Scheduler"]
