"""Token budgets: tokens each client may spend per minute, counted after each answer.

The proxy reports what an answer cost (prompt + completion tokens, streamed or
not) when it ends; the next request of a client whose budget is spent gets 429
until the window frees. Counts live in the limits storage as a sliding window
counter (two counters per client, whatever the budget), because a moving window
would keep one entry per token. :func:`budget_state` is the arithmetic, kept
pure so tests drive it with plain numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits.storage import Storage
from limits.storage.base import SlidingWindowCounterSupport

from .fallback import Fallback

WINDOW = 60  # seconds: budgets are per minute
# A bound no spend reaches, so recording a spend never fails for being "over the limit".
_UNBOUNDED = 10**15


@dataclass(frozen=True)
class BudgetState:
    """Where one client stands against a budget of ``limit`` tokens per WINDOW."""

    limit: int
    used: int
    reset: float  # epoch seconds: when a spent budget admits again, else when it is full again

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def spent(self) -> bool:
        return self.used >= self.limit


def budget_state(
    limit: int,
    window: float,
    previous: int,
    previous_ttl: float,
    current: int,
    current_ttl: float,
    now: float,
) -> BudgetState:
    """A sliding-window-counter reading (as ``Storage.get_sliding_window`` returns it) as a state.

    The count is ``floor(previous * previous_ttl / window) + current``, the weighting
    the limits library uses: the previous window counts for the part of it that the
    sliding window still covers. ``previous_ttl`` is how long the previous window
    still counts; ``current_ttl`` is the current window's end plus one window.
    """
    used = math.floor(previous * previous_ttl / window) + current if previous_ttl > 0 else current
    window_end = max(0.0, current_ttl - window)  # the current window becomes the previous one
    if used >= limit:
        if current >= limit:
            # Wait for the window to roll over, then for current * (W - x) / W to drop below limit.
            wait = window_end + window * (1 - limit / current)
        else:
            # previous * (previous_ttl - x) / W + current < limit
            wait = previous_ttl - window * (limit - current) / previous
        return BudgetState(limit, used, now + max(0.0, wait))
    if current:
        refill = window_end + window
    else:
        refill = previous_ttl if previous else 0.0
    return BudgetState(limit, used, now + refill)


class TokenBudgets:
    """Spend and read token budgets in the limits storage, in memory while it is down."""

    def __init__(self, storage: Storage | None) -> None:
        self.storage = Fallback(
            storage,
            SlidingWindowCounterSupport,  # type: ignore[type-abstract]
            "token budget",
        )
        self._run = self.storage.run

    @property
    def falling_back(self) -> bool:
        """Whether budgets count in memory because the shared storage failed."""
        return self.storage.falling_back

    def state(self, client: str, limit: int) -> BudgetState:
        """How much of ``limit`` tokens per minute ``client`` has left."""
        key = _key(client)
        reading = self._run(lambda s: s.get_sliding_window(key, WINDOW))
        previous, previous_ttl, current, current_ttl = reading
        return budget_state(
            limit, WINDOW, previous, previous_ttl, current, current_ttl, time.time()
        )

    def spend(self, client: str, tokens: int) -> None:
        """Count ``tokens`` against ``client``'s budget (always recorded, however much)."""
        if tokens <= 0:
            return
        key = _key(client)
        self._run(lambda s: s.acquire_sliding_window_entry(key, _UNBOUNDED, WINDOW, tokens))


def _key(client: str) -> str:
    return f"gate/tokens/{client}"
