"""The SDK against the real daemon and engine, directly and through a fault-injecting proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from builder.client import (
    BuildCancelled,
    BuilderClient,
    BuilderConnectionError,
    BuilderHTTPError,
    BuildFailed,
    ContextError,
    DoneEvent,
    LogEvent,
    RetryPolicy,
    StatusEvent,
)
from tests.conftest import dockerfile
from tests.fault_proxy import FaultProxy


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """A context directory under `root` (never `root` itself: the daemon's data dir lives there)."""
    root = root / "ctx"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.fixture
async def sdk(client: TestClient) -> AsyncIterator[BuilderClient]:
    async with BuilderClient(str(client.make_url("/"))) as sdk:
        yield sdk


async def test_build_honours_dockerignore(sdk: BuilderClient, tmp_path: Path, docker: aiodocker.Docker) -> None:
    context = write_tree(
        tmp_path,
        {
            "Dockerfile": dockerfile("COPY . /ctx", "RUN find /ctx -type f | sort"),
            ".dockerignore": "*.log\nsecret/\n!keep.log\n",
            "app.txt": "app",
            "debug.log": "noise",
            "keep.log": "kept",
            "secret/key": "s3cret",
        },
    )
    lines: list[str] = []
    result = await sdk.build(context, image_name="sdk-test/ignore", no_cache=True, on_log=lines.append)
    assert result.status == "succeeded" and result.image_ref == "sdk-test/ignore:latest"
    assert result.image_id.startswith("sha256:") and result.duration > 0
    files = {line for line in lines if line.startswith("/ctx/")}
    assert files == {"/ctx/.dockerignore", "/ctx/Dockerfile", "/ctx/app.txt", "/ctx/keep.log"}
    assert (await docker.images.inspect(result.image_ref))["Id"] == result.image_id


@pytest.mark.parametrize("compress", ["auto", "zstd", "gzip", "none"])
async def test_every_context_compression_builds(sdk: BuilderClient, tmp_path: Path, compress: Any) -> None:
    context = write_tree(
        tmp_path, {"Dockerfile": dockerfile("COPY . /ctx", "RUN cat /ctx/app.txt"), "app.txt": f"sent as {compress}\n"}
    )
    lines: list[str] = []
    result = await sdk.build(
        context, image_name="sdk-test/compress", no_cache=True, compress=compress, on_log=lines.append
    )
    assert result.status == "succeeded" and f"sent as {compress}" in lines


async def test_symlinked_dockerfile_builds(sdk: BuilderClient, tmp_path: Path) -> None:
    context = write_tree(tmp_path, {"docker/app.Dockerfile": dockerfile("RUN echo built-from-the-link-target")})
    (context / "Dockerfile").symlink_to("docker/app.Dockerfile")
    lines: list[str] = []
    result = await sdk.build(context, image_name="sdk-test/symlinked", no_cache=True, on_log=lines.append)
    assert result.status == "succeeded" and "built-from-the-link-target" in lines


async def test_build_image_of_the_base_image(sdk: BuilderClient, base_image: str) -> None:
    result = await sdk.build_image(base_image, image_name="sdk-test/synthetic")
    assert result.status == "succeeded" and result.image_ref == "sdk-test/synthetic:latest"


async def test_failed_build_raises_build_failed(sdk: BuilderClient, tmp_path: Path) -> None:
    context = write_tree(tmp_path, {"Dockerfile": dockerfile("RUN echo boom && exit 7")})
    with pytest.raises(BuildFailed) as failed:
        await sdk.build(context, image_name="sdk-test/failing", no_cache=True)
    assert "exit code: 7" in failed.value.message
    assert (await sdk.status(failed.value.build_id))["status"] == "failed"


async def test_bad_context_fails_before_any_upload(sdk: BuilderClient, tmp_path: Path) -> None:
    with pytest.raises(ContextError, match="Dockerfile"):
        await sdk.build(tmp_path, image_name="x")
    with pytest.raises(ContextError):
        await sdk.build(tmp_path / "missing", image_name="x")
    assert await sdk.list() == []


async def test_http_errors_carry_status_and_code(sdk: BuilderClient) -> None:
    with pytest.raises(BuilderHTTPError) as error:
        await sdk.status("no-such-build")
    assert (error.value.status, error.value.code) == (404, "build_not_found")


async def test_unknown_build_log_gives_up_after_the_budget(client: TestClient) -> None:
    async with BuilderClient(str(client.make_url("/")), retry=RetryPolicy(budget=1.0)) as sdk:
        with pytest.raises(BuilderHTTPError) as raised:
            async with asyncio.timeout(10):
                async for _ in sdk.logs("never-submitted"):
                    pass
    assert (raised.value.status, raised.value.code) == (404, "build_not_found")
    assert any("gave up" in note for note in raised.value.__notes__)


async def test_unreachable_daemon_is_a_connection_error(tmp_path: Path) -> None:
    async with BuilderClient("http://127.0.0.1:9") as sdk:
        with pytest.raises(BuilderConnectionError):
            await sdk.list()


async def test_follow_survives_cuts_404s_and_503s(client: TestClient, sdk: BuilderClient, tmp_path: Path) -> None:
    proxy = FaultProxy(client.port, not_found_first=4, unavailable_rate=0.15, cut_after=(300, 6000))
    port = await proxy.start()
    context = write_tree(
        tmp_path,
        {
            "Dockerfile": dockerfile(
                'RUN i=0; while [ $i -lt 5000 ]; do i=$((i+1)); echo "n $i"; '
                "if [ $((i % 100)) -eq 0 ]; then sleep 0.02; fi; done"
            )
        },
    )
    lines: list[str] = []
    try:
        async with BuilderClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(first=0.01, cap=0.05)) as proxied:
            result = await proxied.build(context, image_name="sdk-test/faults", no_cache=True, on_log=lines.append)
    finally:
        await proxy.close()
    print(
        f"fault proxy: {proxy.log_requests} log requests, {proxy.cuts} cuts, "
        f"{proxy.not_found} 404s, {proxy.unavailable} 503s; client saw {len(lines)} lines"
    )
    assert result.status == "succeeded"
    assert [line for line in lines if line.startswith("n ")] == [f"n {i}" for i in range(1, 5001)]
    # Every line exactly once, in order: the same as the log read directly from the daemon.
    assert lines == [e.line async for e in sdk.logs(result.build_id) if isinstance(e, LogEvent)]
    assert proxy.not_found == 4 and proxy.unavailable >= 1 and proxy.cuts >= 20


