"""A daemon killed mid-build: after restart, records and logs survive, the interrupted build is failed and cleaned."""

from __future__ import annotations

import asyncio
import os
import re
import signal
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


async def test_restart_keeps_history_and_fails_interrupted_build(
    daemon: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, aiohttp_client: Any, docker: aiodocker.Docker
) -> None:
    url, proc = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        finished = await post_context(session, url, {"Dockerfile": dockerfile("RUN echo persisted-line")})
        interrupted = await post_context(session, url, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
        async with asyncio.timeout(30):
            async with session.get(f"{url}/builds/{finished}/logs", headers=SSE) as response:
                before = parse_sse(await response.text())
            async with session.get(f"{url}/builds/{interrupted}/logs", headers=SSE) as response:
                async for raw in response.content:
                    if m := re.search(rb"Running in (\w+)", raw):
                        container = m.group(1).decode()
                    if b'"line":"started"' in raw:
                        break
        await asyncio.sleep(0.2)  # let the batched log writer commit what it has
    assert (await docker.containers.container(container).show())["State"]["Running"]

    proc.send_signal(signal.SIGKILL)
    proc.wait()

    client = await aiohttp_client(create_app(Settings(data_dir=tmp_path / "data")))
    assert await read_log(client, finished) == before
    assert "persisted-line" in log_lines(before)
    assert (await wait_for(client, finished, {"succeeded"}))["image_id"].startswith("sha256:")

    status = await wait_for(client, interrupted, {"failed"}, timeout=5)
    assert status["error"] == "daemon restarted"
    frames = await read_log(client, interrupted)
    assert frames[-1] == (status["last_event_id"], {"type": "error", "error": "daemon restarted", "status": "failed"})
    assert "started" in log_lines(frames)
    with pytest.raises(aiodocker.DockerError) as gone:
        await docker.containers.container(container).show()
    assert gone.value.status == 404
    assert os.listdir(tmp_path / "data" / "contexts") == []
