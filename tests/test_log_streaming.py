"""Log streaming under faults: reconnects mid-frame, slow followers, abandoned streams, plain text, retention."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import socket
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from builder.client.models import BuildEvent, decode_frame
from builder.client.sse import SSEDecoder
from builder.server import streams
from builder.server.app import create_app
from builder.server.appkeys import SERVICE
from builder.server.config import Settings
from tests.conftest import (
    SSE,
    dockerfile,
    log_lines,
    metric_sample,
    our_frame,
    parse_sse,
    plain_output,
    read_log,
    submit,
    wait_for,
    wait_for_line,
)

# 20,000 numbered lines, paced (20 ms every 100 lines) so clients cut in while the build prints.
NUMBERED = dockerfile(
    'RUN i=0; while [ $i -lt 20000 ]; do i=$((i+1)); echo "line $i"; '
    "if [ $((i % 100)) -eq 0 ]; then sleep 0.02; fi; done"
)


@pytest.mark.parametrize("batched", [False, True], ids=["per-event", "batched"])
async def test_reconnecting_client_gets_every_line_exactly_once(client: TestClient, batched: bool) -> None:
    accepted = await submit(client, {"Dockerfile": NUMBERED})
    url = f"/builds/{accepted['build_id']}/logs" + ("?batch=true" if batched else "")
    rng = random.Random(20261122)
    last_id, numbers, drops, mid_frame_drops, terminal = 0, [], 0, 0, None
    while terminal is None:
        # Bytes this connection may read before we cut it: a batch frame is a few KiB, and a cut
        # connection must let one through now and then, or no client could ever get on.
        budget = rng.randint(1, 8000 if batched else 4000)
        headers = {**SSE, "Last-Event-ID": str(last_id)} if last_id else SSE
        response = await client.get(url, headers=headers)
        assert response.status == 200
        decoder, read = SSEDecoder(), 0
        while read < budget and terminal is None:
            chunk = await response.content.read(min(512, budget - read))
            if not chunk:
                break
            read += len(chunk)
            for frame in decoder.feed(chunk):
                if terminal is not None:
                    break
                events = decode_frame(int(frame.id), frame.data) if batched else [_event(*our_frame(frame))]
                for event in events:
                    assert event.id == last_id + 1, f"expected id {last_id + 1}, got {event.id}"
                    last_id = event.id
                    if event.data["type"] == "log" and event.data["line"].startswith("line "):
                        numbers.append(int(event.data["line"].split()[1]))
                    elif event.data["type"] in ("done", "error"):
                        terminal = event.data
        if terminal is None:
            drops += 1
            mid_frame_drops += decoder.incomplete
        response.close()  # drop the connection, not just the response
    print(f"reconnect test: {drops} cuts ({mid_frame_drops} mid-frame), {len(numbers)} lines verified")
    assert terminal["status"] == "succeeded"
    assert numbers == list(range(1, 20001))
    assert drops >= 200, drops
    assert mid_frame_drops >= 100, mid_frame_drops
    status = await wait_for(client, accepted["build_id"], {"succeeded"})
    assert status["last_event_id"] == last_id


def _event(event_id: int, data: dict[str, Any]) -> BuildEvent:
    return BuildEvent(event_id, data)


async def test_concurrent_followers_all_get_the_identical_log(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 3000")})
    logs = await asyncio.gather(*(read_log(client, accepted["build_id"]) for _ in range(25)))
    assert all(log == logs[0] for log in logs)
    assert [int(line) for line in log_lines(logs[0]) if line.isdigit()] == list(range(1, 3001))


async def test_slow_follower_catches_up_from_store_without_loss(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, log_window=100)))
    # The build goes on printing, then stays alive while the stalled reader catches up.
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 200000 && sleep 6")})
    # A reader with a tiny receive buffer that stalls: the daemon's writes to it block
    # while the build goes on, so it falls far behind the in-memory window.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /builds/{accepted['build_id']}/logs HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n".encode())
    await asyncio.sleep(3.5)  # long enough for the store to commit, and the window to move on
    raw = await asyncio.wait_for(reader.read(), 60)  # HTTP/1.0: the body ends with the connection
    writer.close()
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    frames = parse_sse(body)
    assert [i for i, _ in frames] == list(range(1, len(frames) + 1))
    assert [int(line) for line in log_lines(frames) if line.isdigit()] == list(range(1, 200001))
    assert frames[-1][1]["status"] == "succeeded"
    assert client.app[SERVICE].logs.lagged_followers >= 1


async def test_a_thousand_followers_that_never_read_hold_almost_nothing_and_slow_no_one(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_followers_per_tenant=1100)))
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 200000")})
    build_id = accepted["build_id"]
    loop = asyncio.get_running_loop()
    request = (
        f"GET /builds/{build_id}/logs HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nAccept: text/event-stream\r\n\r\n"
    )
    stalled = []
    try:
        for _ in range(1000):
            # Tiny receive buffers, never read: the daemon's side fills after a few KiB.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            stalled.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", client.port))
            await loop.sock_sendall(sock, request.encode())
        # One that reads gets the whole log (15 MiB a follower), and the build is not held up.
        frames = await read_log(client, build_id)
        assert [int(line) for line in log_lines(frames) if line.isdigit()] == list(range(1, 200001))
        assert (await wait_for(client, build_id, {"succeeded", "failed"}))["status"] == "succeeded"
        metrics = await (await client.get("/metrics")).text()
        assert metric_sample(metrics, "builder_log_streams") == 1000
        # Each holds at most the last write its socket did not take: MIN_WRITE and its chunk framing.
        unsent = metric_sample(metrics, "builder_log_stream_unsent_bytes")
        assert 0 < unsent <= 1000 * (streams.MIN_WRITE + streams.CHUNK_FRAMING)
    finally:
        for sock in stalled:
            sock.close()
    service = client.app[SERVICE]
    deadline = time.monotonic() + 10
    while service.follower_count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert service.follower_count == 0


async def test_an_idle_sse_stream_gets_a_ping_each_interval(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, sse_ping_interval=0.2)))
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
    build_id = accepted["build_id"]
    await wait_for_line(client, build_id, "started")
    response = await client.get(f"/builds/{build_id}/logs", headers=SSE)
    received = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.5):
            async for chunk in response.content.iter_any():
                received += chunk
    assert 4 <= received.count(b": ping\n\n") <= 8, received
    response.close()
    assert (await client.delete(f"/builds/{build_id}")).status == 200


async def test_abandoned_streams_release_their_subscriptions(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
    build_id = accepted["build_id"]
    await wait_for_line(client, build_id, "started")
    service = client.app[SERVICE]
    for _ in range(1000):
        response = await client.get(f"/builds/{build_id}/logs", headers=SSE)
        assert (await response.content.readline()).startswith(b"retry:")
        response.close()
    deadline = time.monotonic() + 5
    while service.follower_count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert service.follower_count == 0
    assert (await client.delete(f"/builds/{build_id}")).status == 200


async def test_plain_text_follow_for_curl(client: TestClient) -> None:
    accepted = await submit(
        client, {"Dockerfile": dockerfile("RUN echo '{\"done\": true}' && seq 1 3")}, image_name="builder-test/plain"
    )
    response = await client.get(f"/builds/{accepted['build_id']}/logs")  # Accept: */*, like curl
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    lines = text.splitlines()
    # BuildKit's plain style: `#N [1/2] FROM …`, `#N 0.012 <line>`, `#N DONE 0.1s`.
    output = dict(zip(plain_output(text), lines, strict=False))
    assert '{"done": true}' in output and lines.index(output["1"]) + 2 == lines.index(output["3"])
    assert lines[-1] == "--- succeeded: builder-test/plain:latest"
    assert "data:" not in text and "id:" not in text
    assert any(re.fullmatch(r"#\d+ \[1/2\] FROM .*builder-busybox.*", line) for line in lines), lines
    assert any(re.fullmatch(r"#\d+ DONE \d+\.\ds", line) for line in lines), lines

    failed = await submit(client, {"Dockerfile": dockerfile("RUN exit 4")})
    await wait_for(client, failed["build_id"], {"failed"})
    text = await (await client.get(f"/builds/{failed['build_id']}/logs", params={"format": "text"}, headers=SSE)).text()
    assert text.splitlines()[-1] == "--- failed: executor failed running [/bin/sh -c exit 4]: exit code: 4"
    assert re.search(r"^#\d+ ERROR: executor failed running \[/bin/sh -c exit 4\]: exit code: 4$", text, re.M), text


async def test_follow_false_prints_what_exists_and_ends(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
    build_id = accepted["build_id"]
    await wait_for_line(client, build_id, "started")
    async with asyncio.timeout(5):
        text = await (await client.get(f"/builds/{build_id}/logs", params={"follow": "false"})).text()
        frames = await read_log(client, build_id, follow="false", after=2)
    assert "started" in plain_output(text) and "---" not in text.splitlines()[-1]
    assert frames[0][0] == 3 and "started" in log_lines(frames)
    assert frames[-1][1]["type"] == "log"
    assert (await client.delete(f"/builds/{build_id}")).status == 200


async def test_plain_text_resumes_after_an_event_id(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 5")})
    await wait_for(client, accepted["build_id"], {"succeeded"})
    frames = await read_log(client, accepted["build_id"])
    after = next(i for i, data in frames if data.get("line") == "3")
    text = await (await client.get(f"/builds/{accepted['build_id']}/logs", params={"after": str(after)})).text()
    assert plain_output(text)[:2] == ["4", "5"]


async def test_removed_by_retention_is_410_not_404(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_builds=1)))
    old = await submit(client, {"Dockerfile": dockerfile()})
    await wait_for(client, old["build_id"], {"succeeded"})
    new = await submit(client, {"Dockerfile": dockerfile()})
    await wait_for(client, new["build_id"], {"succeeded"})
    service = client.app[SERVICE]
    deadline = time.monotonic() + 5
    expired: list[str] = []
    while old["build_id"] not in expired and time.monotonic() < deadline:
        expired += await service.expire_old_builds()  # finished builds leave the active set on the next flush
        await asyncio.sleep(0.05)
    assert expired == [old["build_id"]]
    for path in (f"/builds/{old['build_id']}/logs", f"/builds/{old['build_id']}"):
        response = await client.get(path, headers=SSE)
        assert response.status == 410
        assert (await response.json())["code"] == "build_expired"
    assert (await client.get(f"/builds/{new['build_id']}/logs", headers=SSE)).status == 200
    assert (await client.get("/builds/never-existed/logs", headers=SSE)).status == 404


async def test_resuming_at_or_past_the_end_ends_instead_of_hanging(aiohttp_client: Any, settings: Settings) -> None:
    # A slow flush keeps the finished build's log live in memory for a while: the window where
    # a follower resuming at the terminal frame used to wait forever.
    client = await aiohttp_client(create_app(dataclasses.replace(settings, flush_interval=30)))
    build = await client.post("/builds", json={"image": "builder-busybox:latest"})
    build_id = (await build.json())["build_id"]
    status = await wait_for(client, build_id, {"succeeded"})
    async with asyncio.timeout(10):
        assert await read_log(client, build_id, after=status["last_event_id"]) == []
        assert await read_log(client, build_id, after=10_000) == []
        assert (await read_log(client, build_id, after=status["last_event_id"] - 1))[-1][1]["type"] == "done"
