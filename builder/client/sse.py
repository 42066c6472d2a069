"""Incremental Server-Sent Events decoder (the WHATWG parsing rules), fed raw bytes."""

from __future__ import annotations

import codecs
import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerSentEvent:
    data: str
    id: str | None = None
    event: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed chunks as they arrive; complete events come out. A frame cut off mid-way never does."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._event: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._partial + self._text.decode(chunk)
        lines = text.splitlines(keepends=True)
        # A trailing line without its terminator may continue in the next chunk ("\r" may precede "\n").
        self._partial = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        events = []
        for line in lines:
            if event := self._line(line.rstrip("\r\n")):
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, self._data = self._data, []
        event, self._event = self._event, None
        if not data:
            return None
        return ServerSentEvent(data="\n".join(data), id=self._id, event=event, retry=self._retry)
