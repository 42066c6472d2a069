"""BuildKit, the default builder, on the real engine: step events, cache mounts, parallel stages,
--target, failures, cancel, a step shared by two builds, unclipped logs, SSH mounts (not forwarded)."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp.test_utils import TestClient

from tests.conftest import (
    BASE_IMAGE,
    log_lines,
    read_log,
    step_events,
    submit,
    wait_for,
)
from tests.steps import processes_running, unique_sleep, wait_for_process


def _states(steps: list[dict], name_part: str) -> list[str]:
    return [step["state"] for step in steps if name_part in step["name"]]


async def test_steps_are_numbered_status_events_and_lines_carry_step_and_stream(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN echo out-line && echo err-line >&2\n"})
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "succeeded" and status["builder"] == "buildkit"
    frames = await read_log(client, accepted["build_id"])
    steps = step_events(frames)
    run = [step for step in steps if step["name"] == "[2/2] RUN echo out-line && echo err-line >&2"]
    assert [step["state"] for step in run] == ["started", "done"]
    assert run[1]["duration"] >= 0 and run[0]["step"] == run[1]["step"]
    # No event repeats, and each step keeps its number.
    assert len({(s["step"], s["state"]) for s in steps}) == len(steps)
    assert len({s["step"] for s in steps}) == len({s["name"] for s in steps})
    lines = {data["line"]: data for _, data in frames if data["type"] == "log"}
    assert lines["out-line"]["stream"] == "stdout" and lines["err-line"]["stream"] == "stderr"
    assert lines["out-line"]["step"] == run[0]["step"] == lines["err-line"]["step"]


async def test_independent_stages_run_in_parallel(client: TestClient) -> None:
    dockerfile = (
        f"FROM {BASE_IMAGE} AS left\nRUN sleep 1.5 && echo left > /left\n"
        f"FROM {BASE_IMAGE} AS right\nRUN sleep 1.5 && echo right > /right\n"
        f"FROM {BASE_IMAGE}\nCOPY --from=left /left /left\nCOPY --from=right /right /right\nRUN cat /left /right\n"
    )
    accepted = await submit(client, {"Dockerfile": dockerfile})
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    frames = await read_log(client, accepted["build_id"])
    order = [(s["name"], s["state"]) for s in step_events(frames) if "sleep 1.5" in s["name"]]
    # Both sleeping steps started before either was done: their time spans overlap.
    assert [state for _, state in order] == ["started", "started", "done", "done"], order
    assert log_lines(frames)[-2:] == ["left", "right"]


async def test_cache_mount_is_reused_by_the_next_build(client: TestClient) -> None:
    cache_id = f"test-{uuid.uuid4()}"
    mount = f"RUN --mount=type=cache,id={cache_id},target=/cache"
    # Cache mounts outlive a build, not `no_cache`: the steps differ, so nothing else is reused.
    first = await submit(
        client, {"Dockerfile": f"FROM {BASE_IMAGE}\n{mount} echo {cache_id} > /cache/seen\n"}, no_cache="false"
    )
    assert (await wait_for(client, first["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    second = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\n{mount} cat /cache/seen\n"}, no_cache="false")
    assert (await wait_for(client, second["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert cache_id in log_lines(await read_log(client, second["build_id"]))


async def test_target_skips_stages_the_target_does_not_need(client: TestClient) -> None:
    dockerfile = (
        f"FROM {BASE_IMAGE} AS unused\nRUN echo unused-stage-ran\n"
        f"FROM {BASE_IMAGE} AS wanted\nRUN echo wanted-stage-ran\n"
        f"FROM {BASE_IMAGE} AS after\nRUN echo after-stage-ran\n"
    )
    accepted = await submit(client, {"Dockerfile": dockerfile}, target="wanted")
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}))["status"] == "succeeded"
    frames = await read_log(client, accepted["build_id"])
    assert "wanted-stage-ran" in log_lines(frames)
    said = log_lines(frames) + [s["name"] for s in step_events(frames)]
    assert not [line for line in said if "unused-stage-ran" in line or "after-stage-ran" in line]


async def test_failing_step_is_an_error_event_and_fails_the_build(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN echo before && exit 3\n"})
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "failed" and "exit code: 3" in status["error"]
    frames = await read_log(client, accepted["build_id"])
    assert _states(step_events(frames), "exit 3") == ["started", "error"]
    assert "before" in log_lines(frames)


async def test_cancel_mid_step_kills_the_step_and_marks_it_cancelled(client: TestClient) -> None:
    sleep = unique_sleep()
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN {sleep}\n"})
    await wait_for_process(sleep)
    response = await client.delete(f"/builds/{accepted['build_id']}")
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    assert processes_running(sleep) == []
    frames = await read_log(client, accepted["build_id"])
    assert _states(step_events(frames), sleep) == ["started", "cancelled"]


async def test_cancelling_one_of_two_builds_sharing_a_step_leaves_the_other_succeeding(client: TestClient) -> None:
    # The same step in both builds, with the cache cold: BuildKit runs it once for both.
    sleep = unique_sleep().replace("sleep ", "sleep 0.")
    files = {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN echo shared && {sleep} && echo shared-done\n"}
    first = await submit(client, files, no_cache="false")
    second = await submit(client, files, no_cache="false")
    await wait_for_process(sleep)
    response = await client.delete(f"/builds/{first['build_id']}")
    assert (await response.json())["status"] == "cancelled"
    status = await wait_for(client, second["build_id"], {"succeeded", "failed"}, timeout=60)
    assert status["status"] == "succeeded", status
    assert "shared-done" in log_lines(await read_log(client, second["build_id"]))


async def test_two_hundred_thousand_lines_arrive_exactly_and_in_order(client: TestClient) -> None:
    # In bursts of 10,000 lines (68 KiB): the engine itself wedges when over 1 MiB of output waits
    # in it (test_trace.py), and a busy machine can hold it up that long in one unpaced burst.
    script = "for i in $(seq 0 19); do seq $((i * 10000 + 1)) $((i * 10000 + 10000)); sleep 0.05; done"
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN {script}\n"})
    assert (await wait_for(client, accepted["build_id"], {"succeeded", "failed"}, timeout=120))["status"] == "succeeded"
    frames = await read_log(client, accepted["build_id"])
    numbers = [line for line in log_lines(frames) if line.isdigit()]
    assert numbers == [str(n) for n in range(1, 200001)]
    assert not [data for _, data in frames if data.get("phase") == "log_clipped"]


async def test_a_busy_daemon_loop_does_not_hold_up_the_engine(client: TestClient) -> None:
    # 400,000 lines at 1.3 MB/s while the daemon's loop is held for 2 s: read on that loop, over
    # 1 MiB of output would wait in the engine meanwhile and wedge it (its BuildKit then sends empty
    # messages for ever). Read on a thread, nothing waits. Paced, because at full speed a machine
    # short of CPU can hold the engine's own sender up that long (test_trace.py).
    script = "for i in $(seq 0 39); do seq $((i * 10000 + 1)) $((i * 10000 + 10000)); sleep 0.05; done"
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN {script} # {uuid.uuid4()}\n"})
    build_id = accepted["build_id"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (await (await client.get(f"/builds/{build_id}")).json())["last_event_id"] < 1000:
        assert loop.time() < deadline, "the step never started printing"
        await asyncio.sleep(0.01)
    held_until = time.monotonic() + 2
    while time.monotonic() < held_until:
        pass  # the loop busy, holding the GIL, as a long piece of work would
    status = await wait_for(client, build_id, {"succeeded", "failed"}, timeout=120)
    assert status["status"] == "succeeded", status["error"]
    numbers = [line for line in log_lines(await read_log(client, build_id)) if line.isdigit()]
    assert numbers == [str(n) for n in range(1, 400001)]


async def test_ssh_mount_fails_naming_ssh_forwarding(client: TestClient) -> None:
    # The daemon forwards no SSH agent; a build with no secrets has no BuildKit session at all.
    accepted = await submit(client, {"Dockerfile": f"FROM {BASE_IMAGE}\nRUN --mount=type=ssh,required=true true\n"})
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    assert status["status"] == "failed"
    assert "RUN --mount=type=ssh needs SSH agent forwarding" in status["error"], status["error"]
