"""Build events as the plain lines of `docker build --progress=plain` (pure).

Shared by the daemon's plain-text log and the CLI, so it takes plain values, not the
server's event classes. The format, as BuildKit's plain printer writes it:

    #5 [2/3] RUN echo hi
    #5 0.154 hi
    #5 DONE 0.2s

`#N` is the step number; output lines carry the seconds since the step started.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from builder.protocol import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_LOG,
    EVENT_STATUS,
    PHASE_LOG_CLIPPED,
    PHASE_LOG_TRUNCATED,
    PHASE_STEP,
    STEP_CACHED,
    STEP_CANCELLED,
    STEP_DONE,
    STEP_ERROR,
    STEP_STARTED,
)


def step_lines(step: int, name: str, state: str, duration: float | None = None, error: str | None = None) -> list[str]:
    """The lines for a step changing state.

    `started` gives the header (`#5 [2/3] RUN echo hi`). A cached step never started, so
    `cached` gives its header too, then `#4 CACHED`. The ends: `#5 DONE 1.2s`,
    `#5 ERROR: <message>`, `#5 CANCELED`.
    """
    if state == STEP_STARTED:
        return [f"#{step} {name}"]
    if state == STEP_CACHED:
        return [f"#{step} {name}", f"#{step} CACHED"]
    if state == STEP_DONE:
        return [f"#{step} DONE" if duration is None else f"#{step} DONE {duration:.1f}s"]
    if state == STEP_ERROR:
        return [f"#{step} ERROR: {error}" if error else f"#{step} ERROR"]
    if state == STEP_CANCELLED:
        return [f"#{step} CANCELED"]
    raise ValueError(f"unknown step state {state!r}")


def output_line(step: int | None, line: str, elapsed: float | None = None) -> str:
    """`#5 0.154 hi`: a line of a step's output, `elapsed` seconds after the step started.

    Like BuildKit, the time has 3 decimals below 10 s, 2 below 100 s, then 1. Output
    that belongs to no step is printed as it is.
    """
    if step is None:
        return line
    if elapsed is None:
        return f"#{step} {line}"
    digits = 3 if elapsed < 10 else 2 if elapsed < 100 else 1
    return f"#{step} {elapsed:.{digits}f} {line}"


def clipped_line(step: int | None, message: str) -> str:
    """The engine dropped some of a step's output: its notice, e.g.
    `#5 [output clipped, log limit 200KiB/s reached]`."""
    return message if step is None else f"#{step} {message}"


def event_lines(payload: Mapping[str, Any]) -> list[str]:
    """The plain lines of one log event payload (`type` log or status); terminal events and
    other status events print nothing here."""
    kind = payload.get("type")
    if kind == EVENT_LOG:
        return [output_line(payload.get("step"), payload["line"], payload.get("elapsed"))]
    if kind != EVENT_STATUS:
        return []
    phase = payload.get("phase")
    if phase == PHASE_STEP:
        return step_lines(
            payload["step"], payload["name"], payload["state"], payload.get("duration"), payload.get("error")
        )
    if phase == PHASE_LOG_CLIPPED:
        return [clipped_line(payload.get("step"), f"[the engine clipped this log: {payload.get('message')}]")]
    if phase == PHASE_LOG_TRUNCATED:
        return [f"--- {payload.get('message')}"]
    return []


def plain_text(payloads: Iterable[Mapping[str, Any]]) -> str:
    """The lines of many log and status events, each ending in a newline: a printer's one write
    for a batch. Output lines logged together share one `#5 0.154 ` prefix, formatted once."""
    out: list[str] = []
    last_step: object = None
    last_elapsed: object = None
    prefix = ""
    for payload in payloads:
        if payload.get("type") == EVENT_LOG:
            step = payload.get("step")
            if step is None:  # the legacy builder's lines: as they are
                out.append(payload["line"] + "\n")
                continue
            elapsed = payload.get("elapsed")
            if step != last_step or elapsed != last_elapsed:
                last_step, last_elapsed, prefix = step, elapsed, output_line(step, "", elapsed)
            out.append(prefix + payload["line"] + "\n")
        else:
            out.extend(line + "\n" for line in event_lines(payload))
    return "".join(out)


def terminal_lines(payload: Mapping[str, Any]) -> list[str]:
    """The outcome line of a terminal event: `--- succeeded: <image_ref>`, `--- failed: <error>`."""
    if payload.get("type") == EVENT_DONE:
        return [f"--- {payload['status']}: {payload['image_ref']}"]
    if payload.get("type") == EVENT_ERROR:
        return [f"--- {payload['status']}: {payload['error']}"]
    return []
