"""Concurrency: 20 one-second builds submitted at once to a daemon with --max-concurrent 2,
vs the same 20 run two at a time with `docker build` (legacy builder).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, LogFollower, Result

BUILDS = 20
PARALLEL = 2
PAIRS = 5
TARGET = 1.05
DOCKERFILE = harness.dockerfile("COPY id.txt /id.txt", 'RUN sleep 1 && echo "build $(cat /id.txt) done"')
LABELS = {
    "legacy": f"`DOCKER_BUILDKIT=0 docker build`, {PARALLEL} at a time",
    "builder": f"daemon `--max-concurrent {PARALLEL}`, all {BUILDS} POSTed at once",
}


async def _daemon_round(session: aiohttp.ClientSession, daemon: Daemon, contexts: list[bytes], run_no: int) -> float:
    tags = [f"bench-conc-builder-{i}:{run_no}" for i in range(BUILDS)]

    async def one(i: int) -> dict:
        build_id = await harness.submit_build(session, daemon, contexts[i], no_cache="true", image_name=tags[i])
        follower = LogFollower()
        await follower.run(session, harness.logs_url(daemon, build_id))
        if not follower.ok or (follower.terminal or {}).get("status") != "succeeded":
            raise RuntimeError(f"build {i} ({build_id}) did not succeed: {follower.error} {follower.terminal}")
        return follower.terminal

    return await _timed(one, tags)


async def _docker_round(dirs: list[Path], run_no: int) -> float:
    tags = [f"bench-conc-legacy-{i}:{run_no}" for i in range(BUILDS)]
    gate = asyncio.Semaphore(PARALLEL)

    async def one(i: int) -> None:
        async with gate:
            await harness.run_command(
                [harness.DOCKER_CLI, "build", "--no-cache", "-t", tags[i], str(dirs[i])],
                env={"DOCKER_BUILDKIT": "0"},
            )

    return await _timed(one, tags)


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    try:
        dirs = []
        for i in range(BUILDS):
            d = workdir / f"ctx{i:02d}"
            d.mkdir()
            (d / "Dockerfile").write_text(DOCKERFILE)
            (d / "id.txt").write_text(f"{i}\n")
            dirs.append(d)
        contexts = [harness.tar_gz_of_directory(d) for d in dirs]
        # One tenant sends all 20 at once: its quota of uploads arriving together (8 by default, a 429
        # past it) would otherwise refuse some, depending on how the uploads overlap.
        daemon_args = ("--max-concurrent", str(PARALLEL), "--max-uploads-per-tenant", str(BUILDS))
        async with Daemon(*daemon_args) as daemon, harness.client_session() as session:

            async def legacy(n: int) -> float:
                return await _docker_round(dirs, n)

            async def builder(n: int) -> float:
                return await _daemon_round(session, daemon, contexts, n)

            comparison = await compare.alternate(
                [("legacy", legacy), ("builder", builder)], pairs=PAIRS, label="concurrency"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = comparison.median_ratio("builder")
    ideal = BUILDS / PARALLEL
    method = f"""\
{BUILDS} distinct contexts (each its own `id.txt`), all with this Dockerfile, built with no cache:

```Dockerfile
{DOCKERFILE.rstrip()}
```

- {LABELS["legacy"]} (reference): {BUILDS} `docker build --no-cache -t … DIR` processes, at most {PARALLEL} running
  at once (an asyncio semaphore in the harness, like `xargs -P{PARALLEL}`); stdout to `/dev/null`.
- {LABELS["builder"]}: a daemon started with `--max-concurrent {PARALLEL} --max-uploads-per-tenant {BUILDS}` (one
  tenant's uploads arriving at once are limited to 8 by default); the harness POSTs all {BUILDS} raw
  tar.gz contexts concurrently (`no_cache=true`) and follows each log over SSE to its `done` frame, all
  over one aiohttp session. (The HTTP API rather than {BUILDS} builder CLI processes: {BUILDS} Python start-ups
  at once on 2 cores would measure the interpreter, not the queue.)

Time: the first submit/spawn until all {BUILDS} have succeeded. The sleeps alone need
{BUILDS} × 1 s / {PARALLEL} = {ideal:.0f} s; the rest is per-build overhead (context, container create/start/commit).
Alternating, one warm-up round, then {PAIRS} measured rounds; all {BUILDS} images removed after each round."""
    return Result(
        body="\n\n".join([method, comparison.table(LABELS), "- " + comparison.runs_note(LABELS)]),
        headlines=[
            Headline(
                "concurrency",
                f"{ratio:.3f} daemon / docker build ×{PARALLEL} ({comparison.median('builder'):.1f} s vs "
                f"{comparison.median('legacy'):.1f} s for {BUILDS} builds)",
                f"≤ {TARGET}",
                ratio <= TARGET,
            )
        ],
        bars=[Bar("concurrency: builder / legacy ×2", ratio, TARGET)],
    )


async def _timed(one: Callable[[int], Awaitable[object]], tags: list[str]) -> float:
    """Wall time of all BUILDS builds at once (each limits its own parallelism); then clean up."""
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(BUILDS)))
        return time.perf_counter() - started
    finally:
        await harness.remove_images(tags)
