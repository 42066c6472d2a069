"""Publishing to a real registry (Debian's docker-registry) through the real engine."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import dockerfile, log_lines, read_log, step_events, submit, wait_for
from tests.processes import free_port

pytestmark = pytest.mark.usefixtures("builder")

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


async def _app(aiohttp_client: Any, settings: Settings, **changes: Any) -> TestClient:
    return await aiohttp_client(create_app(dataclasses.replace(settings, **changes)))


def _push_events(frames: list[tuple[int, dict[str, Any]]], phase: str = "push") -> list[dict[str, Any]]:
    return [data for _, data in frames if data["type"] == "status" and data.get("phase") == phase]


async def test_push_gives_a_digest_that_the_registry_serves_and_pull_resolves(
    aiohttp_client: Any, settings: Settings, registry: str, docker: aiodocker.Docker
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry)
    accepted = await submit(
        client, {"Dockerfile": dockerfile(f"RUN echo {uuid.uuid4()} > /id")}, image_name="publish-test/app:v1"
    )
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    digest = status["image_digest"]
    assert status["image_ref"] == f"{registry}/publish-test/app:v1"
    assert digest.startswith("sha256:") and len(digest) == 71
    assert status["image_ref_digest"] == f"{registry}/publish-test/app@{digest}"

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{registry}/v2/publish-test/app/manifests/v1", headers={"Accept": MANIFEST_V2}) as response,
    ):
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest

    frames = await read_log(client, accepted["build_id"])
    pushes = _push_events(frames)
    assert pushes[0]["image_ref"] == status["image_ref"] and pushes[-1]["digest"] == digest
    assert len(pushes) < 40  # rate-limited, not one per chunk
    assert frames[-1][1]["image_ref"] == status["image_ref"]
    print(f"push of the test image took {pushes[-1]['seconds']:.3f}s")

    # From a clean state, the digest reference pulls.
    await docker.images.delete(status["image_id"], force=True)
    await docker.images.pull(status["image_ref_digest"])
    assert (await docker.images.inspect(status["image_ref_digest"]))["Id"] == status["image_id"]
    await docker.images.delete(status["image_ref_digest"], force=True)


async def test_push_to_a_registry_that_is_down_fails_and_keeps_the_local_image(
    aiohttp_client: Any, settings: Settings, docker: aiodocker.Docker
) -> None:
    client = await _app(aiohttp_client, settings, registry=f"127.0.0.1:{free_port()}")
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN true")}, image_name="publish-test/down")
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "failed"
    assert "push of" in status["error"] and "failed" in status["error"]
    assert status["image_digest"] is None
    assert (await docker.images.inspect("publish-test/down:latest"))["Id"] == status["image_id"]


async def test_no_keep_local_removes_the_local_image_after_the_push(
    aiohttp_client: Any, settings: Settings, registry: str, docker: aiodocker.Docker
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry, keep_local=False)
    accepted = await submit(
        client, {"Dockerfile": dockerfile(f"RUN echo {uuid.uuid4()}")}, image_name="publish-test/remote-only"
    )
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    for ref in ("publish-test/remote-only:latest", status["image_ref"]):
        with pytest.raises(aiodocker.DockerError):
            await docker.images.inspect(ref)


async def test_delete_during_push_stops_it_and_cancels(
    aiohttp_client: Any, settings: Settings, registry: str, docker: aiodocker.Docker
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry)
    big = dockerfile("RUN head -c 400000000 /dev/urandom > /big")
    accepted = await submit(client, {"Dockerfile": big}, image_name="publish-test/big")
    build_id = accepted["build_id"]
    async with aiohttp.ClientSession() as http:
        response = await client.get(f"/builds/{build_id}/logs", headers={"Accept": "text/event-stream"})
        async for raw in response.content:
            if raw.startswith(b"data: ") and json.loads(raw[6:]).get("phase") == "push":
                break
        response.close()
        deleted = await client.delete(f"/builds/{build_id}")
        body = await deleted.json()
        # 200 (not 202 after --cancel-wait): the push was dropped, not waited for.
        assert deleted.status == 200 and body["status"] == "cancelled"
        async with http.get(
            f"http://{registry}/v2/publish-test/big/manifests/latest", headers={"Accept": MANIFEST_V2}
        ) as manifest:
            assert manifest.status == 404
    for ref in ("publish-test/big:latest", f"{registry}/publish-test/big:latest"):
        with pytest.raises(aiodocker.DockerError):
            await docker.images.inspect(ref)


async def test_cache_key_reuses_layers_through_the_registry(
    aiohttp_client: Any, settings: Settings, registry: str, docker: aiodocker.Docker, builder: str
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry)
    files = {"Dockerfile": dockerfile(f"RUN echo {uuid.uuid4()} && sleep 2", "RUN echo second-step")}
    key = f"key-{uuid.uuid4()}"
    first = await submit(client, files, image_name="publish-test/cached", cache_key=key, no_cache="false")
    first_status = await wait_for(client, first["build_id"], {"succeeded", "failed"})
    assert first_status["status"] == "succeeded", first_status
    # Forget everything local: the layers can only come back from the registry's cache image.
    await docker.images.delete(first_status["image_id"], force=True)

    second = await submit(client, files, image_name="publish-test/cached", cache_key=key, no_cache="false")
    second_status = await wait_for(client, second["build_id"], {"succeeded", "failed"})
    assert second_status["status"] == "succeeded", second_status
    frames = await read_log(client, second["build_id"])
    if builder == "legacy":
        lines = log_lines(frames)
        assert lines.count(" ---> Using cache") == 2
        assert not [line for line in lines if line.startswith(" ---> Running in")]
    else:
        runs = [step for step in step_events(frames) if " RUN " in step["name"]]
        assert {step["state"] for step in runs} == {"cached"} and len(runs) == 2, runs
    assert _push_events(frames, phase="cache")
    wall = [(_parse(s["finished_at"]) - _parse(s["started_at"])) for s in (first_status, second_status)]
    print(f"cache_key wall times: first {wall[0]:.2f}s, second {wall[1]:.2f}s")


def _parse(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stand_in(tmp_path: Path, exit_code: int) -> Path:
    """A stand-in for nydusify (the real tool is not installable here): records its arguments."""
    script = tmp_path / "nydusify-stand-in"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/nydusify-args\necho "converting"\nexit {exit_code}\n')
    script.chmod(0o755)
    return script


async def test_nydus_conversion_runs_after_the_push(
    aiohttp_client: Any, settings: Settings, registry: str, tmp_path: Path
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry, nydusify=str(_stand_in(tmp_path, 0)))
    accepted = await submit(client, {"Dockerfile": dockerfile()}, image_name="publish-test/nydus", nydus_convert="true")
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    source = status["image_ref"]
    assert status["nydus_image_ref"] == f"{source}-nydus"
    assert status["nydus_status"] == "performed"
    args = (tmp_path / "nydusify-args").read_text().split()
    assert args == [
        "convert",
        "--source",
        source,
        "--target",
        f"{source}-nydus",
        "--source-insecure",
        "--target-insecure",
    ]


async def test_failed_nydus_conversion_is_reported_not_hidden(
    aiohttp_client: Any, settings: Settings, registry: str, tmp_path: Path
) -> None:
    client = await _app(aiohttp_client, settings, registry=registry, nydusify=str(_stand_in(tmp_path, 3)))
    accepted = await submit(
        client, {"Dockerfile": dockerfile()}, image_name="publish-test/nydus-bad", nydus_convert="1"
    )
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    # The conversion failed, and says so; the pushed image stands and the build succeeded.
    assert status["status"] == "succeeded" and status["image_digest"], status
    assert status["nydus_image_ref"] is None
    assert status["nydus_status"].startswith("failed: nydusify exited with 3")
