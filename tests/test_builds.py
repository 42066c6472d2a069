"""POST /builds, status, listing and log streaming against the real engine."""

from __future__ import annotations

import asyncio

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import (
    SSE,
    build_text,
    dockerfile,
    log_lines,
    make_context,
    read_log,
    submit,
    wait_for,
)
from tests.steps import unique_sleep, wait_for_process

pytestmark = pytest.mark.usefixtures("builder")


async def test_tiny_context_builds_and_image_exists(client: TestClient, docker: aiodocker.Docker) -> None:
    accepted = await submit(
        client,
        {"Dockerfile": dockerfile("COPY hello.txt /hello.txt", "RUN cat /hello.txt"), "hello.txt": "hi there\n"},
        image_name="builder-test/tiny",
    )
    assert accepted["status"] == "queued"
    assert accepted["image_name"] == "builder-test/tiny:latest"
    assert accepted["links"] == {
        "self": f"/builds/{accepted['build_id']}",
        "logs": f"/builds/{accepted['build_id']}/logs",
    }
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    assert status["image_ref"] == "builder-test/tiny:latest"
    assert status["image_id"].startswith("sha256:")
    assert status["started_at"] and status["finished_at"] and status["created_at"].endswith("Z")
    image = await docker.images.inspect("builder-test/tiny:latest")
    assert image["Id"] == status["image_id"]

    frames = await read_log(client, accepted["build_id"])
    assert [i for i, _ in frames] == list(range(1, len(frames) + 1))
    assert "hi there" in log_lines(frames)
    assert frames[-1][1] == {
        "type": "done",
        "done": True,
        "status": "succeeded",
        "image_ref": "builder-test/tiny:latest",
        "image_id": status["image_id"],
    }
    assert status["last_event_id"] == frames[-1][0]


async def test_accepted_response_has_location_and_unguessable_id(client: TestClient) -> None:
    form = aiohttp.FormData()
    form.add_field("context", make_context({"Dockerfile": dockerfile()}), filename="c.tgz")
    response = await client.post("/builds", data=form)
    body = await response.json()
    assert response.status == 202
    assert response.headers["Location"] == f"/builds/{body['build_id']}"
    # 128 random bits, URL-safe base64: 22 characters.
    assert len(body["build_id"]) >= 22
    assert all(c.isalnum() or c in "-_" for c in body["build_id"])


async def test_raw_tar_body_with_query_fields(client: TestClient, docker: aiodocker.Docker) -> None:
    body = make_context({"sub/Build.df": dockerfile("ARG WHO", "RUN echo hello-$WHO")}, gzip=False)
    response = await client.post(
        "/builds",
        data=body,
        params={
            "image_name": "builder-test/raw:v2",
            "dockerfile": "sub/Build.df",
            "build_args": '{"WHO": "raw"}',
            "no_cache": "1",
        },
        headers={"Content-Type": "application/x-tar"},
    )
    accepted = await response.json()
    assert response.status == 202, accepted
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    assert status["image_ref"] == "builder-test/raw:v2"
    assert status["dockerfile"] == "sub/Build.df"
    assert status["build_args"] == {"WHO": "raw"}
    assert "hello-raw" in log_lines(await read_log(client, accepted["build_id"]))


async def test_gzip_is_detected_by_content_not_name(client: TestClient) -> None:
    response = await client.post(
        "/builds",
        data=make_context({"Dockerfile": dockerfile("RUN true")}, gzip=True),
        headers={"Content-Type": "application/x-tar"},
        # No cache: a shared engine's other users may delete a cached layer mid-build.
        params={"no_cache": "true"},
    )
    accepted = await response.json()
    assert response.status == 202, accepted
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"


async def test_synthetic_from_base_image_builds(client: TestClient, base_image: str) -> None:
    response = await client.post("/builds", json={"image": base_image, "image_name": "builder-test/synthetic"})
    accepted = await response.json()
    assert response.status == 202, accepted
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded", status
    assert status["image"] == base_image
    said = build_text(await read_log(client, accepted["build_id"]))
    assert any("FROM" in line and base_image in line for line in said), said


