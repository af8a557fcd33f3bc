"""Random runs of a test's state machine, each run drawn as one list of steps.

A machine is a class with ``@initialize`` methods (their arguments drawn once, before the
first step), ``@rule`` methods (the steps), ``@invariant`` methods (checked after the
set-up and after every step) and an optional ``teardown`` (run at the end, even after a
failure), as with hypothesis' RuleBasedStateMachine. ``machine_test`` turns it into a
unittest TestCase that runs it ``max_examples`` times, each time ``step_count`` steps.

Unlike RuleBasedStateMachine, a step is two values drawn: its rule, then one of the
rule's steps, all of its arguments together. Hypothesis' own bookkeeping per value drawn
(spans, its tree of choices, mutations) costs about as much as a step of our machines
does, and a RuleBasedStateMachine step draws five to eight values (whether to go on, the
rule, its feature flag, each argument): runs drawn this way cost well under half the CPU
for the same examples and steps. What RuleBasedStateMachine does for finding and
shrinking is kept:

* rule arguments are lists of values (their product makes the rule's steps, one draw;
  repeat a value to weight it; at most TABLE_MAX of them) or strategies (drawn after it,
  for values such as floats);
* a rule picks among the steps the machine can take now (a job to finish) by a number
  drawn with it (``pick``), not by a second draw;
* each run enables a random subset of the rules, as hypothesis' swarm testing does (all
  of them about a quarter of the time; shrinking goes towards all of them);
* rules are chosen evenly among the enabled ones; the first rule's first step is STOP,
  which ends the run, and its second is PASS, which does nothing: a run almost always
  takes all its steps, and shrinking ends the run where it fails and turns the steps
  that play no part into PASS (left out of the report);
* the calls of a failing run are reported one per line with its example.
"""

from __future__ import annotations

import itertools
import math
import unittest
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from tests.support import example_count

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# The first rule's first two steps: STOP ends the run; PASS does nothing (it is what
# shrinking turns a step that plays no part in a failure into).
STOP = ("STOP", {})
PASS = ("PASS", {})


def initialize(**arguments: SearchStrategy[Any]) -> Callable[[F], F]:
    """A set-up method: called once with ``arguments`` drawn, before the first step."""

    def mark(method: F) -> F:
        method._machine_setup = arguments  # type: ignore[attr-defined]
        return method

    return mark


def rule(**arguments: Sequence[Any] | SearchStrategy[Any]) -> Callable[[F], F]:
    """A step: each argument a list of values (the rule's steps are their product, drawn
    at once; repeat a value to weight it) or a strategy."""

    def mark(method: F) -> F:
        method._machine_rule = arguments  # type: ignore[attr-defined]
        return method

    return mark


def invariant() -> Callable[[F], F]:
    """A check run after the set-up and after every step."""

    def mark(method: F) -> F:
        method._machine_invariant = True  # type: ignore[attr-defined]
        return method

    return mark


def picked(pool: Collection[T], pick: int) -> T:
    """The ``pick``-th of ``pool``'s items in sorted order, modulo their number (a rule's
    ``pick`` argument: it shrinks towards the first)."""
    items = sorted(pool)  # type: ignore[type-var]
    return items[pick % len(items)]


# A rule's ``pick`` argument: more values than a pool of the machines ever holds, few
# enough that a rule with four other choices keeps to TABLE_MAX steps.
PICK = range(63)
# Hypothesis draws an index uniformly only up to 256 (beyond, smaller ones are likelier):
# a rule's table of steps holds at most this many; draw more arguments as strategies.
TABLE_MAX = 257


def _marked(machine: type, mark: str) -> dict[str, Any]:
    return {
        name: getattr(getattr(machine, name), mark)
        for name in sorted(dir(machine))
        if hasattr(getattr(machine, name, None), mark)
    }


def _table_size(arguments: dict[str, Any]) -> int:
    """How many steps a rule's table holds (0 with a strategy argument)."""
    if any(isinstance(v, SearchStrategy) for v in arguments.values()):
        return 0
    return math.prod(len(v) for v in arguments.values())


