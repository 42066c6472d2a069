"""Typed log events and build results, decoded from the wire format in `builder.protocol`."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

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


_decode_json = msgspec.json.Decoder().decode

# A chatty build's batch makes thousands of events: set through the slots' own descriptors,
# which a frozen dataclass's __init__ (object.__setattr__ per field) takes twice as long to do.
_new_object = object.__new__
_set_id = BuildEvent.__dict__["id"].__set__
_set_data = BuildEvent.__dict__["data"].__set__


def _make_event(cls: type[BuildEvent], event_id: int, payload: dict[str, Any]) -> BuildEvent:
    event = _new_object(cls)
    _set_id(event, event_id)
    _set_data(event, payload)
    return event


def decode_event(event_id: int, data: str) -> BuildEvent:
    payload = _decode_json(data)
    return _TYPES.get(payload.get("type"), BuildEvent)(event_id, payload)


def decode_frame(frame_id: int, data: str) -> list[BuildEvent]:
    """The events of one SSE frame: a single event (`{...}`, the frame's id), or a batch frame
    of the daemon's `?batch=true` stream (`<first id> [{...},{...}]`, consecutive ids ending at
    the frame's id), decoded with one JSON parse."""
    if data.startswith("{"):
        return [decode_event(frame_id, data)]
    first, _, array = data.partition(" ")
    payloads = _decode_json(array)
    start = int(first)
    if not isinstance(payloads, list) or start + len(payloads) - 1 != frame_id:
        raise ValueError(f"batch frame {frame_id} does not hold ids {first}..{frame_id}")
    types, make = _TYPES, _make_event
    return [
        make(types.get(payload.get("type"), BuildEvent), event_id, payload)
        for event_id, payload in enumerate(payloads, start=start)
    ]


def terminal_event_from_status(status: dict[str, Any]) -> BuildEvent:
    """The terminal frame a finished build's status stands for (when the frame itself is out of reach)."""
    event_id = int(status.get("last_event_id") or 0)
    if status["status"] == p.BuildStatus.SUCCEEDED.value:
        return DoneEvent(
            event_id,
            {
                "type": p.EVENT_DONE,
                "done": True,
                "status": status["status"],
                "image_ref": status.get("image_ref"),
                "image_id": status.get("image_id"),
            },
        )
    return ErrorEvent(
        event_id, {"type": p.EVENT_ERROR, "status": status["status"], "error": status.get("error") or status["status"]}
    )


@dataclasses.dataclass(frozen=True)
class BuildResult:
    build_id: str
    status: str
    image_ref: str
    image_id: str | None
    duration: float  # seconds from submit to the terminal frame, measured by the client
