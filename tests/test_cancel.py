"""DELETE /builds/{id}: complete teardown on the real engine, under both builders."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import (
    dockerfile,
    log_lines,
    read_log,
    submit,
    wait_for,
    wait_for_line,
)
from tests.steps import processes_running, unique_sleep, wait_for_process

pytestmark = pytest.mark.usefixtures("builder")


def sleeper(sleep: str) -> dict[str, str]:
    """A build whose second step runs `sleep` (unique to the test) until it is torn down."""
    return {
        "Dockerfile": dockerfile("COPY marker /marker", f"RUN echo started && {sleep}", "RUN echo never"),
        "marker": str(time.time()),
    }


async def _step_images_left(client: TestClient, docker: aiodocker.Docker, build_id: str) -> list[str]:
    """Images the build's steps committed (every ` ---> <id>` after the FROM step) that still exist."""
    lines = log_lines(await read_log(client, build_id))
    ids = [m.group(1) for line in lines if (m := re.fullmatch(r" ---> ([0-9a-f]{12})", line))][1:]
    assert ids, "the build committed no step image"
    left = []
    for image in ids:
        try:
            await docker.images.inspect(image)
            left.append(image)
        except aiodocker.DockerError:
            pass
    return left


async def _step_containers(client: TestClient, build_id: str) -> list[str]:
    frames = await read_log(client, build_id)
    return [m.group(1) for line in log_lines(frames) if (m := re.fullmatch(r" ---> Running in (\w+)", line))]


async def _containers_matching(docker: aiodocker.Docker, ids: list[str]) -> list[dict[str, Any]]:
    return [c._container for c in await docker.containers.list(all=True) if any(c.id.startswith(i) for i in ids)]


async def test_delete_during_run_tears_everything_down(
    client: TestClient, docker: aiodocker.Docker, settings: Settings, builder: str
) -> None:
    sleep = unique_sleep()
    accepted = await submit(client, sleeper(sleep), image_name="builder-test/cancelled")
    build_id = accepted["build_id"]
    await wait_for_process(sleep)
    # The spooled context went as soon as the engine had all of it.
    assert list(settings.spool_dir.iterdir()) == []
    response = await client.delete(f"/builds/{build_id}")
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "cancelled"
    assert body["error"] == "build cancelled by request"
    # DELETE answered once the step's process was gone.
    assert processes_running(sleep) == []

    if builder == "legacy":
        containers = await _step_containers(client, build_id)
        assert containers, "the log named no step container"
        assert await _containers_matching(docker, containers) == []
        # No new dangling image: every image the build's steps committed is gone (checked by id,
        # so that other users of the same engine cannot make this pass or fail).
        assert await _step_images_left(client, docker, build_id) == []
    assert list(settings.spool_dir.iterdir()) == []
    images = await docker.images.list(filters={"reference": ["builder-test/cancelled"]})
    assert images == []
    frames = await read_log(client, build_id)
    assert frames[-1][1] == {"type": "error", "error": "build cancelled by request", "status": "cancelled"}
    assert "never" not in log_lines(frames)
    # Still queryable afterwards.
    assert (await (await client.get(f"/builds/{build_id}")).json())["status"] == "cancelled"


async def test_delete_right_after_submit_leaves_no_step_running(client: TestClient) -> None:
    sleep = unique_sleep()
    accepted = await submit(client, sleeper(sleep))
    response = await client.delete(f"/builds/{accepted['build_id']}")
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "cancelled"
    assert processes_running(sleep) == []
    # Had the step started late, a cancelled build would leave it running: give it time to show.
    await asyncio.sleep(1)
    assert processes_running(sleep) == []


async def test_delete_queued_build(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_concurrent=1)))
    blocker = await submit(client, sleeper(unique_sleep()))
    queued = await submit(client, {"Dockerfile": dockerfile("RUN echo queued")})
    assert (await (await client.get(f"/builds/{queued['build_id']}")).json())["status"] == "queued"
    response = await client.delete(f"/builds/{queued['build_id']}")
    body = await response.json()
    assert response.status == 200
    assert body["status"] == "cancelled" and body["started_at"] is None
    frames = await read_log(client, queued["build_id"])
    assert frames[-1][1]["status"] == "cancelled"
    assert (await (await client.get(f"/builds/{blocker['build_id']}")).json())["status"] == "running"
    assert (await client.delete(f"/builds/{blocker['build_id']}")).status == 200
    assert list(settings.spool_dir.iterdir()) == []


async def test_delete_twice_and_delete_finished_build_are_idempotent(client: TestClient) -> None:
    accepted = await submit(client, sleeper(unique_sleep()))
    await wait_for_line(client, accepted["build_id"], "started")
    first = await client.delete(f"/builds/{accepted['build_id']}")
    second = await client.delete(f"/builds/{accepted['build_id']}")
    assert first.status == second.status == 200
    assert await first.json() == await second.json()

    done = await submit(client, {"Dockerfile": dockerfile("RUN true")})
    finished = await wait_for(client, done["build_id"], {"succeeded"})
    response = await client.delete(f"/builds/{done['build_id']}")
    assert response.status == 200
    assert await response.json() == finished


