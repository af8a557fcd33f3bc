"""The failed-key guard: an address that keeps presenting wrong API keys is shut out for a while.

Every 401 the gate answers to a request that presented a key (Bearer, x-api-key, or
the status page's Basic) counts as one failure of the client's address, in the
limits storage under a moving window of GATE_AUTH_FAIL_LIMIT (``20/minute`` by
default). Once the window is full, the address's requests get 429 until the
oldest failure leaves the window, and they get it in the reject cache
(limiter.fastpath), in front of the light lane and Flask: no key of theirs is
hashed or compared, a valid one included. With a shared storage, a worker that
has not seen the address fail asks the storage before it compares a key.
"""

from __future__ import annotations

import logging
import time

from limits import RateLimitItem, parse_many
from limits.storage import Storage
from limits.storage.base import MovingWindowSupport
from limits.strategies import MovingWindowRateLimiter

from .fallback import Fallback

logger = logging.getLogger(__name__)

# Blocked addresses kept at most; past this, expired ones are dropped when one is added.
MAX_BLOCKS = 10_000
_SCOPE = ("gate", "auth-failures")


class AuthGuard:
    """Failed key presentations per address, and the addresses they have shut out."""

    def __init__(self, limit: str, storage: Storage | None) -> None:
        self.limit = limit
        self.items: tuple[RateLimitItem, ...] = tuple(parse_many(limit))
        self.storage = Fallback(storage, MovingWindowSupport, "failed-key guard")  # type: ignore[type-abstract]
        self.blocks: dict[str, float] = {}  # address -> epoch seconds it is shut out until
        self.refused = 0  # requests answered 429 by the guard
        self.failures = 0  # failed key presentations counted

    @property
    def shared(self) -> bool:
        """Whether other workers or hosts count failures in the same storage."""
        return self.storage.shared is not None

    def blocked_until(self, address: str, *, ask_storage: bool = False) -> float | None:
        """When ``address`` may present keys again, or None when it may now.

        ``ask_storage`` also reads the shared storage (failures other workers saw),
        for requests about to have a key compared.
        """
        now = time.time()
        until = self.blocks.get(address)
        if until is not None:
            if until > now:
                return until
            del self.blocks[address]
        if ask_storage and self.shared:
            until = self.storage.run(lambda s: self._full_until(s, address))
            if until is not None:
                self._block(address, until)
            return until
        return None

    def failed(self, address: str) -> None:
        """Count one failed key presentation of ``address``; shut it out once the window is full."""
        self.failures += 1

        def hit(storage: MovingWindowSupport) -> float | None:
            limiter = MovingWindowRateLimiter(storage)  # type: ignore[arg-type]
            for item in self.items:
                limiter.hit(item, *_SCOPE, address)
            return self._full_until(storage, address)

        until = self.storage.run(hit)
        if until is not None and address not in self.blocks:
            logger.warning(
                "%s: too many failed API keys (%s); refused for %.0f s",
                address,
                self.limit,
                until - time.time(),
            )
            self._block(address, until)

    def _full_until(self, storage: MovingWindowSupport, address: str) -> float | None:
        """When the last full window of ``address`` frees, None when none is full."""
        limiter = MovingWindowRateLimiter(storage)  # type: ignore[arg-type]
        until = None
        for item in self.items:
            if not limiter.test(item, *_SCOPE, address):
                reset = limiter.get_window_stats(item, *_SCOPE, address).reset_time
                until = max(until or 0.0, reset)
        return until

    def _block(self, address: str, until: float) -> None:
        if len(self.blocks) >= MAX_BLOCKS:
            now = time.time()
            self.blocks = {a: u for a, u in self.blocks.items() if u > now}
        self.blocks[address] = until

    def stats(self) -> dict[str, object]:
        """For the status page: the limit, addresses shut out now, refusals and failures."""
        now = time.time()
        return {
            "limit": self.limit,
            "blocked": sum(1 for until in self.blocks.values() if until > now),
            "refused": self.refused,
            "failures": self.failures,
        }