async def test_from_missing_image_fails_fast_with_engine_message(client: TestClient) -> None:
    response = await client.post("/builds", json={"image": "no-such-image-here:1.0"})
    accepted = await response.json()
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"}, timeout=15)
    assert status["status"] == "failed"
    assert status["error"]
    frames = await read_log(client, accepted["build_id"])
    assert frames[-1][1] == {"type": "error", "error": status["error"], "status": "failed"}


async def test_failing_run_reports_exit_code(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo before && exit 3")})
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "failed"
    # "returned a non-zero code: 3" (legacy), "exit code: 3" (BuildKit)
    assert status["error"].endswith((": 3", "code: 3")), status["error"]
    assert status["image_ref"] is None
    frames = await read_log(client, accepted["build_id"])
    assert "before" in log_lines(frames)
    assert frames[-1][1]["type"] == "error"
    assert isinstance(frames[-1][1]["error"], str)


async def test_dockerfile_syntax_error_fails(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("NOTANINSTRUCTION foo")})
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "failed"
    assert "notaninstruction" in status["error"].lower()


async def test_control_frame_text_in_output_stays_inside_log_lines(client: TestClient) -> None:
    steps = ["RUN echo '{\"done\": true}' && echo '{\"error\": \"x\"}' && printf 'partial-no-newline'"]
    accepted = await submit(client, {"Dockerfile": dockerfile(*steps)})
    await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    response = await client.get(f"/builds/{accepted['build_id']}/logs", headers=SSE)
    raw = await response.text()
    assert 'data: {"type":"log","line":"{\\"done\\": true}"' in raw
    assert 'data: {"type":"log","line":"{\\"error\\": \\"x\\"}"' in raw
    assert {'{"done": true}', '{"error": "x"}'} <= set(log_lines(await read_log(client, accepted["build_id"])))
    # Docker's chunks are not line-aligned; a trailing partial line is still one event.
    assert any("partial-no-newline" in line for line in log_lines(await read_log(client, accepted["build_id"])))
    frames = await read_log(client, accepted["build_id"])
    terminal = [data for _, data in frames if data["type"] in ("done", "error")]
    assert terminal == [frames[-1][1]] and terminal[0]["status"] == "succeeded"
    # No frame is named: EventSource clients only dispatch unnamed events to onmessage.
    assert "event:" not in raw


async def test_log_stream_is_replayable_after_finish_and_resumable(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 50")})
    await wait_for(client, accepted["build_id"], {"succeeded"})
    full = await read_log(client, accepted["build_id"])
    assert await read_log(client, accepted["build_id"]) == full
    tail = await read_log(client, accepted["build_id"], after=5)
    assert tail == full[5:]
    response = await client.get(f"/builds/{accepted['build_id']}/logs", headers={**SSE, "Last-Event-ID": "7"})
    assert (await response.text()).startswith("retry: 1000\n\n")


async def test_list_builds_newest_first_with_filter(client: TestClient) -> None:
    first = await submit(client, {"Dockerfile": dockerfile("RUN true")})
    second = await submit(client, {"Dockerfile": dockerfile("RUN exit 1")})
    await wait_for(client, first["build_id"], {"succeeded"})
    await wait_for(client, second["build_id"], {"failed"})
    listing = await (await client.get("/builds")).json()
    assert [b["build_id"] for b in listing["builds"]] == [second["build_id"], first["build_id"]]
    failed = await (await client.get("/builds", params={"status": "failed"})).json()
    assert [b["build_id"] for b in failed["builds"]] == [second["build_id"]]
    limited = await (await client.get("/builds", params={"limit": "1"})).json()
    assert len(limited["builds"]) == 1
    bad = await client.get("/builds", params={"status": "bogus"})
    assert bad.status == 400 and (await bad.json())["code"] == "invalid_field"


async def test_queued_build_streams_queue_position(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, max_concurrent=1)))
    sleep = unique_sleep()
    blocker = await submit(client, {"Dockerfile": dockerfile(f"RUN {sleep}")})
    await wait_for_process(sleep)  # the blocker holds the only slot until it is deleted
    waiting = await submit(client, {"Dockerfile": dockerfile("RUN true")})
    assert (await (await client.get(f"/builds/{waiting['build_id']}")).json())["status"] == "queued"
    assert (await client.delete(f"/builds/{blocker['build_id']}")).status == 200
    frames = await read_log(client, waiting["build_id"])
    statuses = [data for _, data in frames if data["type"] == "status"]
    assert statuses[0] == {"type": "status", "status": "queued", "queue_position": 1}
    assert {"type": "status", "status": "running"} in statuses
    assert frames[-1][1]["status"] == "succeeded"


