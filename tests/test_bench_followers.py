"""The benchmarks' cheap SSE follower: what it counts from the bytes of a chunked log stream."""

from __future__ import annotations

import json

import pytest

from benchmarks.followers import CheapStream, id_frames

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _frame(event_id: int, payload: dict[str, object]) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event_id, json.dumps(payload, separators=(",", ":")).encode())


def _chunked(*writes: bytes) -> bytes:
    # One HTTP chunk per daemon write, then the zero-size chunk that ends the body.
    return b"".join(b"%x\r\n%s\r\n" % (len(w), w) for w in writes) + b"0\r\n\r\n"


def _stream(stamp: float) -> bytes:
    done = {"type": "done", "done": True, "status": "succeeded", "image_ref": None, "image_id": "sha256:1"}
    return HEAD + _chunked(
        b"retry: 3000\n\n",
        _frame(1, {"type": "log", "line": "1"}) + _frame(2, {"type": "log", "line": f"@M 2 {stamp:.6f}"}),
        b": ping\n\n" + _frame(3, {"type": "log", "line": "3 user@host", "step": 1, "stream": "stdout"}),
        _frame(4, {"type": "log", "line": f"@M 4 {stamp + 0.5:.6f}"}) + _frame(5, done),
    )


def _cut(stream: bytes, cut: int) -> list[bytes]:
    if cut == 0:  # a byte at a time
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted({min(cut, len(stream)), min(cut * 3 + 1, len(stream))})
    return [p for p in (stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)) if p]


def _feed(pieces: list[bytes], *, idle: bool = False, at: float = 1001.0) -> CheapStream:
    stream = CheapStream(idle=idle)
    for piece in pieces:
        stream.feed(piece, at)
    return stream


@pytest.mark.parametrize("cut", range(0, 600, 7))
def test_counts_frames_ids_and_markers_wherever_reads_cut_the_stream(cut: int) -> None:
    stream = _feed(_cut(_stream(1000.0), cut))
    tally = stream.tally
    assert stream.opened and stream.ended
    assert (tally.status, tally.frames, tally.last_id, tally.markers, tally.last_marker) == (200, 5, 5, 2, 4)
    assert (tally.first_stamp, tally.last_stamp, tally.lags_ms) == (1000.0, 1000.5, [1000.0, 500.0])
    assert json.loads(tally.terminal)["status"] == "succeeded"
    assert tally.error == ""


def test_a_stream_cut_inside_a_frame_is_an_error() -> None:
    data = _stream(1000.0)
    stream = _feed([data[: data.index(b"id: 3") + 8]])
    stream.lost("EOF", 1002.0)
    assert stream.ended and stream.tally.frames == 2 and stream.tally.last_id == 2
    assert stream.tally.error == "connection lost after id 2 (EOF)"


def test_a_marker_in_a_read_with_later_writes_is_counted_inexact() -> None:
    data = _stream(1000.0)
    cut = data.index(b"\r\n", data.index(b"ping")) + 10  # after the chunk with marker 2, into the next
    stream = _feed([data[:cut], data[cut:]])
    assert (stream.tally.markers, stream.tally.inexact) == (2, 1)


def test_markers_out_of_order_are_an_error() -> None:
    body = _frame(1, {"type": "log", "line": "@M 9 1.000000"}) + _frame(2, {"type": "log", "line": "@M 3 2.000000"})
    stream = _feed([HEAD + b"%x\r\n%s\r\n" % (len(body), body)])
    assert stream.tally.markers == 2
    assert stream.tally.error == "marker of line 3 after that of line 9"


def test_an_idle_follower_takes_only_the_headers() -> None:
    stream = _feed([_stream(1.0)], idle=True)
    assert stream.opened and not stream.ended
    assert stream.tally.status == 200 and stream.tally.frames == 0


def test_an_error_status_ends_the_stream() -> None:
    stream = _feed([b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}"])
    assert stream.ended and stream.tally.status == 429 and stream.tally.error == "HTTP 429"


def test_without_chunking_the_body_ends_with_the_connection() -> None:
    body = _frame(1, {"type": "log", "line": "1"}) + _frame(2, {"type": "done", "status": "succeeded"})
    stream = _feed([b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + body])
    stream.lost("EOF", 1002.0)
    assert (stream.tally.frames, stream.tally.last_id, stream.tally.error) == (2, 2, "")
    assert json.loads(stream.tally.terminal)["type"] == "done"


@pytest.mark.parametrize("repeat", [1, 1000])  # both ways of counting: short and long buffers
def test_id_frames_leave_out_retry_and_comment_frames(repeat: int) -> None:
    frames = _frame(1, {"type": "log", "line": "a"}) + b": ping\n\n" + _frame(2, {"type": "log"})
    data = b"retry: 3000\n\n" + frames * repeat
    assert id_frames(data, len(data)) == 2 * repeat
    assert id_frames(data, data.index(b": ping")) == 1
