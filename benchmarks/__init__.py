"""Benchmarks of the builder daemon against the real Docker engine: `scripts/bench [SCENARIO…]`.

A scenario is an async function returning the body of its BENCHMARKS.md
section (method, table, notes). To add one, write a module with a `run()` and
list it in SCENARIOS; the order here is the order of the report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from benchmarks import fanout, reconnect_memory


@dataclass(frozen=True)
class Scenario:
    name: str  # the command-line name
    title: str  # the report's section heading
    run: Callable[[], Awaitable[str]]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("fanout", "Log fan-out to concurrent SSE followers", fanout.run),
        Scenario("reconnect-memory", "Log-stream reconnect churn", reconnect_memory.run),
    )
}