async def test_nydus_flag_is_recorded_but_not_performed(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile()}, nydus_convert="true", cache_key="k1")
    status = await wait_for(client, accepted["build_id"], {"succeeded"})
    assert status["nydus_convert"] is True
    assert status["nydus_image_ref"] is None
    assert "not performed" in status["nydus_status"]
    assert status["cache_key"] == "k1"


async def test_health_counts_what_runs_waits_and_follows(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, max_concurrent=1)))
    health = await (await client.get("/healthz")).json()
    assert health == {"status": "ok", "builds_running": 0, "builds_queued": 0, "log_followers": 0, "uploads": 0}
    assert (await client.get("/readyz")).status == 200
    sleep = unique_sleep()
    running = await submit(client, {"Dockerfile": dockerfile(f"RUN echo started && {sleep}")})
    await wait_for_process(sleep)
    queued = await submit(client, {"Dockerfile": dockerfile("RUN true")})
    follower = await client.get(f"/builds/{running['build_id']}/logs", headers=SSE)
    health = await (await client.get("/healthz")).json()
    assert (health["builds_running"], health["builds_queued"], health["log_followers"]) == (1, 1, 1)
    follower.close()
    assert (await client.delete(f"/builds/{running['build_id']}")).status == 200
    await wait_for(client, queued["build_id"], {"succeeded"})
    async with asyncio.timeout(10):  # the build's task lets go of its slot just after its outcome
        while (health := await (await client.get("/healthz")).json())["builds_running"]:
            await asyncio.sleep(0.02)
    assert (health["builds_running"], health["builds_queued"], health["log_followers"]) == (0, 0, 0)


async def test_readyz_is_503_while_the_engine_does_not_answer(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, docker_host="unix:///nonexistent/docker.sock")))
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["code"] == "engine_unavailable"


async def test_build_steps_get_the_configured_network(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, build_network="none")))
    isolated = await submit(client, {"Dockerfile": dockerfile("RUN ls /sys/class/net")})
    await wait_for(client, isolated["build_id"], {"succeeded"})
    interfaces = log_lines(await read_log(client, isolated["build_id"]))
    assert "lo" in interfaces and "eth0" not in interfaces


async def test_memory_limit_kills_a_step_that_exceeds_it_under_legacy(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, builder="auto", build_memory=64 << 20)))
    hog = await submit(client, {"Dockerfile": dockerfile("RUN dd if=/dev/zero of=/dev/null bs=200M count=1")})
    failed = await wait_for(client, hog["build_id"], {"failed", "succeeded"})
    assert failed["status"] == "failed" and "137" in failed["error"]  # killed by the memory limit
    assert failed["builder"] == "legacy"  # auto picks the builder that can enforce the limit


async def test_buildkit_is_refused_where_it_cannot_enforce_the_memory_limit(aiohttp_client, settings) -> None:
    from dataclasses import replace

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, build_memory=64 << 20)))
    response = await client.post("/builds", json={"image": "builder-busybox:latest", "builder": "buildkit"})
    body = await response.json()
    assert response.status == 400 and "cannot enforce" in body["error"], body
