"""Unit tests for the pure parsing code: image references, request fields, engine output, event log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from builder.server.engines.base import EngineFailure, ImageBuilt
from builder.server.engines.legacy import BuildOutputParser, LinePiece, StepContainer, StepLayer
from builder.server.errors import InvalidField, InvalidImageReference
from builder.server.events import BACKLOG_LIMIT, SHARED_RUNS, EventLog
from builder.server.hosts import is_loopback
from builder.server.imageref import parse_image_name, validate_reference
from builder.server.models import BuildSpec, Shape, normalise_context_path
from builder.server.records import EventRun
from builder.server.turnstile import GROUP, Turnstile


def ids(run: EventRun | None) -> list[int]:
    assert run is not None
    return list(range(run.first_id, run.last_id + 1))


pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "ref",
    [
        "busybox",
        "busybox:1.36",
        "library/busybox:latest",
        "localhost:5000/team/app:v1.2-rc_3",
        "registry.example.com/a/b/c",
        "[::1]:5000/app",
        "app@sha256:" + "a" * 64,
        "app:tag@sha256:" + "b" * 64,
    ],
)
def test_valid_references(ref: str) -> None:
    assert validate_reference(ref) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "Busybox",
        "busybox\n",
        "busybox\nRUN x",
        "-x",
        "a b",
        "app:",
        "app:-tag",
        "app@sha256:short",
        "/app",
        "app//x",
        "a" * 300,
    ],
)
def test_invalid_references(ref: str) -> None:
    with pytest.raises(InvalidImageReference):
        validate_reference(ref)


def test_image_name_tag_defaults_to_latest() -> None:
    assert parse_image_name("team/app") == ("team/app", "latest")
    assert parse_image_name("team/app:v2") == ("team/app", "v2")
    with pytest.raises(InvalidField):
        parse_image_name("app@sha256:" + "a" * 64)


def test_build_spec_from_multipart_strings() -> None:
    spec = BuildSpec.from_fields(
        {
            "image_name": "app",
            "dockerfile": "./ci//Dockerfile",
            "build_args": '{"A": "1"}',
            "labels": "",
            "no_cache": "true",
            "pull": "0",
            "nydus_convert": "false",
            "target": "final",
            "cache_key": "k",
        },
        Shape.MULTIPART,
    )
    assert spec == BuildSpec(
        image_name="app:latest",
        dockerfile="ci/Dockerfile",
        build_args={"A": "1"},
        target="final",
        no_cache=True,
        cache_key="k",
    )
    assert BuildSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_build_spec_from_json_values() -> None:
    spec = BuildSpec.from_fields({"image": "busybox", "no_cache": True, "build_args": {"X": "y"}}, Shape.JSON)
    assert spec.base_image == "busybox" and spec.no_cache and spec.build_args == {"X": "y"}
    with pytest.raises(InvalidField):
        BuildSpec.from_fields({"image": "busybox", "no_cache": 1}, Shape.JSON)


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", ".", ""])
def test_context_paths_must_stay_inside(path: str) -> None:
    with pytest.raises(InvalidField):
        normalise_context_path(path, "dockerfile")


def _feed(parser: BuildOutputParser, *chunks: dict) -> list:
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events + parser.finish()


def test_stream_chunks_are_split_into_lines_across_chunk_boundaries() -> None:
    events = _feed(BuildOutputParser(), {"stream": "one\ntw"}, {"stream": "o\nthr"}, {"stream": "ee"})
    assert events == ["one", "two", "three"]


def test_step_containers_images_and_cache_hits() -> None:
    events = _feed(
        BuildOutputParser(),
        {"stream": "Step 1/3 : FROM base\n"},
        {"stream": " ---> 111111111111\n"},
        {"stream": "Step 2/3 : RUN make\n ---> Running in abcdefabcdef\n"},
        {"stream": "Removing intermediate container abcdefabcdef\n ---> 222222222222\n"},
        {"stream": "Step 3/3 : COPY . .\n ---> Using cache\n ---> 333333333333\n"},
        {"aux": {"ID": "sha256:" + "3" * 64}},
        {"stream": "Successfully built 333333333333\n"},
    )
    typed = [e for e in events if not isinstance(e, str)]
    assert typed == [
        StepLayer("111111111111", new=False),
        StepContainer("abcdefabcdef", "RUN make"),
        StepLayer("222222222222", new=True),
        StepLayer("333333333333", new=False),
        ImageBuilt("sha256:" + "3" * 64),
    ]


def test_in_band_error_flushes_partial_line_then_fails() -> None:
    events = _feed(
        BuildOutputParser(),
        {"stream": "half a line"},
        {"errorDetail": {"code": 3, "message": "The command returned a non-zero code: 3"}, "error": "ignored"},
    )
    assert events == ["half a line", EngineFailure("The command returned a non-zero code: 3")]


def test_only_the_engines_aux_message_names_the_image_never_a_printed_line() -> None:
    events = _feed(BuildOutputParser(), {"stream": "Successfully built 0123456789ab\n"})
    assert events == ["Successfully built 0123456789ab"]


def test_event_log_numbers_from_one_and_escapes_control_text() -> None:
    log = EventLog("b")
    first = log.append({"type": "log", "line": '{"done": true}\n\u2028'})
    assert first.id == 1 and not first.terminal
    assert "\n" not in first.data and json.loads(first.data)["line"] == '{"done": true}\n\u2028'
    last = log.append({"type": "done", "done": True, "status": "succeeded"})
    assert last.id == 2 and last.terminal and log.terminated
    with pytest.raises(RuntimeError):
        log.append({"type": "log", "line": "late"})


async def test_event_log_window_keeps_uncommitted_events_and_says_when_to_read_the_store() -> None:
    log = EventLog("b", window=4)
    log.extend_data([f'{{"type":"log","line":"{n}"}}' for n in range(1, 21)])
    # Nothing is committed yet: nothing may leave memory.
    assert ids(log.events_after(0, 100)) == list(range(1, 21))
    assert ids(log.uncommitted()) == list(range(1, 21))
    assert json.loads(log.uncommitted().datas[4]) == {"type": "log", "line": "5"}
    log.committed(18)
    assert ids(log.uncommitted()) == [19, 20]
    assert log.first_id <= 19 and log.events_after(0, 100) is None
    assert ids(log.events_after(18, 100)) == [19, 20]
    assert log.events_after(20, 100) == EventRun(21, [])
    assert ids(log.events_after(18, 1)) == [19]


def test_followers_at_the_same_place_share_one_run_of_events() -> None:
    log = EventLog("b")
    log.extend_data([f'{{"type":"log","line":"{n}"}}' for n in range(1, 11)])
    first = log.events_after(2, 100)
    assert first is not None and ids(first) == list(range(3, 11))
    # A second follower there holds the same list, not a copy of its own.
    assert log.events_after(2, 100) is first
    log.extend_data(['{"type":"log","line":"11"}'])
    assert ids(log.events_after(2, 100)) == list(range(3, 12))  # more has come: a new run
    for after in range(SHARED_RUNS + 1):
        log.events_after(after, 100)
    assert log.events_after(SHARED_RUNS, 100) is log.events_after(SHARED_RUNS, 100)
    assert len(log._runs) == SHARED_RUNS


async def test_event_log_of_a_build_elsewhere_keeps_the_store_ids_and_restarts_after_a_gap() -> None:
    log = EventLog("b", last_id=10, window=100)
    waiter = asyncio.create_task(log.wait_for_events(10))
    log.extend_committed(EventRun(11, [f'{{"type":"log","line":"{n}"}}' for n in (11, 12)]))
    await asyncio.wait_for(waiter, 1)
    assert ids(log.events_after(10, 100)) == [11, 12] and log.fully_committed is False
    # A lost replica's terminal frame comes after the ids its followers may have been shown.
    log.extend_committed(EventRun(12 + 65537, ['{"type":"error","status":"failed","error":"replica r1 lost"}']))
    assert log.first_id == 12 + 65537 and log.events_after(12, 100) is None
    assert ids(log.events_after(12 + 65536, 100)) == [12 + 65537]
    assert log.terminated and log.complete and log.fully_committed


async def test_waiting_follower_wakes_on_new_events() -> None:
    log = EventLog("b")
    waiter = asyncio.create_task(log.wait_for_events(0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    log.append({"type": "log", "line": "x"})
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(log.wait_for_events(0), 1)  # already there: no wait


async def test_many_waiting_followers_are_woken_a_group_per_turn_of_the_loop() -> None:
    log = EventLog("b")
    woken: list[int] = []

    async def follower(n: int) -> None:
        await log.wait_for_events(0)
        woken.append(n)

    followers = [asyncio.create_task(follower(n)) for n in range(GROUP * 3 + 1)]
    await asyncio.sleep(0)
    gone = followers.pop()  # one hangs up while it waits: nothing of it stays behind
    gone.cancel()
    await asyncio.sleep(0)
    log.append({"type": "log", "line": "x"})
    turns = 0
    while len(woken) < len(followers):
        await asyncio.sleep(0)
        turns += 1
        assert len(woken) <= GROUP * turns
    assert turns >= 3 and sorted(woken) == list(range(len(followers)))


async def test_a_turnstile_lets_a_group_through_per_turn_and_forgets_who_left() -> None:
    turnstile = Turnstile(group=2)
    passed: list[int] = []

    async def waiter(n: int) -> None:
        await turnstile.wait()
        passed.append(n)

    waiters = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0)  # all waiting
    waiters[4].cancel()
    await asyncio.sleep(0)
    turnstile.let_through()
    counts = [0]
    while len(passed) < 4:
        await asyncio.sleep(0)
        assert len(passed) - counts[-1] <= 2  # a group per turn at most
        counts.append(len(passed))
    assert 2 in counts and passed == [0, 1, 2, 3]
    # Who waits after a let_through waits for the next one.
    late = asyncio.create_task(turnstile.wait())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not late.done()
    turnstile.let_through()
    await asyncio.wait_for(late, 1)
    assert not turnstile._waiting and not turnstile._passing


async def test_the_engine_reader_waits_while_too_much_waits_for_the_store() -> None:
    log = EventLog("b")
    log.extend_data(['{"type":"log","line":"x"}'] * (BACKLOG_LIMIT + 10))
    reader = asyncio.create_task(log.wait_for_store())
    await asyncio.sleep(0.01)
    assert not reader.done()
    log.committed(5)  # still over the limit
    await asyncio.sleep(0.01)
    assert not reader.done()
    log.committed(10)
    await asyncio.wait_for(reader, 1)
    # A build being stopped is never held up by a store that cannot write.
    log.extend_data(['{"type":"log","line":"x"}'] * 100)
    reader = asyncio.create_task(log.wait_for_store())
    await asyncio.sleep(0.01)
    assert not reader.done()
    log.stop_waiting()
    await asyncio.wait_for(reader, 1)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("localhost", True),
        ("localhost:80", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.1:5000", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_long_legacy_line_goes_out_in_pieces_that_join_back() -> None:
    parser = BuildOutputParser(max_line=10)
    events = _feed(parser, {"stream": "a" * 25}, {"stream": "b" * 3 + "\nshort\n" + "c" * 12 + "\n"})
    pieces = [(e.text, e.continued) for e in events if isinstance(e, LinePiece)]
    assert pieces == [("a" * 10, False), ("a" * 10, True), ("a" * 5 + "bbb", True), ("c" * 10, False), ("cc", True)]
    assert "short" in events


def test_a_legacy_line_in_many_chunks_is_joined_once() -> None:
    parser = BuildOutputParser()
    events = _feed(parser, *({"stream": "x" * 100} for _ in range(50)), {"stream": "\n"})
    assert events == ["x" * 5000]


async def test_a_data_dir_from_before_event_batches_keeps_its_logs(tmp_path: Path) -> None:
    import sqlite3

    from builder.server.store import SqliteBuildStore

    path = tmp_path / "builds.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE event_runs (build_id TEXT NOT NULL, first_id INTEGER NOT NULL, "
            "last_id INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (build_id, first_id)) WITHOUT ROWID"
        )
        old.execute(
            "INSERT INTO event_runs VALUES ('b1', 1, 2, ?)", ('{"type":"log","line":"a"}\n{"type":"log","line":"b"}',)
        )
    store = SqliteBuildStore(path)
    await store.open()
    try:
        assert [json.loads(data)["line"] for data in (await store.read_events("b1", after=0)).datas] == ["a", "b"]
        assert await store.last_event_id("b1") == 2
    finally:
        await store.close()


def test_event_rows_hold_a_thousand_events_or_a_mebibyte() -> None:
    from builder.server.store import _event_rows

    short = EventRun(1, [f'{{"type":"log","line":"{i}"}}' for i in range(1, 2501)])
    assert [(first, last) for _, first, last, _ in _event_rows([("b", short)])] == [
        (1, 1000),
        (1001, 2000),
        (2001, 2500),
    ]
    assert _event_rows([("b", EventRun(7, short.datas[:3]))]) == [("b", 7, 9, "\n".join(short.datas[:3]))]
    # Long lines: as many as fit in a row, and a line over the limit alone in its own.
    big, huge = "x" * (600 << 10), "y" * (3 << 20)
    long = EventRun(1, [big, big, "a", huge, "b"])
    assert [(first, last) for _, first, last, _ in _event_rows([("b", long)])] == [(1, 1), (2, 3), (4, 4), (5, 5)]
    assert [len(data) for *_, data in _event_rows([("b", long)])] == [len(big), len(big) + 2, len(huge), 1]


async def test_a_store_read_ends_where_ids_skip_and_the_next_goes_on_past_the_gap(tmp_path: Path) -> None:
    from builder.server.store import SqliteBuildStore

    store = SqliteBuildStore(tmp_path / "builds.sqlite3")
    await store.open()
    try:
        lines = [f'{{"type":"log","line":"{n}"}}' for n in range(13)]
        # Ids 4..9 were shown before a crash and never committed: the log goes on at 10.
        await store.append_events([("b", EventRun(1, lines[1:4])), ("b", EventRun(10, lines[10:13]))])
        assert await store.read_events("b", after=0) == EventRun(1, lines[1:4])
        assert await store.read_events("b", after=3) == EventRun(10, lines[10:13])
        assert await store.read_events("b", after=0, limit=2) == EventRun(1, lines[1:3])
        assert await store.read_events("b", after=1, upto=2) == EventRun(2, lines[2:3])
        assert await store.read_events("b", after=10, upto=11) == EventRun(11, lines[11:12])
        assert not await store.read_events("b", after=12)
        assert not await store.read_events("other", after=0)
    finally:
        await store.close()


def test_batched_frames_are_cut_every_few_kib_at_an_event_and_hold_every_event_once() -> None:
    from builder.client.models import decode_frame
    from builder.client.sse import SSEDecoder
    from builder.server.streams import BATCH_FRAME_BYTES, BatchedEventStreamResponse

    sizes = [1, 10, 100, 5000, 3, 4000, 90, 9000, 2, 2] + [70] * 200
    datas = [json.dumps({"type": "log", "line": "x" * size}, separators=(",", ":")) for size in sizes]
    rendered = BatchedEventStreamResponse.render(None, EventRun(41, datas))  # type: ignore[arg-type]
    frames = SSEDecoder().feed(rendered)
    decoded = [decode_frame(int(frame.id), frame.data) for frame in frames]
    assert [event.id for events in decoded for event in events] == list(range(41, 41 + len(datas)))
    assert [event.data["line"] for events in decoded for event in events] == ["x" * size for size in sizes]
    for events in decoded:
        # A frame ends with the event that takes it past the limit, and no sooner.
        sizes_in_frame = [len(datas[event.id - 41]) for event in events]
        assert sum(sizes_in_frame[:-1]) <= BATCH_FRAME_BYTES
    assert all(sum(len(datas[e.id - 41]) for e in events) > BATCH_FRAME_BYTES for events in decoded[:-1])


def test_followers_anywhere_in_a_block_send_slices_of_one_rendering_of_each_event() -> None:
    from builder.server.events import FOLLOW_BATCH
    from builder.server.streams import EventStreamResponse, LogStreamResponse, PlainLogResponse, StreamPinger

    rendered: list[int] = []

    class Counting(EventStreamResponse):
        def render_events(self, run: EventRun) -> list[str]:
            rendered.extend(range(run.first_id, run.last_id + 1))
            return super().render_events(run)

    stream = Counting(retry_ms=1000, pinger=StreamPinger(15))
    b = FOLLOW_BATCH  # a block
    datas = [json.dumps({"type": "log", "line": f"línea {i} ✓" if i % 7 == 0 else str(i)}) for i in range(1, 3 * b)]

    def run(first: int, last: int) -> EventRun:
        return EventRun(first, datas[first - 1 : last])

    def sent(stream: LogStreamResponse, first: int, last: int) -> bytes:
        source, start, end = stream.encoded("slices", run(first, last))
        return (source if isinstance(source, bytes) else source.data)[start:end]

    def expected(first: int, last: int) -> bytes:
        return "".join(f"id: {i}\ndata: {datas[i - 1]}\n\n" for i in range(first, last + 1)).encode()

    # Followers at different places in the first block while it grows, then past its start, then in the next.
    for first, last in [(1, 300), (120, 300), (301, 650), (1, 650), (200, b), (650, 700), (b + 1, b + 500)]:
        assert sent(stream, first, last) == expected(first, last)
    assert sorted(rendered) == list(range(1, b + 501))  # every event once
    # One that starts before what is kept renders its run afresh, and is right too.
    rendered.clear()
    assert sent(stream, b + 800, b + 900) == expected(b + 800, b + 900)
    assert sent(stream, b + 700, b + 850) == expected(b + 700, b + 850)
    assert sent(stream, b + 850, b + 900) == expected(b + 850, b + 900)
    assert rendered == [*range(b + 800, b + 901), *range(b + 700, b + 851), *range(b + 851, b + 901)]
    # Plain text keeps its own renderings of the same block.
    assert sent(PlainLogResponse(), 7, 8) == "línea 7 ✓\n8\n".encode()


def test_build_ids_never_start_with_a_dash_which_a_command_line_reads_as_an_option() -> None:
    from builder.server.service import new_build_id

    ids = [new_build_id() for _ in range(5000)]  # a leading "-" comes once in 64 from token_urlsafe
    assert not [build_id for build_id in ids if build_id.startswith("-")]
    assert len(set(ids)) == 5000 and all(len(build_id) == 22 for build_id in ids)


def test_rendered_bytes_are_kept_by_size_least_recently_used_first_out() -> None:
    from builder.server.streams import _Recent

    kept: _Recent[str, bytes] = _Recent(budget=100)
    kept.put("a", b"a" * 40, 40)
    kept.put("b", b"b" * 40, 40)
    assert kept.get("a") == b"a" * 40  # now the most recent
    kept.put("c", b"c" * 40, 40)  # 120 bytes: the least recently used goes
    assert (kept.get("a"), kept.get("b"), kept.get("c")) == (b"a" * 40, None, b"c" * 40)
    kept.put("a", b"A" * 90, 90)  # a grown value counts anew; only it fits
    assert (kept.get("a"), kept.get("c")) == (b"A" * 90, None)
    kept.put("big", b"x" * 500, 500)  # one value over the budget is still kept, alone
    assert (kept.get("big"), kept.get("a")) == (b"x" * 500, None)
    kept.clear()
    assert kept.get("big") is None


async def test_a_follower_replaying_the_store_while_the_window_moves_on_misses_nothing(tmp_path: Path) -> None:
    import contextlib

    from builder.protocol import BuildStatus
    from builder.server.cluster import LocalTail
    from builder.server.events import FOLLOW_BATCH, terminal_payload
    from builder.server.loghub import LogHub
    from builder.server.store import SqliteBuildStore

    store = SqliteBuildStore(tmp_path / "builds.sqlite3")
    await store.open()
    log = EventLog("b", window=10)

    async def logged(first: int, last: int) -> None:
        log.extend_data([f'{{"type":"log","line":"{n}"}}' for n in range(first, last + 1)])
        run = log.uncommitted()
        await store.append_events([("b", run)])
        log.committed(run.last_id)  # the window lets all but the last few go

    try:
        await logged(1, 3 * FOLLOW_BATCH)
        hub = LogHub(store, LocalTail(), live=lambda build_id: log, window=10, max_followers_per_tenant=10)
        seen: list[int] = []
        async with contextlib.aclosing(hub.follow("b", after=0, follow=True, namespace="")) as runs:
            async for run in runs:
                seen += range(run.first_id, run.last_id + 1)
                if run.last_id == FOLLOW_BATCH:  # mid-replay, the build goes on and the window with it
                    await logged(3 * FOLLOW_BATCH + 1, 6 * FOLLOW_BATCH)
                    log.append(terminal_payload(BuildStatus.SUCCEEDED, error=None, image_ref="x:1"))
                    await store.append_events([("b", log.uncommitted())])
                    log.committed(log.last_id)
        assert seen == list(range(1, 6 * FOLLOW_BATCH + 2))
        assert hub.lagged_followers == 2  # it went back to the store for what the window let go meanwhile
    finally:
        await store.close()
