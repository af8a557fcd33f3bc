"""Rate-limit strings (``60/minute;5/second``, or ``off``): parsed and checked without I/O.

The grammar is that of the ``limits`` library, which Flask-Limiter hands these
strings to. It is repeated here because gunicorn's master validates settings
before any worker boots, and importing ``limits`` there would import asyncio and
ssl before gevent patches the workers (MonkeyPatchWarning). tests/test_limiter_units.py
holds this parser to ``limits.parse_many``, and the worker checks every string
with ``limits`` again when the extension starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OFF = "off"

# Seconds per period, as limits.limits.TIME_TYPES defines them (a month is 30 days).
PERIODS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 12 * 30 * 86400,
}

_SEPARATORS = re.compile(r"[,;|]")
_SINGLE = re.compile(r"\s*([0-9]+)\s*(?:/|\s*per\s*)\s*([0-9]+)?\s*([a-z]+)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Rate:
    """``amount`` requests (or tokens) per ``seconds``."""

    amount: int
    seconds: int


def parse_limit(text: str) -> tuple[Rate, ...]:
    """The rates a limit string sets, () for ``off``; ValueError says what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("must be a rate limit such as '60/minute;5/second', or 'off'")
    if text.lower() == OFF:
        return ()
    rates = []
    for part in _SEPARATORS.split(text):
        match = _SINGLE.fullmatch(part)
        if match is None:
            raise ValueError(
                f"cannot read {part.strip()!r}: expected COUNT/PERIOD such as "
                "'60/minute' or '10 per 5 seconds', several joined with ';'"
            )
        amount, multiples, unit = match.groups()
        unit = unit.lower()
        period = PERIODS.get(unit) or (PERIODS.get(unit[:-1]) if unit.endswith("s") else None)
        if period is None:
            raise ValueError(
                f"{part.strip()!r}: unknown period {unit!r} "
                "(second, minute, hour, day, month or year)"
            )
        if int(amount) < 1:
            raise ValueError(f"{part.strip()!r}: the count must be 1 or more (use 'off' for none)")
        if multiples is not None and int(multiples) < 1:
            raise ValueError(f"{part.strip()!r}: the period must be 1 or more")
        rates.append(Rate(int(amount), period * int(multiples or 1)))
    return tuple(rates)


def normalize_limit(text: str) -> str:
    """``text`` checked and trimmed, or ``off``; ValueError when it is not a limit string."""
    return OFF if not parse_limit(text) else text.strip()


def burst_room(text: str) -> Rate | None:
    """The rate of ``text`` that admits the fewest requests at once (None for ``off``).

    A burst larger than its amount is refused, however long the queue behind it.
    """
    rates = parse_limit(text)
    return min(rates, key=lambda rate: rate.amount) if rates else None
