"""What every builder reports, whichever builder it is (pure definitions).

An engine turns one build into batches of these events. The build service reads
them without knowing which builder produced them: no isinstance checks on engines.
"""

from __future__ import annotations

import dataclasses

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

__all__ = [
    "STDERR",
    "STDOUT",
    "STEP_CACHED",
    "STEP_CANCELLED",
    "STEP_DONE",
    "STEP_ERROR",
    "STEP_STARTED",
    "EngineEvent",
    "EngineFailure",
    "ImageBuilt",
    "LogClipped",
    "Output",
    "StepChanged",
]


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
