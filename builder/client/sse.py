"""Incremental Server-Sent Events decoder (the WHATWG parsing rules), fed raw bytes."""

from __future__ import annotations

import codecs
from typing import NamedTuple


class ServerSentEvent(NamedTuple):
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
        if "\r" in text:
            return self._feed_lines(text)
        # Fast path for LF-only streams: whole frames split on the blank line between them.
        *blocks, self._partial = text.split("\n\n")
        events = []
        for block in blocks:
            # The usual frame, `id: N` then one `data:` line, without the general parser.
            newline = block.find("\n")
            if (
                block.startswith("id: ") and block.startswith("data: ", newline + 1)
                and not self._data and "\n" not in block[newline + 1 :] and "\x00" not in block[4:newline]
            ):
                self._id = block[4:newline]
                events.append(ServerSentEvent(block[newline + 7 :], self._id, self._event, self._retry))
                self._event = None
                continue
            for line in block.split("\n"):
                self._line(line)
            if event := self._dispatch():
                events.append(event)
        return events

    def _feed_lines(self, text: str) -> list[ServerSentEvent]:
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
