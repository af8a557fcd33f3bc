"""A limits storage that falls back to this process's memory while it does not answer.

Flask-Limiter does this for the request limits; token budgets and the failed-key
guard use this class for their own counts. A Redis that stops answering costs one
call its timeout (limiter.extension.STORAGE_TIMEOUT), then the counts live in
memory and the storage is tried again every RETRY_AFTER seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from limits.storage import MemoryStorage, Storage

logger = logging.getLogger(__name__)

RETRY_AFTER = 5.0  # seconds in memory before the shared storage is tried again

S = TypeVar("S")
T = TypeVar("T")


class Fallback(Generic[S]):
    """Runs calls on the shared storage, or on memory while it fails (``what`` names it in logs).

    ``S`` is the storage interface the caller needs (a limits ``*Support`` class);
    ``storage`` is used when it offers it, and ``memory://`` is used as it is.
    """

    def __init__(self, storage: Storage | None, support: type[S], what: str) -> None:
        self.what = what
        self.shared: S | None = None
        if isinstance(storage, MemoryStorage):
            self.memory: S = storage  # type: ignore[assignment]  # nothing to fall back from
        else:
            self.memory = MemoryStorage()  # type: ignore[assignment]
            if isinstance(storage, support):
                self.shared = storage
        self._down_until = 0.0

    def run(self, call: Callable[[S], T]) -> T:
        if self.shared is not None and time.monotonic() >= self._down_until:
            try:
                result = call(self.shared)
            except Exception as exc:  # redis-py's errors, timeouts, OSError: any means "down"
                if self._down_until == 0.0:
                    logger.warning(
                        "%s storage unreachable (%s); counting in memory and trying again "
                        "every %ss",
                        self.what,
                        exc,
                        RETRY_AFTER,
                    )
                self._down_until = time.monotonic() + RETRY_AFTER
            else:
                if self._down_until:
                    logger.info("%s storage answers again", self.what)
                    self._down_until = 0.0
                return result
        return call(self.memory)

    @property
    def falling_back(self) -> bool:
        """Whether counts live in memory because the shared storage failed."""
        return bool(self._down_until)
