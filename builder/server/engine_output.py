"""Parse the Docker engine's legacy-builder JSON stream into typed events (pure).

The engine's `stream` chunks are not line-aligned, so text is buffered until a
newline and a trailing partial line is flushed at the end.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_STEP_RE = re.compile(r"Step \d+/\d+ : (\w+)")
_RUNNING_IN_RE = re.compile(r" ---> Running in ([0-9a-f]{12,64})")
_USING_CACHE = " ---> Using cache"
_STEP_IMAGE_RE = re.compile(r" ---> ([0-9a-f]{12,64})")
_BUILT_RE = re.compile(r"Successfully built ([0-9a-f]{12,64})")



@dataclasses.dataclass(frozen=True)
class StepContainer:
    """A step's container was created: it must be killed if the build is cancelled."""

    container_id: str


@dataclasses.dataclass(frozen=True)
class StepImage:
    """A step produced an image; `created` is false for cache hits and the FROM image."""

    image_id: str
    created: bool


@dataclasses.dataclass(frozen=True)
class ImageBuilt:
    image_id: str


@dataclasses.dataclass(frozen=True)
class EngineFailure:
    message: str


# A plain `str` is one line of build output: the bulk of every stream, kept allocation-light.
EngineEvent = str | StepContainer | StepImage | ImageBuilt | EngineFailure


class BuildOutputParser:
    def __init__(self) -> None:
        self._partial = ""
        self._step_reuses_image = False
        self._built = False

    def feed(self, chunk: dict[str, Any]) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        if "error" in chunk or "errorDetail" in chunk:
            events.extend(self.finish())
            detail = chunk.get("errorDetail")
            message = (detail.get("message") if isinstance(detail, dict) else None) or chunk.get("error")
            events.append(EngineFailure(str(message or "the engine reported an unknown build error")))
            return events
        aux = chunk.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            self._built = True
            events.append(ImageBuilt(aux["ID"]))
        stream = chunk.get("stream")
        if isinstance(stream, str) and stream:
            text = self._partial + stream
            *lines, self._partial = text.split("\n")
            for line in lines:
                self._line(line, events)
        status = chunk.get("status")
        if isinstance(status, str):
            # Pull progress (with `pull=true`): one line per status update.
            ident = chunk.get("id")
            self._line(f"{ident}: {status}" if ident else status, events)
        return events

    def finish(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        if self._partial:
            line, self._partial = self._partial, ""
            self._line(line, events)
        return events

    def _line(self, line: str, events: list[EngineEvent]) -> None:
        line = line.removesuffix("\r")
        events.append(line)
        if not line.startswith(("Step ", " ---> ", "Successfully built ")):
            return  # the build's own output: most lines of a chatty build
        if m := _STEP_RE.match(line):
            self._step_reuses_image = m.group(1).upper() == "FROM"
        elif line == _USING_CACHE:
            self._step_reuses_image = True
        elif m := _RUNNING_IN_RE.fullmatch(line):
            events.append(StepContainer(m.group(1)))
        elif m := _STEP_IMAGE_RE.fullmatch(line):
            events.append(StepImage(m.group(1), created=not self._step_reuses_image))
            self._step_reuses_image = False
        elif (m := _BUILT_RE.fullmatch(line)) and not self._built:
            # Engines that send no `aux` ID only name the image in this line.
            self._built = True
            events.append(ImageBuilt(m.group(1)))


@dataclasses.dataclass(frozen=True)
class PushProgress:
    """One layer's push status, e.g. ("a1b2c3", "Pushing", 1048576, 5242880) or ("a1b2c3", "Pushed", 0, 0)."""

    layer: str
    status: str
    current: int
    total: int


@dataclasses.dataclass(frozen=True)
class PushDigest:
    digest: str


_DIGEST_RE = re.compile(r"\S+: digest: (sha256:[0-9a-f]{64}) size: \d+")


def parse_push_chunk(chunk: dict[str, Any]) -> PushProgress | PushDigest | EngineFailure | None:
    """Parse one message of the engine's image push stream (pure)."""
    if "error" in chunk or "errorDetail" in chunk:
        detail = chunk.get("errorDetail")
        message = (detail.get("message") if isinstance(detail, dict) else None) or chunk.get("error")
        return EngineFailure(str(message or "the engine reported an unknown push error"))
    aux = chunk.get("aux")
    if isinstance(aux, dict) and isinstance(aux.get("Digest"), str):
        return PushDigest(aux["Digest"])
    status = chunk.get("status")
    if not isinstance(status, str):
        return None
    if m := _DIGEST_RE.fullmatch(status):
        return PushDigest(m.group(1))
    detail = chunk.get("progressDetail") or {}
    return PushProgress(
        str(chunk.get("id", "")), status, int(detail.get("current") or 0), int(detail.get("total") or 0)
    )
