"""Contexts in one pass, on the real engine: streamed into the engine while the upload arrives,
refused mid-upload with nothing left on the engine's side, spooled checked when the build must wait."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
import zstandard
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import dockerfile, log_lines, read_log, submit, wait_for
from tests.steps import unique_sleep, wait_for_process

pytestmark = pytest.mark.usefixtures("builder")

MIB = 1 << 20


def _member(name: str, size: int, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return bytes(-size % 512)


async def _engine_tmp(docker: aiodocker.Docker) -> set[str]:
    """What the engine has under its tmp dir (the legacy builder unpacks contexts there)."""
    root = Path((await docker.system.info())["DockerRootDir"]) / "tmp"
    return set(os.listdir(root)) if root.exists() else set()


async def _spent_context_records(docker: aiodocker.Docker) -> list[str]:
    """BuildKit's cache records of uploaded contexts that no running build uses."""
    while True:
        try:
            usage = await docker._query_json("system/df")
            break
        except aiodocker.DockerError as exc:  # one at a time: the daemon may be asking too
            if "already running" not in str(exc):
                raise
            await asyncio.sleep(0.1)
    return [
        r["ID"]
        for r in usage.get("BuildCache") or []
        if r["Description"].startswith("http url http://build-context-") and not r["InUse"]
    ]


class Upload:
    """A raw-body upload the test paces: `release` lets the rest go after the first part."""

    def __init__(self, first: list[bytes], rest: list[bytes]) -> None:
        self.first, self.rest = first, rest
        self.first_sent = asyncio.Event()
        self.release = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        for piece in self.first:
            yield piece
        self.first_sent.set()
        await self.release.wait()
        for piece in self.rest:
            yield piece


