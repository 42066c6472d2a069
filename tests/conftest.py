"""Fixtures: the real app from `create_app`, the real Docker engine the scripts started (and, from
tests/processes.py, the real processes beside them)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import tarfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.client.sse import ServerSentEvent, SSEDecoder
from builder.server.app import create_app
from builder.server.config import Settings

# Real processes beside the tests: registry, second engine, redis-server, nginx, `builder serve`.
pytest_plugins = ["tests.processes"]

BASE_IMAGE = os.environ.get("BUILDER_BASE_IMAGE", "builder-busybox:latest")
TERMINAL = {"succeeded", "failed", "cancelled"}
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def base_image() -> str:
    return BASE_IMAGE


@pytest.fixture(params=["buildkit", "legacy"])
def builder(request: pytest.FixtureRequest) -> str:
    """Runs a test once per builder (the default, BuildKit, and the legacy builder)."""
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    # BuildKit unless the test asks for the `builder` fixture (both builders).
    builder = request.getfixturevalue("builder") if "builder" in request.fixturenames else "buildkit"
    return Settings(data_dir=tmp_path / "data", max_concurrent=2, flush_interval=0.02, builder=builder)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    async with aiodocker.Docker() as d:
        yield d


def make_context(files: Mapping[str, str | bytes], *, gzip: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dockerfile(*steps: str) -> str:
    return "\n".join([f"FROM {BASE_IMAGE}", *steps]) + "\n"


async def submit(client: TestClient, files: Mapping[str, str | bytes], **fields: str) -> dict[str, Any]:
    """POST a context as multipart; no cache unless asked, so every step really runs."""
    fields.setdefault("no_cache", "true")
    form = aiohttp.FormData()
    form.add_field("context", make_context(files), filename="context.tar.gz", content_type="application/gzip")
    for name, value in fields.items():
        form.add_field(name, value)
    response = await client.post("/builds", data=form)
    body = await response.json()
    assert response.status == 202, body
    return body


async def wait_for(client: TestClient, build_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/builds/{build_id}")
        body = await response.json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"build stayed {body['status']}: {body}"
        await asyncio.sleep(0.05)


def our_frame(event: ServerSentEvent) -> tuple[int, dict[str, Any]]:
    """An event as (id, data), asserting it came in the daemon's frame: one `id:` and one `data:` line."""
    assert event.fields == ("id", "data"), event
    return int(event.id), json.loads(event.data)


def parse_sse(raw: str) -> list[tuple[int, dict[str, Any]]]:
    """The events of a whole stream as (id, data) in order, through the SDK's decoder."""
    decoder = SSEDecoder()
    frames = [our_frame(event) for event in decoder.feed(raw.encode())]
    assert not decoder.incomplete, f"stream ended inside a frame: {raw[-200:]!r}"
    return frames


async def read_log(
    client: TestClient, build_id: str, *, headers: Mapping[str, str] | None = None, **params: Any
) -> list[tuple[int, dict[str, Any]]]:
    response = await client.get(f"/builds/{build_id}/logs", params=params, headers={**SSE, **(headers or {})})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(await response.text())


def log_lines(frames: list[tuple[int, dict[str, Any]]]) -> list[str]:
    return [data["line"] for _, data in frames if data["type"] == "log"]


def metric_sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in /metrics' Prometheus text."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} missing"
    return float(match.group(1))


def plain_output(text: str) -> list[str]:
    """The lines of a plain-text log without BuildKit's `#N 0.123 ` prefix on output lines."""
    return [re.sub(r"^#\d+ \d+\.\d+ ", "", line) for line in text.splitlines()]


def step_events(frames: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """BuildKit's step status events, in order."""
    return [data for _, data in frames if data["type"] == "status" and data.get("phase") == "step"]


def build_text(frames: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """What either builder says about a build, as lines: output lines and step names (a legacy
    `Step 1/1 : FROM x` is a log line, a BuildKit `[1/1] FROM x` a step event)."""
    return [
        data["line"] if data["type"] == "log" else data["name"]
        for _, data in frames
        if data["type"] == "log" or data.get("phase") == "step"
    ]


async def wait_for_line(client: TestClient, build_id: str, text: str, timeout: float = 30) -> None:
    """Follow the live log until the build prints exactly the line `text`."""
    decoder = SSEDecoder()
    async with asyncio.timeout(timeout):
        response = await client.get(f"/builds/{build_id}/logs", headers=SSE)
        async for chunk in response.content.iter_any():
            if any(json.loads(event.data).get("line") == text for event in decoder.feed(chunk)):
                response.close()
                return
    raise AssertionError(f"log of {build_id} ended without the line {text!r}")


async def wait_healthy(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("daemon did not become healthy")


async def post_context(session: aiohttp.ClientSession, url: str, files: dict[str, str]) -> str:
    async with session.post(
        f"{url}/builds",
        data=make_context(files),
        params={"no_cache": "true"},
        headers={"Content-Type": "application/gzip"},
    ) as response:
        assert response.status == 202
        return (await response.json())["build_id"]