def _runs(machine: type, step_count: int) -> SearchStrategy[Any]:
    """A run: the set-up arguments, then up to ``step_count`` steps of a random set of
    rules (ended early by STOP)."""
    rules = _marked(machine, "_machine_rule")
    # The rule with the most steps goes first: its first step is STOP, its second PASS,
    # so that a random run seldom ends early.
    names = sorted(rules, key=lambda n: -_table_size(rules[n]))
    tables: dict[str, SearchStrategy[tuple[str, dict[str, Any]]]] = {}
    drawn: dict[str, SearchStrategy[dict[str, Any]] | None] = {}  # strategy arguments
    for index, name in enumerate(names):
        listed = {k: v for k, v in rules[name].items() if not isinstance(v, SearchStrategy)}
        table = [
            (name, dict(zip(listed, values, strict=True)))
            for values in itertools.product(*listed.values())
        ]
        steps = [STOP, PASS, *table] if index == 0 else table
        if len(steps) > TABLE_MAX:
            raise ValueError(f"{machine.__name__}.{name}: {len(steps)} steps, over {TABLE_MAX}")
        tables[name] = st.sampled_from(steps)
        strategies = {k: v for k, v in rules[name].items() if k not in listed}
        drawn[name] = st.fixed_dictionaries(strategies) if strategies else None
    every = tuple(names)
    subsets = [
        combo
        for size in range(len(names) - 1, 0, -1)
        for combo in itertools.combinations(names, size)
    ]
    swarm = st.sampled_from([every] * max(1, len(subsets) // 3) + subsets)
    chosen = {subset: st.sampled_from(subset) for subset in [every, *subsets]}
    setups = st.fixed_dictionaries(
        {n: st.fixed_dictionaries(a) for n, a in _marked(machine, "_machine_setup").items()}
    )

    @st.composite
    def runs(draw: st.DrawFn) -> tuple[dict[str, dict[str, Any]], list[Any]]:
        arguments = draw(setups)
        rule_of = chosen[draw(swarm)]
        steps: list[tuple[str, dict[str, Any]]] = []
        while len(steps) < step_count:
            name = draw(rule_of)
            step = draw(tables[name])
            if step[0] == STOP[0]:
                break
            extra = drawn[name]
            if extra is not None:
                step = (name, {**step[1], **draw(extra)})
            steps.append(step)
        return arguments, steps

    return runs()


def run_machine(machine: type, setups: dict[str, dict[str, Any]], steps: list[Any]) -> None:
    """Set ``machine`` up, take ``steps`` (up to STOP), checking its invariants after each,
    and tear it down; on a failure, the calls made are noted."""
    state = machine()
    invariants = [getattr(state, n) for n in _marked(machine, "_machine_invariant")]
    calls = [*setups.items()]
    try:
        try:
            for name, arguments in setups.items():
                getattr(state, name)(**arguments)
            for check in invariants:
                check()
            for call in steps:
                if call[0] == PASS[0]:
                    continue
                calls.append(call)
                name, arguments = call
                getattr(state, name)(**arguments)
                for check in invariants:
                    check()
        finally:
            calls.append(("teardown", {}))
            teardown = getattr(state, "teardown", None)
            if teardown is not None:
                teardown()
    except BaseException:
        for name, arguments in calls:
            note(f"state.{name}({_arguments(arguments)})")
        raise


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def machine_test(machine: type, *, max_examples: int, step_count: int) -> type[unittest.TestCase]:
    """A TestCase running ``machine`` for ``example_count(max_examples)`` runs of
    ``step_count`` steps each."""
    runs = _runs(machine, step_count)

    def run(run: tuple[dict[str, dict[str, Any]], list[Any]]) -> None:
        run_machine(machine, *run)

    run.__qualname__ = f"{machine.__qualname__}.run"
    # Each machine's examples under its own key in hypothesis' example database.
    run._hypothesis_internal_add_digest = machine.__qualname__.encode()  # type: ignore[attr-defined]
    test = settings(max_examples=example_count(max_examples), deadline=None)(given(runs)(run))

    class TestCase(unittest.TestCase):
        def runTest(self) -> None:  # noqa: N802 - unittest's name
            test()

    TestCase.__qualname__ = f"{machine.__qualname__}.TestCase"
    return TestCase
