"""Typed log events and build results, decoded from the wire format in `builder.protocol`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, overload

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


# An event is a JSON object, a batch frame's events a list of them: checked as they are decoded.
_decode_payload = msgspec.json.Decoder(dict[str, Any]).decode
_decode_payloads = msgspec.json.Decoder(list[dict[str, Any]]).decode

# A chatty build's batch makes thousands of events: set through the slots' own descriptors,
# which a frozen dataclass's __init__ (object.__setattr__ per field) takes twice as long to do.
_new_object = object.__new__
_set_id = BuildEvent.__dict__["id"].__set__
_set_data = BuildEvent.__dict__["data"].__set__


def _make_event(event_id: int, payload: dict[str, Any]) -> BuildEvent:
    event = _new_object(_TYPES.get(payload.get("type", ""), BuildEvent))
    _set_id(event, event_id)
    _set_data(event, payload)
    return event


class EventBatch(Sequence[BuildEvent]):
    """Events that arrived together, with consecutive ids from `first_id`.

    Each is made into its typed event (`LogEvent`, `DoneEvent`, ...) only when looked at;
    `payloads` are their decoded JSON objects, which a printer reads without an object per
    event (a chatty build's batch holds thousands). Slices are batches too.
    """

    __slots__ = ("first_id", "payloads")

    def __init__(self, first_id: int, payloads: list[dict[str, Any]]) -> None:
        self.first_id = first_id
        self.payloads = payloads

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.payloads) - 1

    def __len__(self) -> int:
        return len(self.payloads)

    @overload
    def __getitem__(self, index: int) -> BuildEvent: ...
    @overload
    def __getitem__(self, index: slice) -> EventBatch: ...
    def __getitem__(self, index: int | slice) -> BuildEvent | EventBatch:
        positions = range(len(self.payloads))[index]  # IndexError and negative indices as a list's
        if isinstance(positions, int):
            return _make_event(self.first_id + positions, self.payloads[positions])
        if positions.step != 1 and len(positions) > 1:
            raise ValueError("a batch of events is sliced with step 1: its ids are consecutive")
        start = positions.start if positions else 0
        return EventBatch(self.first_id + start, self.payloads[start : start + len(positions)])

    def __iter__(self) -> Iterator[BuildEvent]:
        for event_id, payload in enumerate(self.payloads, start=self.first_id):
            yield _make_event(event_id, payload)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EventBatch):
            return (self.first_id, self.payloads) == (other.first_id, other.payloads) or not (self or other)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EventBatch(ids {self.first_id}..{self.last_id})"


def decode_frame(frame_id: int, data: str) -> EventBatch:
    """The events of one SSE frame: a single event (`{...}`, the frame's id), or a batch frame
    of the daemon's `?batch=true` stream (`<first id> [{...},{...}]`, consecutive ids ending at
    the frame's id), decoded with one JSON parse."""
    try:
        if data.startswith("{"):
            return EventBatch(frame_id, [_decode_payload(data)])
        first, _, array = data.partition(" ")
        payloads = _decode_payloads(array)
    except msgspec.DecodeError as exc:  # a ValueError too, but not in every msgspec version we allow
        raise ValueError(f"frame {frame_id} is not JSON of events: {exc}") from exc
    start = int(first)
    if start + len(payloads) - 1 != frame_id or not payloads:
        raise ValueError(f"batch frame {frame_id} does not hold ids {first}..{frame_id}")
    return EventBatch(start, payloads)


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
