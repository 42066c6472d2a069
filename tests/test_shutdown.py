"""SIGTERM drains the daemon: 503 for new builds, running ones get the grace period, the rest are torn down."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from typing import Any

import aiodocker
import aiohttp
import pytest

from tests.conftest import SSE, dockerfile, make_context, post_context, wait_healthy


async def _follow(
    session: aiohttp.ClientSession, url: str, build_id: str, started: asyncio.Event
) -> list[dict[str, Any]]:
    frames = []
    async with session.get(f"{url}/builds/{build_id}/logs", headers=SSE) as response:
        async for raw in response.content:
            if raw.startswith(b"data: "):
                frames.append(json.loads(raw[6:]))
                if frames[-1].get("line") == "started":
                    started.set()
    return frames


@pytest.mark.daemon_args("--shutdown-grace", "3")
async def test_sigterm_lets_short_builds_finish_and_tears_down_the_rest(
    daemon: tuple[str, subprocess.Popen[bytes]], docker: aiodocker.Docker
) -> None:
    url, proc = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        short = await post_context(session, url, {"Dockerfile": dockerfile("RUN echo started && sleep 1.5")})
        long = await post_context(session, url, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
        short_started, long_started = asyncio.Event(), asyncio.Event()
        followers = [
            asyncio.create_task(_follow(session, url, short, short_started)),
            asyncio.create_task(_follow(session, url, long, long_started)),
        ]
        async with asyncio.timeout(30):
            await short_started.wait()
            await long_started.wait()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            # Until the daemon has seen the signal: then new builds are refused.
            while True:
                async with session.post(f"{url}/builds", json={"image": "builder-busybox:latest"}) as answer:
                    if answer.status == 503:
                        assert answer.headers["Retry-After"] == "5"
                        assert (await answer.json())["code"] == "shutting_down"
                        break
                    assert answer.status == 202, await answer.text()
                await asyncio.sleep(0.05)
        async with asyncio.timeout(20):
            short_frames, long_frames = await asyncio.gather(*followers)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert short_frames[-1]["status"] == "succeeded"
    assert long_frames[-1] == {
        "type": "error",
        "status": "failed",
        "error": "daemon shut down while the build was running",
    }
    leftovers = [c for c in await docker.containers.list(all=True) if "sleep 300" in str(c._container.get("Command"))]
    assert leftovers == []


async def test_sigterm_on_an_idle_daemon_exits_0(daemon: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_sigterm_ends_an_upload_in_flight_with_503_at_once(daemon: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = daemon
    sent_some = asyncio.Event()

    async def slow_upload() -> Any:
        yield make_context({"Dockerfile": dockerfile()})[:100]  # then nothing: an upload still arriving
        sent_some.set()
        await asyncio.sleep(60)

    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        post = asyncio.create_task(
            session.post(f"{url}/builds", data=slow_upload(), headers={"Content-Type": "application/gzip"})
        )
        await sent_some.wait()
        while (await (await session.get(f"{url}/healthz")).json())["uploads"] == 0:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            response = await post
            assert response.status == 503
            assert (await response.json())["code"] == "shutting_down"
    assert await asyncio.to_thread(proc.wait, 20) == 0
