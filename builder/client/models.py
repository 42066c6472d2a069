"""Typed log events and build results, decoded from the wire format in `builder.protocol`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from builder import protocol as p


@dataclasses.dataclass(frozen=True, slots=True)
class BuildEvent:
    id: int
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return p.is_terminal_event(self.data)


@dataclasses.dataclass(frozen=True, slots=True)
class LogEvent(BuildEvent):
    @property
    def line(self) -> str:
        line: str = self.data["line"]
        return line


@dataclasses.dataclass(frozen=True, slots=True)
class StatusEvent(BuildEvent):
    @property
    def status(self) -> str:
        status: str = self.data["status"]
        return status


@dataclasses.dataclass(frozen=True, slots=True)
class DoneEvent(BuildEvent):
    @property
    def image_ref(self) -> str:
        image_ref: str = self.data["image_ref"]
        return image_ref

    @property
    def image_id(self) -> str | None:
        return self.data.get("image_id")


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEvent(BuildEvent):
    @property
    def error(self) -> str:
        error: str = self.data["error"]
        return error

    @property
    def status(self) -> str:
        status: str = self.data["status"]
        return status


_TYPES: dict[str, type[BuildEvent]] = {
    p.EVENT_LOG: LogEvent,
    p.EVENT_STATUS: StatusEvent,
    p.EVENT_DONE: DoneEvent,
    p.EVENT_ERROR: ErrorEvent,
}


def decode_event(event_id: int, data: str) -> BuildEvent:
    payload = json.loads(data)
    return _TYPES.get(payload.get("type"), BuildEvent)(event_id, payload)


def terminal_event_from_status(status: dict[str, Any]) -> BuildEvent:
    """The terminal frame a finished build's status stands for (when the frame itself is out of reach)."""
    event_id = int(status.get("last_event_id") or 0)
    if status["status"] == p.BuildStatus.SUCCEEDED.value:
        return DoneEvent(event_id, {"type": p.EVENT_DONE, "done": True, "status": status["status"],
                                    "image_ref": status.get("image_ref"), "image_id": status.get("image_id")})
    return ErrorEvent(event_id, {"type": p.EVENT_ERROR, "status": status["status"],
                                 "error": status.get("error") or status["status"]})


@dataclasses.dataclass(frozen=True)
class BuildResult:
    build_id: str
    status: str
    image_ref: str
    image_id: str | None
    duration: float  # seconds from submit to the terminal frame, measured by the client
