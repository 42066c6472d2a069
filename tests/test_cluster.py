"""Cluster mode, with real parts only: three `builder serve` replicas sharing one redis-server,
on two Docker engines (r0 and r2 on the first, r1 on the second), behind nginx round-robin."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiodocker
import aiohttp
import pytest

from builder.client.sse import SSEDecoder
from builder.protocol import REPLICA_HEADER
from tests.conftest import BASE_IMAGE, SSE, TERMINAL, make_context
from tests.processes import DaemonProcess, NginxProxy, RedisServer, StartDaemon
from tests.steps import processes_running, unique_sleep, wait_for_process

LEASE_TTL = 2.0


@dataclasses.dataclass
class Cluster:
    replicas: list[DaemonProcess]
    url: str  # nginx in front of them all
    redis: RedisServer
    session: aiohttp.ClientSession

    async def submit(self, base: str, dockerfile: str, **params: str) -> str:
        async with self.session.post(
            f"{base}/builds",
            data=make_context({"Dockerfile": dockerfile}),
            params={"no_cache": "true", **params},
            headers={"Content-Type": "application/gzip"},
        ) as response:
            assert response.status == 202, await response.text()
            return str((await response.json())["build_id"])

    async def status(self, base: str, build_id: str) -> dict[str, Any]:
        async with self.session.get(f"{base}/builds/{build_id}") as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def wait_for(self, base: str, build_id: str, timeout: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while (status := await self.status(base, build_id))["status"] not in TERMINAL:
                await asyncio.sleep(0.05)
        return status

    async def cancel_unfinished(self) -> None:
        """Before the daemons are killed: the engine's BuildKit (20.10) can deadlock for good when
        a client vanishes in the middle of a build, so none is left running."""
        live = next(r.url for r in self.replicas if r.proc.poll() is None)
        async with self.session.get(f"{live}/builds", params={"limit": "500"}) as response:
            builds = (await response.json())["builds"]
        for build in builds:
            if build["status"] not in TERMINAL:
                async with self.session.delete(f"{live}/builds/{build['build_id']}") as response:
                    assert response.status == 200, await response.text()

    async def follow(self, base: str, build_id: str) -> list[tuple[int, dict[str, Any]]]:
        """The whole log, followed live until its terminal frame, from one replica."""
        decoder = SSEDecoder()
        frames = []
        async with self.session.get(f"{base}/builds/{build_id}/logs", headers=SSE) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                frames += [(int(e.id), json.loads(e.data)) for e in decoder.feed(chunk)]
        return frames


@pytest.fixture
async def cluster(
    redis_server: RedisServer, nginx_proxy: NginxProxy, daemon_process: StartDaemon, second_engine: str
) -> AsyncIterator[Cluster]:
    engines = [[], ["--docker-host", second_engine], []]
    replicas = [
        daemon_process("--redis-url", redis_server.url, "--replica-id", f"r{i}", "--lease-ttl", str(LEASE_TTL), *engine)
        for i, engine in enumerate(engines)
    ]
    for replica in replicas:
        await replica.ready()
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(replicas, nginx_proxy([r.url for r in replicas]), redis_server, session)
        yield cluster
        await cluster.cancel_unfinished()


def echo(text: str) -> str:
    return f"FROM {BASE_IMAGE}\nRUN echo {text}\n"


async def test_builds_through_nginx_run_on_every_replica_and_its_own_engine(
    cluster: Cluster, docker: aiodocker.Docker, second_docker: aiodocker.Docker
) -> None:
    build_ids = [await cluster.submit(cluster.url, echo(uuid.uuid4().hex)) for _ in range(6)]
    finished = [await cluster.wait_for(cluster.url, build_id) for build_id in build_ids]
    assert {s["status"] for s in finished} == {"succeeded"}
    assert sorted(s["replica"] for s in finished) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    for status in finished:
        own, other = (second_docker, docker) if status["replica"] == "r1" else (docker, second_docker)
        assert (await own.images.inspect(status["image_id"]))["Id"] == status["image_id"]
        with pytest.raises(aiodocker.DockerError):
            await other.images.inspect(status["image_id"])


async def test_a_log_resumed_through_nginx_200_times_across_replicas_is_exact(cluster: Cluster) -> None:
    # 3,000 lines over about 2 s; the follower takes 15 events per connection, then cuts it and
    # resumes with Last-Event-ID: each reconnect goes to the next replica.
    script = "for i in $(seq 0 29); do seq $((i * 100 + 1)) $((i * 100 + 100)); sleep 0.07; done"
    build_id = await cluster.submit(cluster.url, f"FROM {BASE_IMAGE}\nRUN {script}\n")
    last, cuts, ids, lines, replicas = 0, 0, [], [], set()
    done = False
    async with asyncio.timeout(120):
        while not done:
            headers = {**SSE, "Last-Event-ID": str(last)} if last else SSE
            async with cluster.session.get(f"{cluster.url}/builds/{build_id}/logs", headers=headers) as response:
                assert response.status == 200
                replicas.add(response.headers[REPLICA_HEADER])
                decoder, taken = SSEDecoder(), 0
                async for chunk in response.content.iter_any():
                    for event in decoder.feed(chunk):
                        if taken == 15 or done:
                            break
                        data = json.loads(event.data)
                        ids.append(int(event.id))
                        last = int(event.id)
                        lines += [data["line"]] if data["type"] == "log" else []
                        done = data["type"] in ("done", "error")
                        taken += 1
                    if taken == 15 or done:
                        break
            cuts += 0 if done else 1
    assert cuts >= 200, cuts
    assert replicas == {"r0", "r1", "r2"}
    assert ids == list(range(1, len(ids) + 1))
    assert [line for line in lines if line.isdigit()] == [str(n) for n in range(1, 3001)]
    assert (await cluster.status(cluster.url, build_id))["status"] == "succeeded"


async def test_delete_through_a_replica_that_does_not_own_the_build_ends_its_step(cluster: Cluster) -> None:
    owner, other = cluster.replicas[1], cluster.replicas[0]
    sleep = unique_sleep()
    build_id = await cluster.submit(owner.url, f"FROM {BASE_IMAGE}\nRUN {sleep}\n")
    await wait_for_process(sleep)
    started = time.monotonic()
    async with cluster.session.delete(f"{other.url}/builds/{build_id}") as response:
        # 200: the owner (on the second engine) tore the build down and recorded it cancelled.
        assert response.status == 200, await response.text()
        assert (await response.json())["status"] == "cancelled"
    assert processes_running(sleep) == [], "the step still runs on the owner's engine"
    assert time.monotonic() - started < 5  # the bound in the issue is 1 s: scripts/bench measures it
    frames = await cluster.follow(cluster.replicas[2].url, build_id)
    assert frames[-1][1]["status"] == "cancelled"


async def test_a_killed_replica_fails_its_builds_for_followers_elsewhere_and_leaves_nothing_behind(
    cluster: Cluster, second_docker: aiodocker.Docker
) -> None:
    victim = cluster.replicas[1]
    sleeps = [unique_sleep(), unique_sleep()]
    running = await cluster.submit(victim.url, f"FROM {BASE_IMAGE}\nRUN echo started && {sleeps[0]}\n")
    legacy = await cluster.submit(victim.url, f"FROM {BASE_IMAGE}\nRUN {sleeps[1]}\n", builder="legacy")
    for sleep in sleeps:
        await wait_for_process(sleep)
    followers = [
        asyncio.create_task(cluster.follow(replica.url, build_id))
        for replica in (cluster.replicas[0], cluster.replicas[2])
        for build_id in (running, legacy)
    ]
    await asyncio.sleep(0.5)  # the followers are attached, and live
    assert not any(task.done() for task in followers)
    victim.kill()
    killed = time.monotonic()
    async with asyncio.timeout(LEASE_TTL + 2 + 1):  # the reaper looks every TTL/2
        logs = await asyncio.gather(*followers)
    reaped_after = time.monotonic() - killed
    for frames in logs:
        assert frames[-1][1] == {"type": "error", "status": "failed", "error": "replica r1 lost"}, frames[-1]
    for build_id in (running, legacy):
        status = await cluster.status(cluster.url, build_id)
        assert (status["status"], status["error"]) == ("failed", "replica r1 lost")
    # BuildKit cancels a build whose /build connection closed; the legacy builder's step runs on.
    buildkit_gone = not processes_running(sleeps[0])
    await victim.restart().ready()
    async with asyncio.timeout(20):
        while any(processes_running(sleep) for sleep in sleeps):
            await asyncio.sleep(0.1)
    commands = [json.dumps((await c.show())["Config"]["Cmd"]) for c in await second_docker.containers.list(all=True)]
    assert [command for command in commands if sleeps[1] in command] == [], "a step container is left"
    print(f"reaped {reaped_after:.2f} s after SIGKILL; BuildKit step gone before the restart: {buildkit_gone}")


async def test_one_idempotency_key_sent_to_two_replicas_at_once_makes_one_build(cluster: Cluster) -> None:
    context = make_context({"Dockerfile": echo(uuid.uuid4().hex)})
    key = uuid.uuid4().hex

    async def post(base: str) -> tuple[int, str]:
        async with cluster.session.post(
            f"{base}/builds",
            data=context,
            headers={"Content-Type": "application/gzip", "Idempotency-Key": key},
        ) as response:
            return response.status, (await response.json())["build_id"]

    answers = await asyncio.gather(*(post(r.url) for r in cluster.replicas[:2]))
    assert sorted(status for status, _ in answers) == [200, 202], answers
    assert answers[0][1] == answers[1][1]
    async with cluster.session.get(f"{cluster.url}/builds", params={"limit": "100"}) as response:
        assert [b["build_id"] for b in (await response.json())["builds"]] == [answers[0][1]]


async def test_a_redis_restart_mid_build_loses_no_event(cluster: Cluster) -> None:
    script = "for i in $(seq 0 39); do seq $((i * 100 + 1)) $((i * 100 + 100)); sleep 0.05; done"
    build_id = await cluster.submit(cluster.replicas[0].url, f"FROM {BASE_IMAGE}\nRUN {script}\n")
    async with asyncio.timeout(30):
        while (await cluster.status(cluster.replicas[0].url, build_id))["last_event_id"] < 500:
            await asyncio.sleep(0.02)
    cluster.redis.restart()
    status = await cluster.wait_for(cluster.replicas[0].url, build_id)
    assert status["status"] == "succeeded", status
    frames = await cluster.follow(cluster.replicas[1].url, build_id)
    assert [f[0] for f in frames] == list(range(1, len(frames) + 1))
    lines = [data["line"] for _, data in frames if data["type"] == "log"]
    assert [line for line in lines if line.isdigit()] == [str(n) for n in range(1, 4001)]
    # Every replica is back at work on the restarted Redis.
    for replica in cluster.replicas:
        assert (await cluster.wait_for(replica.url, await cluster.submit(replica.url, echo("again"))))[
            "status"
        ] == "succeeded"
