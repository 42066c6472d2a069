"""The SSE decoder against the WHATWG event-stream interpretation rules, whatever the chunking."""

from __future__ import annotations

import json

import pytest

from builder.client.sse import ServerSentEvent, SSEDecoder

pytestmark = pytest.mark.unit


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def tuples(*chunks: bytes) -> list[tuple[object, ...]]:
    return [tuple(event) for event in decode(*chunks)]


def data(*chunks: bytes) -> list[str]:
    return [event.data for event in decode(*chunks)]


# --- the spec's own examples -------------------------------------------------------


def test_spec_example_multi_line_data_is_one_event() -> None:
    assert data(b"data: YHOO\ndata: +2\ndata: 10\n\n") == ["YHOO\n+2\n10"]


def test_spec_example_ids_comments_and_an_unterminated_last_block() -> None:
    events = decode(b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n")
    assert [(e.data, e.id) for e in events] == [("first event", "1"), ("second event", "")]


def test_spec_example_empty_data_lines() -> None:
    # "data" alone is a field with an empty value: the first block is "", the second "\n";
    # the last ends the stream without its blank line, so it never fires.
    assert data(b"data\n\ndata\ndata\n\ndata:") == ["", "\n"]


def test_spec_example_one_leading_space_is_removed() -> None:
    assert data(b"data:test\n\ndata: test\n\n") == ["test", "test"]


def test_spec_example_event_types() -> None:
    events = decode(b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n")
    assert [(e.event, e.data) for e in events] == [("add", "73857293"), ("remove", "2153"), ("add", "113411")]


# --- the defects of the previous decoder --------------------------------------------


def test_cr_only_line_endings_dispatch() -> None:
    events = decode(b"id: 1\rdata: a\r\rid: 2\rdata: b\r\r")
    assert [(e.id, e.data) for e in events] == [("1", "a"), ("2", "b")]


def test_crlf_chunk_then_lf_chunk_keeps_the_first_event() -> None:
    assert data(b"data: a\r\n", b"\ndata: b\n\n") == ["a", "b"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x85"])
def test_only_cr_and_lf_break_lines(char: str) -> None:
    text = f"data: a{char}b\r\n\r\ndata: c{char}d\n\n"
    assert data(text.encode()) == [f"a{char}b", f"c{char}d"]


def test_leading_bom_is_dropped_even_split_across_chunks() -> None:
    assert data(b"\xef\xbb\xbfdata: a\n\n") == ["a"]
    assert data(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == ["a"]


# --- the rest of the rules ----------------------------------------------------------


def test_only_the_first_bom_is_dropped() -> None:
    # The second one is part of the field name "\ufeffdata", which is no field.
    assert data(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == ["b"]


def test_a_bom_after_the_start_is_not_dropped() -> None:
    assert data(b"data: a\n\n", b"\xef\xbb\xbfdata: b\n\ndata: c\n\n") == ["a", "c"]


def test_retry_takes_ascii_digits_only() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: 1500\n\n") == []
    assert decoder.retry == 1500
    for bad in ("retry: 10a", "retry: \u0661\u0660", "retry: \u00b2", "retry:", "retry: -5", "retry: 1.5"):
        decoder.feed(f"{bad}\n\n".encode())
        assert decoder.retry == 1500, bad
    [event] = decoder.feed(b"data: x\n\n")
    assert event.retry == 1500


def test_id_with_nul_is_ignored() -> None:
    events = decode(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [(e.id, e.data) for e in events] == [("1", "a"), ("1", "b")]


def test_last_event_id_persists_and_id_alone_updates_it() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 7\ndata: a\n\ndata: b\n\nid: 9\n\n")
    assert [(e.id, e.data) for e in events] == [("7", "a"), ("7", "b")]
    assert decoder.last_event_id == "9"  # set by a frame that dispatched nothing
    assert decoder.feed(b"data: c\n\n")[0].id == "9"


def test_frame_without_data_is_not_dispatched_and_resets_the_event_type() -> None:
    events = decode(b"event: add\n\nid: 3\n\ndata: x\n\n")
    assert [(e.event, e.id, e.data) for e in events] == [("message", "3", "x")]


def test_trailing_frame_without_blank_line_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: a\n\ndata: b\n")] == ["a"]
    assert decoder.incomplete
    assert [e.data for e in decoder.feed(b"\n")] == ["b"]
    assert not decoder.incomplete


def test_field_without_colon_has_an_empty_value() -> None:
    events = decode(b"id: 4\ndata: a\n\nid\ndata\n\n")
    assert [(e.id, e.data) for e in events] == [("4", "a"), ("", "")]


def test_only_one_leading_space_is_removed() -> None:
    assert data(b"data:  two\ndata:\tx\ndata: \n\n") == [" two\n\tx\n"]


def test_value_keeps_colons_after_the_first() -> None:
    events = decode(b"event: a:b\ndata: http://x:1\n\n")
    assert [(e.event, e.data) for e in events] == [("a:b", "http://x:1")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    [event] = decode(b": ping\nfoo: bar\nDATA: no\ndata: yes\n: more\n\n")
    assert (event.data, event.fields) == ("yes", ("foo", "DATA", "data"))


def test_fields_name_what_the_frame_held() -> None:
    events = decode(b"retry: 1000\n\nid: 1\ndata: a\n\nid: 2\ndata: b\ndata: c\n\n")
    assert [e.fields for e in events] == [("id", "data"), ("id", "data", "data")]


def test_invalid_utf8_is_replaced() -> None:
    assert data(b"data: a\xffb\n\n") == ["a\ufffdb"]


def test_long_frame_fed_in_small_chunks() -> None:
    stream = b"".join(b"data: line %d\n" % i for i in range(2000)) + b"\nid: 5\ndata: after\n\n"
    events = decode(*(stream[i : i + 100] for i in range(0, len(stream), 100)))
    assert [e.data for e in events] == ["\n".join(f"line {i}" for i in range(2000)), "after"]


# --- chunk boundaries -----------------------------------------------------------------

SAMPLE = (
    "\ufeffretry: 1000\n\n"
    ": a comment\r\n"
    'id: 1\ndata: {"type":"log","line":"plain"}\n\n'
    "id: 2\r\ndata: first\r\ndata: second \u00e9\u20ac\U0001f600\r\n\r\n"
    "event: custom\rid: 3\rdata: cr only\r\r"
    "data\n\n"
    ": ping\n\n"
    "id: 4\ndata: one\ndata:two\n\n"
    "id: 5\x00\rretry: 250\r\ndata: \u2028kept\n\r\n"
    "id\ndata: reset id\n\n"
    "id: 6\ndata: fast\n\n"
    "data: never dispatched\n"
).encode()

# (data, id, event type, retry, fields) of each event.
EXPECTED = [
    ('{"type":"log","line":"plain"}', "1", "message", 1000, ("id", "data")),
    ("first\nsecond \u00e9\u20ac\U0001f600", "2", "message", 1000, ("id", "data", "data")),
    ("cr only", "3", "custom", 1000, ("event", "id", "data")),
    ("", "3", "message", 1000, ("data",)),
    ("one\ntwo", "4", "message", 1000, ("id", "data", "data")),
    ("\u2028kept", "4", "message", 250, ("id", "retry", "data")),
    ("reset id", "", "message", 250, ("id", "data")),
    ("fast", "6", "message", 250, ("id", "data")),
]


def test_sample_stream_in_one_chunk() -> None:
    assert tuples(SAMPLE) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(SAMPLE)))
def test_sample_stream_cut_at_every_byte(cut: int) -> None:
    assert tuples(SAMPLE[:cut], SAMPLE[cut:]) == EXPECTED


def test_sample_stream_byte_by_byte() -> None:
    assert tuples(*(SAMPLE[i : i + 1] for i in range(len(SAMPLE)))) == EXPECTED


def test_sample_stream_cut_at_every_pair_of_bytes() -> None:
    for first in range(1, len(SAMPLE)):
        for second in range(first, len(SAMPLE)):
            events = tuples(SAMPLE[:first], SAMPLE[first:second], SAMPLE[second:])
            assert events == EXPECTED, (first, second)


def test_our_frames_on_the_fast_path_match_the_general_path() -> None:
    payloads = [json.dumps({"type": "log", "line": f"line {i}"}) for i in range(1, 50)]
    lf = "".join(f"id: {i}\ndata: {p}\n\n" for i, p in enumerate(payloads, 1)).encode()
    crlf = lf.replace(b"\n", b"\r\n")
    assert decode(lf) == decode(crlf) == [ServerSentEvent(p, str(i)) for i, p in enumerate(payloads, 1)]


# --- our frames, one event or a batch -----------------------------------------------


def test_a_batch_frame_decodes_to_typed_events_made_when_looked_at() -> None:
    from builder.client import DoneEvent, EventBatch, LogEvent, StatusEvent
    from builder.client.models import BuildEvent, decode_frame

    payloads = [
        {"type": "status", "status": "running"},
        {"type": "log", "line": "a", "step": 5},
        {"type": "log", "line": "b"},
        {"type": "something new", "x": 1},
        {"type": "done", "done": True, "status": "succeeded", "image_ref": "x:1", "image_id": None},
    ]
    batch = decode_frame(14, f"10 {json.dumps(payloads)}")
    assert (batch.first_id, batch.last_id, len(batch)) == (10, 14, 5)
    assert batch.payloads == payloads
    assert [type(e) for e in batch] == [StatusEvent, LogEvent, LogEvent, BuildEvent, DoneEvent]
    assert [e.id for e in batch] == [10, 11, 12, 13, 14]
    assert batch[1] == LogEvent(11, payloads[1]) and batch[-1] == DoneEvent(14, payloads[4])
    assert batch[-1].terminal and isinstance(batch[-1], DoneEvent) and batch[-1].image_ref == "x:1"
    # Slices are batches of their own ids; a batch equals any sequence of the same events.
    assert batch[1:3] == EventBatch(11, payloads[1:3]) == [LogEvent(11, payloads[1]), LogEvent(12, payloads[2])]
    assert batch[:-1].last_id == 13 and batch[5:] == [] and not batch[5:]
    with pytest.raises(IndexError):
        batch[5]
    with pytest.raises(ValueError, match="step 1"):
        batch[::2]
    single = decode_frame(7, '{"type":"log","line":"x"}')
    assert list(single) == [LogEvent(7, {"type": "log", "line": "x"})]


@pytest.mark.parametrize(
    ("frame_id", "data"),
    [
        (3, '1 [{"type":"log","line":"a"}]'),
        (1, '1 [{"type":"log"}, 2]'),
        (1, "1 []"),
        (1, "1 {}"),
        (1, "[1]"),
        (1, "{x"),
    ],
    ids=["ids-do-not-add-up", "not-an-object", "empty", "not-a-list", "not-an-event", "broken-json"],
)
def test_a_malformed_frame_is_a_value_error(frame_id: int, data: str) -> None:
    from builder.client.models import decode_frame

    with pytest.raises(ValueError):
        decode_frame(frame_id, data)
