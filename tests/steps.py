"""A build step's own process, seen from this host: how tests and benchmarks know a step
really ran and really ended (BuildKit's step containers are not containers the engine lists)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path


def unique_sleep() -> str:
    """A `sleep N` command no other test runs, to find the step's own process on this host
    (BuildKit's step containers are not containers the engine lists)."""
    return f"sleep {random.randrange(10**6, 10**7)}"


def processes_running(command: str) -> list[int]:
    """Pids whose command line is exactly `command` (a step's process, seen from the host)."""
    wanted = command.encode().replace(b" ", b"\0") + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


async def wait_for_process(command: str, timeout: float = 30) -> list[int]:
    """Until the step's process runs: a cancel test must prove the step existed first."""
    async with asyncio.timeout(timeout):
        while not (pids := processes_running(command)):
            await asyncio.sleep(0.02)
    return pids