async def test_delete_unknown_build_is_404(client: TestClient) -> None:
    response = await client.delete("/builds/nope")
    assert response.status == 404
    assert (await response.json())["code"] == "build_not_found"


async def test_delete_answers_202_when_teardown_outlasts_the_wait(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, cancel_wait=0.0)))
    accepted = await submit(client, sleeper(unique_sleep()))
    await wait_for_line(client, accepted["build_id"], "started")
    response = await client.delete(f"/builds/{accepted['build_id']}")
    assert response.status == 202
    assert (await wait_for(client, accepted["build_id"], {"cancelled"}, timeout=10))["status"] == "cancelled"


async def test_build_timeout_tears_down_like_delete(client: TestClient, docker: aiodocker.Docker, builder: str) -> None:
    sleep = unique_sleep()
    accepted = await submit(client, sleeper(sleep), timeout="3")
    await wait_for_process(sleep)
    status = await wait_for(client, accepted["build_id"], {"failed", "succeeded", "cancelled"}, timeout=30)
    assert status["status"] == "failed"
    assert status["error"] == "timed out after 3s"
    assert status["timeout"] == 3
    assert processes_running(sleep) == []
    if builder == "legacy":
        containers = await _step_containers(client, accepted["build_id"])
        assert containers and await _containers_matching(docker, containers) == []
        assert await _step_images_left(client, docker, accepted["build_id"]) == []


async def test_timeout_above_the_daemons_limit_is_refused(client: TestClient, settings: Settings) -> None:
    form_fields = {"timeout": str(settings.build_timeout + 1)}
    response = await client.post("/builds", json={"image": "builder-busybox:latest", **form_fields})
    assert response.status == 400
    assert "timeout may be at most" in (await response.json())["error"]
    assert list(settings.spool_dir.iterdir()) == []


async def test_full_queue_answers_429_with_retry_after(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_concurrent=1, max_queue=1)))
    running = await submit(client, sleeper(unique_sleep()))
    await wait_for_line(client, running["build_id"], "started")
    await submit(client, {"Dockerfile": dockerfile("RUN true")})
    refused = await client.post("/builds", json={"image": "builder-busybox:latest"})
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "10"
    assert (await refused.json())["code"] == "queue_full"
    assert len(list(settings.spool_dir.iterdir())) == 1  # the queued build's context, nothing more
    assert (await client.delete(f"/builds/{running['build_id']}")).status == 200


async def test_legacy_teardown_acts_only_on_ids_the_engine_confirms(
    aiohttp_client: Any, settings: Settings, docker: aiodocker.Docker, base_image: str
) -> None:
    """A build that prints another build's step container and image ids, as the legacy builder's
    own control lines would name them, then is cancelled (or fails): both foreign things survive."""
    client = await aiohttp_client(create_app(dataclasses.replace(settings, builder="legacy")))
    foreign_sleep = unique_sleep()
    foreign = await docker.containers.run(config={"Image": base_image, "Cmd": foreign_sleep.split()})
    # Another build's layer: an image of its own, with exactly one tag (removable by id).
    foreign_tag = f"builder-test/foreign:{time.time_ns()}"
    await foreign.commit(repository="builder-test/foreign", tag=foreign_tag.rsplit(":", 1)[1])
    foreign_image = (await docker.images.inspect(foreign_tag))["Id"].removeprefix("sha256:")[:12]
    try:
        forged = (
            f"echo ' ---> Running in {foreign.id[:12]}' && echo ' ---> {foreign_image}' && "
            f"echo 'Successfully built {foreign_image}'"
        )
        sleep = unique_sleep()
        cancelled = await submit(client, {"Dockerfile": dockerfile(f"RUN {forged} && {sleep}")})
        await wait_for_process(sleep)
        assert (await (await client.delete(f"/builds/{cancelled['build_id']}")).json())["status"] == "cancelled"
        failing = await submit(client, {"Dockerfile": dockerfile(f"RUN {forged} && exit 1")})
        assert (await wait_for(client, failing["build_id"], {"failed", "succeeded"}))["status"] == "failed"

        assert (await foreign.show())["State"]["Running"]
        assert processes_running(foreign_sleep)
        assert (await docker.images.inspect(foreign_tag))["Id"].removeprefix("sha256:").startswith(foreign_image)
        # The forged lines were printed, and teardown still ran for the build's own step container.
        assert f" ---> Running in {foreign.id[:12]}" in log_lines(await read_log(client, cancelled["build_id"]))
        assert processes_running(sleep) == []
    finally:
        await foreign.delete(force=True)
        await docker.images.delete(foreign_tag)
