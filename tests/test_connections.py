"""Connection-level abuse against a real `builder serve`: half-sent heads, trickled bodies, and
more connections than a client may hold."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import aiohttp
import pytest

from tests.conftest import wait_healthy

Daemon = tuple[str, subprocess.Popen[bytes]]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _connect(url: str, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", _port(url), local_addr=(source, 0))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sends before it closes the connection; fails if it keeps it open longer."""
    async with asyncio.timeout(seconds):
        return await reader.read()


@pytest.mark.daemon_args("--header-timeout", "1")
async def test_half_a_header_and_then_nothing_is_dropped(daemon: Daemon) -> None:
    url, _ = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
    reader, writer = await _connect(url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    await _closed_within(reader, 10)
    assert time.monotonic() - started < 5
    writer.close()


@pytest.mark.daemon_args("--header-timeout", "2")
async def test_a_trickled_header_is_dropped_at_the_head_deadline(daemon: Daemon) -> None:
    url, _ = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
    reader, writer = await _connect(url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = asyncio.ensure_future(reader.read())
    # One byte of a header every 0.3 s: never idle, never complete.
    while not closed.done() and time.monotonic() - started < 10:
        writer.write(b"X")
        await asyncio.sleep(0.3)
    assert closed.done(), "the connection was still open after 10 s of trickle"
    assert time.monotonic() - started < 6
    writer.close()


@pytest.mark.daemon_args("--upload-idle-timeout", "1", "--upload-timeout", "2")
async def test_a_trickled_body_ends_at_the_total_deadline_with_408(daemon: Daemon) -> None:
    url, _ = daemon

    async def trickle() -> object:
        for _ in range(100):
            yield b"\x1f"  # never idle for the idle bound, but never done
            await asyncio.sleep(0.4)

    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        started = time.monotonic()
        async with asyncio.timeout(15):
            response = await session.post(f"{url}/builds", data=trickle(), headers={"Content-Type": "application/gzip"})
            body = await response.json()
        assert response.status == 408 and body["code"] == "upload_stalled", body
        assert "longer than 2 seconds" in body["error"]
        assert time.monotonic() - started < 8


@pytest.mark.daemon_args("--max-connections-per-client", "20", "--header-timeout", "60")
async def test_a_client_over_its_connection_cap_gets_a_fast_503_and_others_are_served(daemon: Daemon) -> None:
    url, proc = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
    # A flood from one address (127.0.0.2): half-sent heads that hold their connections.
    held = []
    for _ in range(20):
        reader, writer = await _connect(url, "127.0.0.2")
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        held.append((reader, writer))
    await asyncio.sleep(0.2)
    fds_before = len(os.listdir(f"/proc/{proc.pid}/fd"))
    refused = []
    for _ in range(200):
        reader, writer = await _connect(url, "127.0.0.2")
        refused.append(await _closed_within(reader, 5))
        writer.close()
    head, _, body = refused[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["code"] == "too_many_connections"
    assert all(answer == refused[0] for answer in refused)
    # The refused ones held no descriptor, and another client is served at once.
    assert len(os.listdir(f"/proc/{proc.pid}/fd")) <= fds_before + 5
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200
        assert time.monotonic() - started < 1
    for _, writer in held:
        writer.close()
