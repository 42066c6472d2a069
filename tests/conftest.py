"""Fixtures: the real app from `create_app`, the real Docker engine the scripts started."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings

BASE_IMAGE = os.environ.get("BUILDER_BASE_IMAGE", "builder-busybox:latest")
TERMINAL = {"succeeded", "failed", "cancelled"}
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def base_image() -> str:
    return BASE_IMAGE


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_concurrent=2, flush_interval=0.02)


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


def parse_sse(raw: str) -> list[tuple[int, dict[str, Any]]]:
    """Frames as (id, data) in order; asserts every data frame has exactly one id and one data line."""
    frames = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines or lines[0].startswith("retry:"):
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        assert set(fields) == {"id", "data"}, block
        frames.append((int(fields["id"]), json.loads(fields["data"])))
    return frames


async def read_log(client: TestClient, build_id: str, **params: Any) -> list[tuple[int, dict[str, Any]]]:
    response = await client.get(f"/builds/{build_id}/logs", params=params, headers=SSE)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(await response.text())


def log_lines(frames: list[tuple[int, dict[str, Any]]]) -> list[str]:
    return [data["line"] for _, data in frames if data["type"] == "log"]


async def wait_for_line(client: TestClient, build_id: str, text: str, timeout: float = 30) -> None:
    """Follow the live log until the build prints exactly the line `text`."""
    async with asyncio.timeout(timeout):
        response = await client.get(f"/builds/{build_id}/logs", headers=SSE)
        async for raw in response.content:
            if raw.startswith(b"data: ") and json.loads(raw[6:]).get("line") == text:
                response.close()
                return
    raise AssertionError(f"log of {build_id} ended without the line {text!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_registry(root: Path, extra_config: str = "") -> Iterator[str]:
    """A real registry (Debian's docker-registry) on a free loopback port, storage under `root`;
    `extra_config` is appended to its YAML config (an `auth:` section, say)."""
    port = free_port()
    config = root / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'registry'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra_config
    )
    binary = os.environ.get("BUILDER_REGISTRY_BIN", "/usr/bin/docker-registry")
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers: 401 when it asks for a login
            except OSError:
                assert proc.poll() is None, (root / "registry.log").read_text()
                assert time.monotonic() < deadline, "registry did not come up"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    with run_registry(tmp_path) as address:
        yield address


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `builder serve` process (extra flags via `@pytest.mark.daemon_args(...)`, where
    `{tmp_path}` is replaced), so it can be signalled or killed like in production."""
    port = free_port()
    marker = request.node.get_closest_marker("daemon_args")
    extra = [arg.format(tmp_path=tmp_path) for arg in marker.args] if marker else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--log-format", "json", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://127.0.0.1:{port}", proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


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
        f"{url}/builds", data=make_context(files), params={"no_cache": "true"},
        headers={"Content-Type": "application/gzip"},
    ) as response:
        assert response.status == 202
        return (await response.json())["build_id"]
