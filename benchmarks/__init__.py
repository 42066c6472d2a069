"""Benchmarks of the builder daemon against the real Docker engine: `scripts/bench [SCENARIO…]`.

A scenario is an async function returning its BENCHMARKS.md section: either
the markdown body alone, or a `harness.Result` with the body plus its rows of
the headline table and its bars of the ratio chart. To add one, write a module
with a `run()` and list it in SCENARIOS; the order here is the order of the
report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from benchmarks import (
    cancel,
    chatty,
    cluster,
    concurrency,
    e2e,
    fanout,
    fanout_idle,
    reconnect_memory,
    session,
    ttfl,
    upload,
)
from benchmarks.harness import Result


@dataclass(frozen=True)
class Scenario:
    name: str  # the command-line name
    title: str  # the report's section heading
    run: Callable[[], Awaitable[str | Result]]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("e2e", "End-to-end build vs docker build", e2e.run),
        Scenario("chatty", "A chatty build: 200,000 log lines to the terminal", chatty.run),
        Scenario("ttfl", "Time to first log line", ttfl.run),
        Scenario("upload", "Context upload throughput and memory", upload.run),
        Scenario("fanout", "Log fan-out to concurrent SSE followers", fanout.run),
        Scenario("fanout-idle", "5,000 log followers that never read", fanout_idle.run),
        Scenario("cancel", "Cancel a running build", cancel.run),
        Scenario("concurrency", "20 builds, two at a time", concurrency.run),
        Scenario("reconnect-memory", "Log-stream reconnect churn", reconnect_memory.run),
        Scenario("session", "A BuildKit session's added time (build secrets)", session.run),
        Scenario("cluster", "Cluster mode: replicas sharing one Redis", cluster.run),
    )
}
