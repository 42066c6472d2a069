"""Build events as `docker build --progress=plain` lines (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from builder.plainlog import clipped_line, event_lines, output_line, plain_text, step_lines
from builder.protocol import (
    STEP_CACHED,
    STEP_CANCELLED,
    STEP_DONE,
    STEP_ERROR,
    STEP_STARTED,
)
from builder.server.engines.base import EngineEvent, LogClipped, Output, StepChanged
from tests.test_trace import track

pytestmark = pytest.mark.unit


def render(events: list[EngineEvent]) -> list[str]:
    lines: list[str] = []
    for event in events:
        if isinstance(event, StepChanged):
            lines += step_lines(event.step, event.name, event.state, event.duration, event.error)
        elif isinstance(event, Output):
            lines += [output_line(event.step, line, event.elapsed) for line in event.lines]
        elif isinstance(event, LogClipped):
            lines.append(clipped_line(event.step, event.message))
    return lines


def test_a_real_build_renders_as_docker_prints_it() -> None:
    # `docker build --progress=plain` (CLI 20.10) of the same Dockerfile printed, for these
    # steps, the same lines (between a `#N sha256:…` line under each header that we leave
    # out, and blank lines between steps).
    assert render(track("two_steps.jsonl"))[8:] == [
        "#5 [2/3] RUN echo hello && echo oops >&2",
        "#5 0.140 hello",
        "#5 0.140 oops",
        "#5 DONE 0.1s",
        "#6 [3/3] RUN echo second",
        "#6 0.334 second",
        "#6 DONE 0.4s",
        "#7 exporting to image",
        "#7 DONE 0.0s",
    ]


def test_a_real_failure_and_cancel_render_as_docker_prints_them() -> None:
    assert render(track("failing_step.jsonl"))[-6:] == [
        "#4 [1/2] FROM docker.io/library/builder-busybox:latest",
        "#4 CACHED",
        "#5 [2/2] RUN echo before && echo bad >&2 && exit 3",
        "#5 0.214 bad",
        "#5 0.214 before",
        "#5 ERROR: executor failed running [/bin/sh -c echo before && echo bad >&2 && exit 3]: exit code: 3",
    ]
    assert render(track("cancelled_step.jsonl"))[-3:] == [
        "#5 [2/2] RUN echo going to sleep && sleep 20",
        "#5 0.189 going to sleep",
        "#5 CANCELED",
    ]


@pytest.mark.parametrize(
    ("state", "duration", "error", "expected"),
    [
        (STEP_STARTED, None, None, ["#3 [2/3] RUN make"]),
        (STEP_CACHED, None, None, ["#3 [2/3] RUN make", "#3 CACHED"]),
        (STEP_DONE, 1.25, None, ["#3 DONE 1.2s"]),
        (STEP_DONE, 61.0, None, ["#3 DONE 61.0s"]),
        (STEP_DONE, None, None, ["#3 DONE"]),
        (STEP_ERROR, None, "exit code: 2", ["#3 ERROR: exit code: 2"]),
        (STEP_CANCELLED, None, "context canceled", ["#3 CANCELED"]),
    ],
)
def test_step_lines(state: str, duration: float | None, error: str | None, expected: list[str]) -> None:
    assert step_lines(3, "[2/3] RUN make", state, duration, error) == expected


def test_step_lines_refuse_an_unknown_state() -> None:
    with pytest.raises(ValueError):
        step_lines(3, "x", "paused")


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (0.154, "#5 0.154 hi"),
        (9.9994, "#5 9.999 hi"),
        (11.2, "#5 11.20 hi"),  # docker: `#5 11.20 b` for a line 11.2 s into its step
        (100.04, "#5 100.0 hi"),
        (None, "#5 hi"),
    ],
)
def test_output_line_has_docker_precision(elapsed: float | None, expected: str) -> None:
    assert output_line(5, "hi", elapsed) == expected


def test_output_of_no_step_is_the_line_alone() -> None:
    assert output_line(None, "hi", 1.0) == "hi"


def test_clipped_line() -> None:
    notice = "[output clipped, log limit 200KiB/s reached]"
    assert clipped_line(5, notice) == f"#5 {notice}"
    assert clipped_line(None, notice) == notice


def test_a_batch_prints_as_its_events_do_one_by_one() -> None:
    payloads: list[dict[str, Any]] = [
        {
            "type": "status",
            "status": "running",
            "phase": "step",
            "step": 5,
            "name": "[2/2] RUN seq 3",
            "state": "started",
        },
        {"type": "log", "line": "1", "step": 5, "stream": "stdout", "elapsed": 0.1},
        {"type": "log", "line": "2", "step": 5, "stream": "stdout", "elapsed": 0.1},
        {"type": "log", "line": "3", "step": 5, "stream": "stdout", "elapsed": 12.5},
        {"type": "log", "line": "4", "step": 6, "stream": "stdout", "elapsed": 12.5},
        {"type": "log", "line": "no time", "step": 6, "stream": "stdout"},
        {"type": "log", "line": "no step"},
        {"type": "log", "line": "piece", "step": 6, "elapsed": 0.2, "cont": True},
        {
            "type": "status",
            "status": "running",
            "phase": "step",
            "step": 5,
            "name": "x",
            "state": "done",
            "duration": 0.2,
        },
        {"type": "status", "status": "queued", "position": 1},
    ]
    one_by_one = "".join(line + "\n" for payload in payloads for line in event_lines(payload))
    assert plain_text(payloads) == one_by_one
    assert one_by_one.splitlines()[1:6] == ["#5 0.100 1", "#5 0.100 2", "#5 12.50 3", "#6 12.50 4", "#6 no time"]
