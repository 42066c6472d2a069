"""Incremental Server-Sent Events decoder, fed raw bytes, after the WHATWG interpretation rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
UTF-8 (invalid bytes replaced), one leading BOM dropped, lines ended by CRLF, LF or CR alone
(and by nothing else: U+2028 or a form feed are data), `:` comments, a blank line dispatches.
A frame without `data` is not an event, and neither is one the stream ends inside.
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

# The frame our daemon sends for every event, `id: N\ndata: …\n\n`: field names as parsed.
_ID_DATA = ("id", "data")
# A tail (the frame in progress) up to this long stays unparsed until the frame is complete.
_TAIL_KEPT = 4096


class ServerSentEvent(NamedTuple):
    data: str
    id: str = ""  # the last event ID in force when the event was dispatched ("" if none yet)
    event: str = "message"
    retry: int | None = None  # the reconnection time (ms) in force, if the stream set one
    fields: tuple[str, ...] = _ID_DATA  # the names of the fields the frame held, in order


class SSEDecoder:
    """Feed chunks as they arrive; complete events come out. A frame cut off mid-way never does.

    `last_event_id` and `retry` persist across events, as the spec's event source keeps them.
    """

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True  # a BOM is dropped only before the first character
        self._after_cr = False  # the last chunk ended with CR: an LF opening the next one is the same break
        self._partial = ""  # what follows the last complete frame, kept as text (see _TAIL_KEPT)
        # The frame being read: its data lines, event type, and field names (all empty between frames).
        self._data: list[str] = []
        self._event = ""
        self._fields: list[str] = []
        self.last_event_id = ""
        self.retry: int | None = None

    @property
    def incomplete(self) -> bool:
        """Whether what was fed ends inside a frame (which the end of the stream would drop)."""
        return bool(self._partial or self._fields)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._text.decode(chunk)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix("\ufeff")
        if self._after_cr:
            self._after_cr = False
            text = text.removeprefix("\n")
        if "\r" in text:
            # CRLF and a lone CR end lines as LF does: as LFs, one way of splitting serves all.
            # A CR that ends the chunk has ended its line: an LF opening the next chunk belongs to it.
            self._after_cr = text.endswith("\r")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = self._partial + text
        events: list[ServerSentEvent] = []
        if text.startswith("\n"):
            # Text starts at a line start, where a lone LF is the blank line (more are no-ops).
            self._dispatch(events)
            text = text.lstrip("\n")
        # Split into frames on the blank line between them.
        *blocks, tail = text.split("\n\n")
        plain_ids = "\x00" not in text
        for block in blocks:
            # Our own frame, `id: N` then one `data:` line, without the general parser.
            newline = block.find("\n")
            if (
                newline > 0
                and not self._fields
                and block.startswith("id: ")
                and block.startswith("data: ", newline + 1)
                and block.find("\n", newline + 1) < 0
                and (plain_ids or block.find("\x00", 4, newline) < 0)
            ):
                self.last_event_id = block[4:newline]
                events.append(ServerSentEvent(block[newline + 7 :], self.last_event_id, "message", self.retry))
                continue
            for line in block.split("\n"):
                self._line(line, events)
            self._dispatch(events)
        if len(tail) <= _TAIL_KEPT:
            self._partial = tail  # whole, so the frame it starts can take the fast path next time
        else:  # a long frame: parse its lines now, not rescan them at every chunk
            *lines, self._partial = tail.split("\n")
            for line in lines:
                self._line(line, events)
        return events

    def _line(self, line: str, events: list[ServerSentEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._fields.append(name)
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self.last_event_id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        if self._data:
            events.append(
                ServerSentEvent(
                    "\n".join(self._data),
                    self.last_event_id,
                    self._event or "message",
                    self.retry,
                    tuple(self._fields),
                )
            )
            self._data = []
        self._event = ""
        self._fields = []
