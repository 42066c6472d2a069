"""The SDK's retries, closing and compression choice, against small real HTTP servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer

from builder.client import (
    BuilderClient,
    BuilderConnectionError,
    BuilderError,
    BuilderHTTPError,
    ClientClosedError,
    DoneEvent,
    LogEvent,
    RetryPolicy,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Delays of 10 to 20 ms between attempts.
FAST = {"first": 0.02, "cap": 0.02}


async def serve(aiohttp_server: Any, routes: dict[str, Handler]) -> TestServer:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    return await aiohttp_server(app)


async def running(request: web.Request) -> web.Response:
    return web.json_response({"build_id": request.match_info["id"], "status": "running"})


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


async def drop(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()  # no answer at all: the client sees the connection die
    return web.Response()


def frame(event_id: int, payload: dict[str, Any]) -> bytes:
    return f"id: {event_id}\ndata: {json.dumps(payload)}\n\n".encode()


async def sse(request: web.Request, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n" + body)
    return response


def test_delay_is_capped_after_any_number_of_attempts() -> None:
    policy = RetryPolicy(first=0.1, cap=3.0)
    for attempt in (0, 5, 1_020, 5_000, 10**9):
        assert 0.05 <= policy.delay(attempt) <= 3.0
    assert policy.delay(10**9, retry_after=2.5) == 2.5


async def test_log_endpoint_failing_for_good_is_given_up_although_the_status_answers(aiohttp_server: Any) -> None:
    hits = {"logs": 0}

    async def logs(request: web.Request) -> web.Response:
        hits["logs"] += 1
        return error(500, "internal_error", "the log store is broken")

    server = await serve(aiohttp_server, {"/builds/{id}/logs": logs, "/builds/{id}": running})
    async with BuilderClient(str(server.make_url("/")), retry=RetryPolicy(**FAST, budget=0.3)) as sdk:
        with pytest.raises(BuilderHTTPError) as raised:
            async with asyncio.timeout(20):  # only catches the hang of retrying forever
                async for _ in sdk.logs("b1"):
                    pass
    assert (raised.value.status, raised.value.code, raised.value.message) == (
        500,
        "internal_error",
        "the log store is broken",
    )
    assert any("gave up on the log of build b1" in note for note in raised.value.__notes__)
    assert hits["logs"] > 1


async def test_any_mix_of_failures_fills_the_budget(aiohttp_server: Any) -> None:
    answers = itertools.cycle(
        [
            (404, "build_not_found", "no such build"),
            (503, "unavailable", "busy"),
            None,
            (502, "bad_gateway", "upstream"),
        ]
    )

    async def logs(request: web.Request) -> web.Response:
        answer = next(answers)
        return error(*answer) if answer is not None else await drop(request)

    server = await serve(aiohttp_server, {"/builds/{id}/logs": logs, "/builds/{id}": running})
    async with BuilderClient(str(server.make_url("/")), retry=RetryPolicy(**FAST, budget=0.3)) as sdk:
        with pytest.raises((BuilderHTTPError, BuilderConnectionError)) as raised:
            async with asyncio.timeout(20):
                async for _ in sdk.logs("b1"):
                    pass
    assert any("gave up" in note for note in raised.value.__notes__)


async def test_events_delivered_reset_the_failure_clock(aiohttp_server: Any) -> None:
    rounds, failures_per_round, budget = 40, 2, 0.3
    attempts = {"n": 0}

    async def logs(request: web.Request) -> web.StreamResponse:
        # Per round: two 500s, then a stream that delivers one more event and ends.
        attempts["n"] += 1
        done, position = divmod(attempts["n"] - 1, failures_per_round + 1)
        if position < failures_per_round:
            return error(500, "internal_error", "flaky")
        last = int(request.headers.get("Last-Event-ID", "0"))
        assert last == done
        if last + 1 == rounds:
            return await sse(request, frame(rounds, {"type": "done", "status": "succeeded", "image_ref": "x:1"}))
        return await sse(request, frame(last + 1, {"type": "log", "line": f"line {last + 1}"}))

    server = await serve(aiohttp_server, {"/builds/{id}/logs": logs, "/builds/{id}": running})
    async with BuilderClient(str(server.make_url("/")), retry=RetryPolicy(**FAST, budget=budget)) as sdk:
        async with asyncio.timeout(60):
            events = [event async for event in sdk.logs("b1")]
    assert [e.line for e in events if isinstance(e, LogEvent)] == [f"line {i}" for i in range(1, rounds)]
    assert isinstance(events[-1], DoneEvent)
    # The failures slept at least 10 ms each, together far longer than the budget:
    # only the reset at each delivered event kept the client going.
    assert rounds * failures_per_round * FAST["first"] / 2 > 2 * budget


async def test_a_batch_frame_overlapping_what_came_gives_only_the_new_events(aiohttp_server: Any) -> None:
    lines = [{"type": "log", "line": f"line {n}"} for n in range(1, 6)]

    def batch(first: int, payloads: list[dict[str, Any]]) -> bytes:
        return f"id: {first + len(payloads) - 1}\ndata: {first} {json.dumps(payloads)}\n\n".encode()

    async def logs(request: web.Request) -> web.StreamResponse:
        if "Last-Event-ID" not in request.headers:
            return await sse(request, batch(1, lines[:3]))  # then the stream ends early
        # A replica that replays from an older place: ids 2..5, then the terminal frame.
        assert request.headers["Last-Event-ID"] == "3"
        done = {"type": "done", "status": "succeeded", "image_ref": "x:1"}
        return await sse(request, batch(2, lines[1:]) + frame(6, done))

    server = await serve(aiohttp_server, {"/builds/{id}/logs": logs, "/builds/{id}": running})
    async with BuilderClient(str(server.make_url("/")), retry=RetryPolicy(**FAST)) as client:
        seen = [event async for event in client.logs("b1")]
    assert [event.id for event in seen] == [1, 2, 3, 4, 5, 6]
    assert [event.line for event in seen if isinstance(event, LogEvent)] == [p["line"] for p in lines]
    assert isinstance(seen[-1], DoneEvent)


async def test_ids_that_skip_within_a_read_start_a_new_batch(aiohttp_server: Any) -> None:
    # After a daemon crash, ids skip past what followers may have been shown.
    lines = [{"type": "log", "line": f"line {n}"} for n in range(1, 6)]
    done = {"type": "done", "status": "succeeded", "image_ref": "x:1"}

    async def logs(request: web.Request) -> web.StreamResponse:
        body = f"id: 2\ndata: 1 {json.dumps(lines[:2])}\n\nid: 13\ndata: 11 {json.dumps(lines[2:])}\n\n"
        return await sse(request, body.encode() + frame(14, done))

    server = await serve(aiohttp_server, {"/builds/{id}/logs": logs, "/builds/{id}": running})
    async with BuilderClient(str(server.make_url("/")), retry=RetryPolicy(**FAST)) as client:
        batches = [batch async for batch in client.log_batches("b1")]
    # A batch's ids are consecutive: the one read holding both sides of the gap gave two.
    assert (batches[0].first_id, batches[0].last_id) == (1, 2) and batches[1].first_id == 11
    assert [event.id for batch in batches for event in batch] == [1, 2, 11, 12, 13, 14]
    assert isinstance(batches[-1][-1], DoneEvent)


async def test_requests_after_close_raise(aiohttp_server: Any) -> None:
    server = await serve(aiohttp_server, {"/builds/{id}": running})
    sdk = BuilderClient(str(server.make_url("/")))
    assert (await sdk.status("b1"))["status"] == "running"
    await sdk.close()
    assert sdk.is_closed
    for request in (sdk.status("b1"), sdk.list(), sdk.cancel("b1"), sdk.logs("b1").__anext__()):
        with pytest.raises(ClientClosedError, match="client has been closed"):
            await request
    assert issubclass(ClientClosedError, RuntimeError) and issubclass(ClientClosedError, BuilderError)


async def test_close_leaves_an_injected_session_open_but_the_client_unusable(aiohttp_server: Any) -> None:
    server = await serve(aiohttp_server, {"/builds/{id}": running})
    async with aiohttp.ClientSession() as session:
        async with BuilderClient(str(server.make_url("/")), session=session, token="t0k") as sdk:
            assert (await sdk.status("b1"))["status"] == "running"
        assert not session.closed
        with pytest.raises(ClientClosedError):
            await sdk.status("b1")


async def test_redirects_are_not_followed_but_named(aiohttp_server: Any, tmp_path: Path) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(f"https://elsewhere.example{request.path}")

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    server = await serve(aiohttp_server, {"/{tail:.*}": moved})
    async with BuilderClient(str(server.make_url("/"))) as sdk:
        for request in (sdk.status("b1"), sdk.submit(tmp_path, image_name="x"), sdk.logs("b1").__anext__()):
            with pytest.raises(BuilderHTTPError) as raised:
                await request
            assert (raised.value.status, raised.value.code) == (308, "redirect")
            assert "https://elsewhere.example/builds" in raised.value.message


# --- context compression --------------------------------------------------------


class RecordingDaemon:
    """Answers /healthz (advertising what it is told) and POST /builds, keeping each context part."""

    def __init__(self, encodings: str | None) -> None:
        self.encodings = encodings
        self.healthz_hits = 0
        self.uploads: list[tuple[str, str, bytes]] = []  # content type, file name, bytes
        self.authorization: list[str | None] = []

    async def healthz(self, request: web.Request) -> web.Response:
        self.healthz_hits += 1
        headers = {"X-Builder-Context-Encodings": self.encodings} if self.encodings is not None else {}
        return web.json_response({"status": "ok"}, headers=headers)

    async def builds(self, request: web.Request) -> web.Response:
        # The SDK's shape: the context as the raw body, the fields in the query.
        self.authorization.append(request.headers.get("Authorization"))
        self.uploads.append((request.headers["Content-Type"], dict(request.query), await request.read()))
        return web.json_response({"build_id": f"b{len(self.uploads)}"}, status=202)


def tar_members(compressed: bytes) -> list[str]:
    data = compressed
    if compressed.startswith(b"\x28\xb5\x2f\xfd"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "app.txt").write_text("app\n" * 1000)
    return tmp_path


@pytest.mark.parametrize(
    ("advertised", "compress", "content_type"),
    [
        ("zstd, gzip, bzip2, xz, identity", "auto", "application/zstd"),
        ("gzip, identity", "auto", "application/gzip"),
        (None, "auto", "application/gzip"),  # a daemon from before the header
        (None, "zstd", "application/zstd"),
        ("zstd", "gzip", "application/gzip"),
        ("zstd", "none", "application/x-tar"),
    ],
)
async def test_compression_follows_the_option_and_what_the_daemon_advertises(
    aiohttp_server: Any, context_dir: Path, advertised: str | None, compress: Any, content_type: str
) -> None:
    daemon = RecordingDaemon(advertised)
    server = await serve(aiohttp_server, {"/healthz": daemon.healthz, "/builds": daemon.builds})
    async with BuilderClient(str(server.make_url("/")), token="t0k") as sdk:
        for _ in range(2):
            await sdk.submit(context_dir, image_name="x", compress=compress)
    assert [(t, q) for t, q, _ in daemon.uploads] == [
        (content_type, {"image_name": "x", "dockerfile": "Dockerfile"})
    ] * 2
    assert tar_members(daemon.uploads[0][2]) == ["Dockerfile", "app.txt"]
    assert daemon.healthz_hits == (1 if compress == "auto" else 0)  # asked once per client
    assert daemon.authorization == ["Bearer t0k"] * 2


async def test_unknown_compress_option_is_refused_before_any_request(context_dir: Path) -> None:
    async with BuilderClient("http://127.0.0.1:9") as sdk:
        with pytest.raises(ValueError, match="compress"):
            await sdk.submit(context_dir, image_name="x", compress="brotli")  # type: ignore[arg-type]
