"""A daemon killed mid-build: after restart, records and logs survive, the interrupted build is failed and cleaned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import (
    SSE,
    dockerfile,
    log_lines,
    parse_sse,
    post_context,
    read_log,
    wait_for,
    wait_healthy,
)
from tests.steps import processes_running, unique_sleep, wait_for_process


def _committed_lines(database: Path, build_id: str) -> list[str]:
    """The log lines of a build the daemon's store has committed (read from its SQLite file)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT data FROM event_batches WHERE build_id = ?", (build_id,)).fetchall()
    return [json.loads(data).get("line", "") for (run,) in rows for data in run.split("\n")]


@pytest.mark.usefixtures("builder")
async def test_restart_keeps_history_and_fails_interrupted_build(
    daemon: tuple[str, subprocess.Popen[bytes]],
    tmp_path: Path,
    aiohttp_client: Any,
    docker: aiodocker.Docker,
    builder: str,
) -> None:
    url, proc = daemon
    sleep = unique_sleep()
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        finished = await post_context(session, url, {"Dockerfile": dockerfile("RUN echo persisted-line")})
        interrupted = await post_context(session, url, {"Dockerfile": dockerfile(f"RUN echo started && {sleep}")})
        container = None
        async with asyncio.timeout(30):
            async with session.get(f"{url}/builds/{finished}/logs", headers=SSE) as response:
                before = parse_sse(await response.text())
            async with session.get(f"{url}/builds/{interrupted}/logs", headers=SSE) as response:
                async for raw in response.content:
                    if m := re.search(rb"Running in (\w+)", raw):
                        container = m.group(1).decode()
                    if b'"line":"started"' in raw:
                        break
            await wait_for_process(sleep)
            # The batched log writer has committed the line (what a restart can show of the log).
            while "started" not in _committed_lines(tmp_path / "data" / "builds.sqlite3", interrupted):
                await asyncio.sleep(0.02)
    if builder == "legacy":
        assert container and (await docker.containers.container(container).show())["State"]["Running"]

    proc.send_signal(signal.SIGKILL)
    proc.wait()

    client = await aiohttp_client(create_app(Settings(data_dir=tmp_path / "data", builder=builder)))
    assert await read_log(client, finished) == before
    assert "persisted-line" in log_lines(before)
    assert (await wait_for(client, finished, {"succeeded"}))["image_id"].startswith("sha256:")

    status = await wait_for(client, interrupted, {"failed"}, timeout=5)
    assert status["error"] == "daemon restarted"
    frames = await read_log(client, interrupted)
    assert frames[-1] == (status["last_event_id"], {"type": "error", "error": "daemon restarted", "status": "failed"})
    assert "started" in log_lines(frames)
    if builder == "legacy":
        with pytest.raises(aiodocker.DockerError) as gone:
            await docker.containers.container(container).show()
        assert gone.value.status == 404
    else:
        # BuildKit cancels a build whose client connection closed: the killed daemon's did.
        async with asyncio.timeout(10):
            while processes_running(sleep):
                await asyncio.sleep(0.05)
    assert os.listdir(tmp_path / "data" / "contexts") == []


async def test_event_ids_are_never_given_twice_across_a_crash(
    daemon: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, aiohttp_client: Any
) -> None:
    url, proc = daemon
    seen = 0
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        chatty = await post_context(
            session, url, {"Dockerfile": dockerfile("RUN i=0; while true; do i=$((i+1)); echo line-$i; done")}
        )
        async with asyncio.timeout(30):
            async with session.get(f"{url}/builds/{chatty}/logs", headers=SSE) as response:
                async for raw in response.content:
                    if raw.startswith(b"id: "):
                        seen = int(raw[4:])
                    if seen >= 20_000:
                        # Killed while live events run ahead of the store's batched commits.
                        proc.send_signal(signal.SIGKILL)
                        break
    proc.wait()

    client = await aiohttp_client(create_app(Settings(data_dir=tmp_path / "data")))
    status = await wait_for(client, chatty, {"failed"}, timeout=10)
    assert status["last_event_id"] > seen
    # Resuming where the follower was gets what the store kept after it, then the terminal
    # frame: not a silence that never ends.
    async with asyncio.timeout(10):
        frames = await read_log(client, chatty, after=str(seen))
    ids = [event_id for event_id, _ in frames]
    assert ids == sorted(set(ids)) and ids[0] > seen
    assert frames[-1] == (status["last_event_id"], {"type": "error", "error": "daemon restarted", "status": "failed"})