async def test_logs_iterator_yields_typed_events(sdk: BuilderClient, base_image: str) -> None:
    build_id = await sdk.submit_image(base_image, image_name="sdk-test/events")
    events = [event async for event in sdk.logs(build_id)]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    steps = [e for e in events if isinstance(e, StatusEvent) and e.data.get("phase") == "step"]
    assert any(e.data["name"].startswith("[1/1] FROM") for e in steps)
    assert isinstance(events[-1], DoneEvent)
    tail = [event async for event in sdk.logs(build_id, after=len(events) - 1, follow=False)]
    assert tail == events[-1:]


async def test_cancelling_the_caller_deletes_the_remote_build(
    sdk: BuilderClient, tmp_path: Path, docker: aiodocker.Docker
) -> None:
    context = write_tree(tmp_path, {"Dockerfile": dockerfile("RUN echo started && sleep 300")})
    started = asyncio.Event()
    build = asyncio.create_task(
        sdk.build(
            context,
            image_name="sdk-test/interrupted",
            no_cache=True,
            on_log=lambda line: started.set() if line == "started" else None,
        )
    )
    async with asyncio.timeout(30):
        await started.wait()
    build.cancel()
    await asyncio.sleep(0)
    build.cancel()  # a second Ctrl+C while the DELETE is in flight
    with pytest.raises(asyncio.CancelledError):
        await build
    [record] = await sdk.list()
    assert record["status"] == "cancelled"
    with pytest.raises(BuildCancelled):
        await sdk.wait(record["build_id"])
    assert [c for c in await docker.containers.list(all=True) if "sleep 300" in str(c._container.get("Command"))] == []


async def test_lost_submit_answer_is_retried_without_a_second_build(
    client: TestClient, sdk: BuilderClient, tmp_path: Path
) -> None:
    proxy = FaultProxy(client.port, lose_post_answers=2)
    port = await proxy.start()
    context = write_tree(tmp_path, {"Dockerfile": dockerfile("RUN echo once")})
    try:
        async with BuilderClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(first=0.01, cap=0.05)) as proxied:
            result = await proxied.build(context, image_name="sdk-test/idempotent", no_cache=True)
    finally:
        await proxy.close()
    assert proxy.lost_answers == 2
    assert result.status == "succeeded"
    assert [b["build_id"] for b in await sdk.list()] == [result.build_id]
