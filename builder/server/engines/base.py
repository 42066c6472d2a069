"""What every builder reports, whichever builder it is (pure definitions).

An engine turns one build into batches of these events. The build service reads
them without knowing which builder produced them: no isinstance checks on engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from typing import Protocol

# Step states and stream names are part of the wire contract: clients read them too.
from builder.protocol import (
    STDERR,
    STDOUT,
    STEP_CACHED,
    STEP_CANCELLED,
    STEP_DONE,
    STEP_ERROR,
    STEP_STARTED,
)
from builder.server.models import BuildSpec

__all__ = [
    "STDERR",
    "STDOUT",
    "STEP_CACHED",
    "STEP_CANCELLED",
    "STEP_DONE",
    "STEP_ERROR",
    "STEP_STARTED",
    "CredentialsLookup",
    "EngineEvent",
    "EngineFailure",
    "ImageBuilt",
    "LogClipped",
    "Output",
    "StepChanged",
]


# Longest line of a build's output kept whole; a longer one is cut into pieces of this size.
MAX_LINE = 64 << 10


def bring_forward(deadline: asyncio.Timeout | None, delay: float = 0.0) -> None:
    """Make `deadline` fall `delay` seconds from now, if that is sooner: a stop never gives a
    build more time, and one already expiring is left to expire (asyncio refuses to move it)."""
    if deadline is None or deadline.expired():
        return
    when = asyncio.get_running_loop().time() + delay
    current = deadline.when()
    if current is None or when < current:
        deadline.reschedule(when)


def utf8_cut(data: bytes, at: int) -> int:
    """`at`, moved back to the start of the UTF-8 character it falls in: a line cut there
    decodes without a broken character on either side."""
    back = at
    while back > at - 3 and back > 0 and back < len(data) and data[back] & 0xC0 == 0x80:
        back -= 1
    return back if back > 0 else at


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """Whole lines of the build's own output, from one step and one stream.

    `elapsed` is the seconds between the step's start and these lines (None when the
    builder does not say). A batch of lines shares one timestamp, as the engine sends them.
    """

    lines: list[str]
    step: int | None = None
    stream: str = STDOUT
    elapsed: float | None = None
    # The first line continues the previous Output's last one: a line over MAX_LINE comes in
    # pieces, so that no line costs more than its share.
    continued: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class StepChanged:
    """A step (a BuildKit vertex) changed state. Steps are numbered 1, 2, ... in the order
    the builder first mentions them, and keep that number for the whole build."""

    step: int
    name: str
    state: str
    duration: float | None = None  # seconds, once the step has ended
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LogClipped:
    """The engine dropped some of a step's output (its own log limits)."""

    step: int | None
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ImageBuilt:
    image_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class EngineFailure:
    message: str


EngineEvent = Output | StepChanged | LogClipped | ImageBuilt | EngineFailure

# A registry host -> the (username, password) to pull from it with, or None for no login.
CredentialsLookup = Callable[[str], tuple[str, str] | None]


@dataclasses.dataclass(eq=False)
class BuildJob:
    """One build, as the service hands it to a builder."""

    build_id: str
    # With `dockerfile` resolved to the path inside the context.
    spec: BuildSpec
    # The checked context tar, streamed to the engine as it comes.
    context: AsyncIterable[bytes | memoryview]
    cache_from: list[str] = dataclasses.field(default_factory=list)
    # The tenant's namespace ("" in open mode): what the builder keeps apart per tenant.
    tenant: str = ""
    # Longest output line kept whole; a longer one comes as pieces (Output.continued).
    max_line: int = MAX_LINE
    # Called once the engine has every byte of the context.
    on_context_sent: Callable[[], Awaitable[object]] | None = None
    # Called with ("container" | "image", id) before the builder relies on a thing it created,
    # so that a daemon restarted after a crash can still remove it.
    remember: Callable[[str, str], Awaitable[object]] | None = None
    # The build's secrets (`RUN --mount=type=secret`), in memory only, and only while it runs.
    secrets: Mapping[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    # Logins for the registries the build pulls from (FROM), when the daemon has any for it.
    registry_logins: CredentialsLookup | None = None


class BuildRun(Protocol):
    """A build under way on an engine."""

    def events(self) -> AsyncGenerator[list[EngineEvent], None]:
        """The build's events, a batch per read from the engine; ends with exactly one
        `ImageBuilt` or `EngineFailure` (a stream that stops without naming an image fails)."""
        ...

    async def stop(self) -> None:
        """Stop the build now (DELETE, timeout, shutdown). Returns once no step of it runs
        any more, as far as the engine can tell, or once it is certain none will start."""
        ...

    async def clean_up(self, *, images: bool) -> None:
        """Remove what the build left on the engine: always its containers; with `images`,
        the images it created (a cancelled build), else they stay as cache (a failed one)."""
        ...


class Builder(Protocol):
    name: str
    # Whether its builds can be given secrets (`BuildJob.secrets`).
    takes_secrets: bool

    def start(self, job: BuildJob) -> BuildRun: ...

    async def aclose(self) -> None:
        """Stop the builder's own background work (the engine is closing)."""
        ...