def _big_file_context(steps: str, size: int) -> tuple[list[bytes], list[bytes]]:
    """A plain tar: a Dockerfile, then a file of `size` bytes, split in two halves of pieces."""
    docker_file = dockerfile(steps).encode()
    head = _header(_member("Dockerfile", len(docker_file))) + docker_file + _padding(len(docker_file))
    pieces = [head + _header(_member("big.bin", size))] + [b"z" * MIB] * (size // MIB)
    half = len(pieces) // 2
    return pieces[:half], [*pieces[half:], bytes(1024)]


async def test_the_engine_reads_the_context_while_the_upload_is_still_arriving(
    client: TestClient, settings: Settings
) -> None:
    first, rest = _big_file_context("RUN test -s /big.bin || true", 32 * MIB)
    upload = Upload(first, rest)
    post = asyncio.create_task(
        client.post(
            "/builds", data=upload.body(), params={"no_cache": "true"}, headers={"Content-Type": "application/x-tar"}
        )
    )
    await upload.first_sent.wait()
    # Half the upload is in: the build runs already, and nothing waits on the daemon's disk.
    async with asyncio.timeout(30):
        while (await (await client.get("/healthz")).json())["builds_running"] != 1:
            await asyncio.sleep(0.02)
    assert not post.done()
    assert list(settings.spool_dir.iterdir()) == []
    upload.release.set()
    response = await post
    accepted = await response.json()
    assert response.status == 202, accepted
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"


@pytest.mark.parametrize(
    "hostile",
    ["fifo", "escape"],
)
async def test_a_check_failing_mid_upload_ends_the_engines_read_and_leaves_nothing(
    client: TestClient, docker: aiodocker.Docker, settings: Settings, hostile: str, builder: str
) -> None:
    tmp_before = await _engine_tmp(docker)
    first, rest = _big_file_context("RUN true", 16 * MIB)
    bad = (
        _member("pipe", 0, type=tarfile.FIFOTYPE)
        if hostile == "fifo"
        else _member("link", 0, type=tarfile.SYMTYPE, linkname="../../../../etc/shadow")
    )
    # The hostile entry comes after the engine has been reading for a while.
    upload = Upload(first, [*rest[:-1], _header(bad) + bytes(1024)])
    upload.release.set()
    response = await client.post("/builds", data=upload.body(), headers={"Content-Type": "application/x-tar"})
    body = await response.json()
    assert response.status == 400 and body["code"] == "invalid_context", body
    assert ("pipe" if hostile == "fifo" else "link") in body["error"]
    # No build exists, none runs, nothing waits on the daemon's disk or the engine's.
    assert (await (await client.get("/builds")).json())["builds"] == []
    assert (await (await client.get("/healthz")).json())["builds_running"] == 0
    assert list(settings.spool_dir.iterdir()) == []
    await _nothing_left_on_the_engine(docker, tmp_before, builder)


async def _nothing_left_on_the_engine(docker: aiodocker.Docker, tmp_before: set[str], builder: str) -> None:
    """The legacy builder unpacks contexts under the engine's tmp dir; BuildKit keeps them as build
    cache records (which the daemon sweeps)."""
    async with asyncio.timeout(30):
        while await _engine_tmp(docker) - tmp_before or (
            builder == "buildkit" and await _spent_context_records(docker)
        ):
            await asyncio.sleep(0.1)


async def test_a_client_that_hangs_up_mid_upload_leaves_nothing(
    client: TestClient, docker: aiodocker.Docker, settings: Settings, builder: str
) -> None:
    tmp_before = await _engine_tmp(docker)
    first, rest = _big_file_context("RUN true", 16 * MIB)
    upload = Upload(first, rest)
    post = asyncio.create_task(
        client.post("/builds", data=upload.body(), headers={"Content-Type": "application/x-tar"})
    )
    async with asyncio.timeout(30):
        while (await (await client.get("/healthz")).json())["builds_running"] != 1:
            await asyncio.sleep(0.02)
    post.cancel()
    async with asyncio.timeout(30):
        while (await (await client.get("/healthz")).json())["builds_running"] != 0:
            await asyncio.sleep(0.02)
    await _nothing_left_on_the_engine(docker, tmp_before, builder)
    assert (await (await client.get("/builds")).json())["builds"] == []
    assert list(settings.spool_dir.iterdir()) == []


async def test_a_build_that_must_wait_is_spooled_as_the_checked_plain_tar(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_concurrent=1)))
    sleep = unique_sleep()
    blocker = await submit(client, {"Dockerfile": dockerfile(f"RUN {sleep}")})
    await wait_for_process(sleep)
    waiting = await submit(
        client,
        {"Dockerfile": dockerfile("COPY data.txt /data.txt", "RUN cat /data.txt"), "data.txt": "spooled and checked\n"},
    )
    [spooled] = list(settings.spool_dir.iterdir())
    with tarfile.open(spooled) as tar:  # plain: the client's gzip never reaches the disk or the engine
        assert {m.name for m in tar.getmembers()} == {"Dockerfile", "data.txt"}
    assert spooled.read_bytes()[:2] != b"\x1f\x8b"
    assert (await client.delete(f"/builds/{blocker['build_id']}")).status == 200
    assert (await wait_for(client, waiting["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert "spooled and checked" in log_lines(await read_log(client, waiting["build_id"]))
    assert list(settings.spool_dir.iterdir()) == []


async def test_many_gzip_members_behind_a_lying_pax_size_are_413_before_the_engine_writes_them(
    aiohttp_client: Any, settings: Settings, docker: aiodocker.Docker
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_context_unpacked_bytes=8 * MIB)))
    tmp_before = await _engine_tmp(docker)
    docker_file = dockerfile("RUN true").encode()
    tar = _header(_member("Dockerfile", len(docker_file))) + docker_file + _padding(len(docker_file))
    liar = tarfile.TarInfo("zeros")
    liar.size = 0
    liar.pax_headers = {"size": str(64 * MIB)}
    members = [gzip.compress(tar + liar.tobuf(tarfile.PAX_FORMAT), 1)]
    members += [gzip.compress(bytes(4 * MIB), 1)] * 16  # many members of zeros, as the attack sent them
    response = await client.post("/builds", data=b"".join(members), headers={"Content-Type": "application/gzip"})
    body = await response.json()
    assert response.status in (400, 413), body
    assert (await (await client.get("/builds")).json())["builds"] == []
    assert await _engine_tmp(docker) == tmp_before


async def test_gnu_tar_context_with_a_long_symlink_target_builds(client: TestClient, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    deep = context / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "target.txt").write_text("reached through a long link\n")
    (context / "link").symlink_to(os.path.relpath(deep / "target.txt", context))
    assert len(os.readlink(context / "link")) > 100
    (context / "Dockerfile").write_text(dockerfile("COPY link /link", "RUN cat /link"))
    archive = tmp_path / "ctx.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(context), "."], check=True)
    response = await client.post(
        "/builds", data=archive.read_bytes(), params={"no_cache": "true"}, headers={"Content-Type": "application/gzip"}
    )
    accepted = await response.json()
    assert response.status == 202, accepted
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert "reached through a long link" in log_lines(await read_log(client, accepted["build_id"]))


async def test_zstd_context_builds(client: TestClient) -> None:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        data = dockerfile("RUN echo zstd-context").encode()
        tar.addfile(_member("Dockerfile", len(data)), io.BytesIO(data))
    response = await client.post(
        "/builds",
        data=zstandard.ZstdCompressor().compress(plain.getvalue()),
        params={"no_cache": "true"},
        headers={"Content-Type": "application/zstd"},
    )
    accepted = await response.json()
    assert response.status == 202, accepted
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert "zstd-context" in log_lines(await read_log(client, accepted["build_id"]))
