"""A data dir on a small tmpfs that fills up: the build's outcome is decided once, after its
log is durable; the daemon is unready while it cannot write, recovers when it can, and the log
keeps exactly one terminal frame across a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import SSE, dockerfile, parse_sse, read_log, submit


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def _until(check: Any, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def test_a_store_that_cannot_write_fails_the_build_once_and_recovers(
    aiohttp_client: Any, settings: Settings, small_disk: Path
) -> None:
    data = small_disk / "data"
    client = await aiohttp_client(create_app(dataclasses.replace(settings, data_dir=data)))
    # Leave the store a few MiB: the chatty build's log will not fit.
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 3 * 2**20))

    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 2000000")})
    build_id = accepted["build_id"]
    stream = await client.get(f"/builds/{build_id}/logs", headers=SSE)
    frames = parse_sse(await stream.text())
    terminal = [data for _, data in frames if data["type"] in ("done", "error")]
    assert len(terminal) == 1 and frames[-1][1] is terminal[0]
    assert terminal[0]["status"] == "failed" and "could not store" in terminal[0]["error"], terminal
    status = await (await client.get(f"/builds/{build_id}")).json()
    assert status["status"] == "failed" and status["image_ref"] is None

    # Unready, and new builds refused, while the store cannot write.
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["code"] == "store_unavailable"
    refused = await client.post("/builds", json={"image": "builder-busybox:latest"})
    assert refused.status == 503 and refused.headers["Retry-After"] == "5"

    # Room again: the flusher (backing off meanwhile) gets everything down, and the daemon is ready.
    filler.unlink()

    async def ready_again() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready_again)
    await client.close()

    # After a restart: the same outcome, and still exactly one terminal frame.
    restarted = await aiohttp_client(create_app(dataclasses.replace(settings, data_dir=data)))
    assert (await (await restarted.get(f"/builds/{build_id}")).json())["status"] == "failed"
    stored = await read_log(restarted, build_id)
    assert [data["status"] for _, data in stored if data["type"] in ("done", "error")] == ["failed"]
