"""End-to-end build: `builder build` through the daemon vs `docker build` on the same engine.

A 200-file, 20 MiB context and a Dockerfile with a COPY and three RUN steps,
built with --no-cache by the builder CLI (through a local daemon), by the
docker CLI's legacy builder and, when it works here, by BuildKit. Commands run
alternately; every built image is removed after its run.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, Result

FILES = 200
TOTAL_BYTES = 20 * 2**20
PAIRS = 5
TARGET = 1.05  # builder / legacy docker build
STEPS = (
    "COPY . /ctx",
    "RUN find /ctx/files -type f | wc -l",
    "RUN cat /ctx/files/* | md5sum",
    "RUN du -sk /ctx && echo done",
)
DOCKERFILE = harness.dockerfile(*STEPS)
BUILDER = str(harness.REPO_ROOT / ".venv" / "bin" / "builder")
LABELS = {
    "legacy": "`DOCKER_BUILDKIT=0 docker build`",
    "builder": "`builder build` (CLI → daemon)",
    "buildkit": "`DOCKER_BUILDKIT=1 docker build`",
}


async def buildkit_works(context_dir: Path) -> tuple[bool, str]:
    """Whether BuildKit can build FROM the local base image offline (no registry)."""
    tag = "bench-e2e-buildkit-probe:latest"
    probe = context_dir.parent / "buildkit-probe"
    probe.mkdir(exist_ok=True)
    (probe / "Dockerfile").write_text(harness.dockerfile("RUN echo probe"))
    run = await harness.run_command(
        [harness.DOCKER_CLI, "build", "--no-cache", "-t", tag, str(probe)],
        env={"DOCKER_BUILDKIT": "1"}, check=False,
    )
    await harness.remove_images([tag])
    if run.returncode == 0:
        return True, ""
    return False, run.stderr.decode(errors="replace").strip()[-500:]


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    context_dir = workdir / "context"
    breakdown: list[tuple[float, float | None, float | None]] = []  # builder runs: total, upload, build (s)
    try:
        harness.write_files(context_dir, count=FILES, total_bytes=TOTAL_BYTES, seed=20)
        (context_dir / "Dockerfile").write_text(DOCKERFILE)
        compressed = len(harness.tar_gz_of_directory(context_dir))
        with_buildkit, buildkit_error = await buildkit_works(context_dir)
        async with Daemon() as daemon:
            comparison = await _compare(daemon, context_dir, with_buildkit, breakdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(comparison, with_buildkit, buildkit_error, compressed, breakdown[-comparison.rounds:])


async def _compare(
    daemon: Daemon, context_dir: Path, with_buildkit: bool, breakdown: list[tuple[float, float | None, float | None]]
) -> compare.Comparison:
    async def docker_build(run_no: int, engine: str) -> float:
        tag = f"bench-e2e-{engine}:{run_no}"
        try:
            run = await harness.run_command(
                [harness.DOCKER_CLI, "build", "--no-cache", "-t", tag, str(context_dir)],
                env={"DOCKER_BUILDKIT": "1" if engine == "buildkit" else "0"},
            )
        finally:
            await harness.remove_images([tag])
        return run.seconds

    async def builder_build(run_no: int) -> float:
        tag = f"bench-e2e-builder:{run_no}"
        try:
            run = await harness.run_command(
                [BUILDER, "--url", daemon.base_url, "build", "--no-cache", "-t", tag, str(context_dir)]
            )
        finally:
            await harness.remove_images([tag])
        # The CLI's own account on stderr: "uploaded context: X MiB in Ys", "built T in Zs (build …)".
        stderr = run.stderr.decode(errors="replace")
        uploaded = re.search(r"uploaded context: ([\d.]+) MiB in ([\d.]+)s", stderr)
        built = re.search(r"built \S+ in ([\d.]+)s", stderr)
        breakdown.append((run.seconds, float(uploaded[2]) if uploaded else None, float(built[1]) if built else None))
        return run.seconds

    async def legacy(n: int) -> float:
        return await docker_build(n, "legacy")

    async def buildkit(n: int) -> float:
        return await docker_build(n, "buildkit")

    commands: list[tuple[str, compare.Command]] = [("legacy", legacy), ("builder", builder_build)]
    if with_buildkit:
        commands.append(("buildkit", buildkit))
    return await compare.alternate(commands, pairs=PAIRS, label="e2e")


def _report(
    comparison: compare.Comparison, with_buildkit: bool, buildkit_error: str, compressed: int,
    breakdown: list[tuple[float, float | None, float | None]],
) -> Result:
    ratio = comparison.median_ratio("builder")
    notes = [comparison.runs_note(LABELS)]
    uploads = [u for _, u, _ in breakdown if u is not None]
    builds = [b for _, _, b in breakdown if b is not None]
    if uploads and builds:
        legacy = comparison.median("legacy")
        notes.append(
            "Where `builder build`'s time goes, from the CLI's own stderr (0.1 s resolution; medians of the "
            f"measured runs): submit → `done` frame (its `built … in`) {harness.median(builds):.1f} s, of which "
            f"packing and uploading the context {harness.median(uploads):.1f} s; the remaining "
            f"{harness.median([t - b for t, _, b in breakdown if b is not None]):.2f} s of the process's "
            f"{comparison.median('builder'):.2f} s are interpreter start-up and imports before the submit and "
            f"exit after. The whole legacy `docker build` takes {legacy:.2f} s."
        )
    if with_buildkit:
        bk = comparison.median_ratio("buildkit")
        notes.append(
            f"BuildKit works offline here (`FROM {harness.BASE_IMAGE}` resolves to the local image). "
            f"builder / BuildKit = {ratio / bk:.3f} (ratio of the two median ratios to legacy). BuildKit's "
            "build cache of these runs stays in the engine (`docker builder prune` would be engine-wide, so "
            "the harness does not run it); the images are removed."
        )
    else:
        notes.append(f"BuildKit cannot build here, so it has no row: `{buildkit_error}`")
    commands = [
        (f"- {LABELS['legacy']} `--no-cache -t bench-e2e-legacy:N DIR` (the reference; `/usr/bin/docker`, which "
        "sends the context as a plain tar),"),
        (f"- {LABELS['builder']}: `.venv/bin/builder --url <daemon> build --no-cache -t bench-e2e-builder:N DIR` "
        "against a `builder serve` started for this scenario (the CLI packs the directory as tar.gz, uploads it, "
        "follows the SSE log to the `done` frame; the daemon spools and checks the tar, then builds it through "
        "the engine's API),"),
    ]
    if with_buildkit:
        commands.append(f"- {LABELS['buildkit']} `--no-cache -t bench-e2e-buildkit:N DIR`,")
    method = f"""\
The context: a Dockerfile and {FILES} files adding up to {TOTAL_BYTES / 2**20:.0f} MiB, each half random bytes,
half word salad (as tar.gz at gzip -6 it is {compressed / 2**20:.1f} MiB, so compression neither vanishes nor
dominates). The Dockerfile:

```Dockerfile
{DOCKERFILE.rstrip()}
```

Commands, all with `--no-cache`, stdout to `/dev/null`, timed from spawn to exit by the harness:

{chr(10).join(commands)}

alternating in that order: one warm-up round (not counted), then {PAIRS} measured rounds. Each run's image
is removed right after it (`DELETE /images/<tag>?force=1`, which also removes its untagged parents)."""
    bars = [Bar("e2e: builder / legacy", ratio, TARGET)]
    if with_buildkit:
        bars.append(Bar("e2e: builder / BuildKit", ratio / comparison.median_ratio("buildkit")))
    return Result(
        body="\n\n".join([method, comparison.table(LABELS), "\n".join(f"- {n}" for n in notes)]),
        headlines=[Headline(
            "e2e",
            f"{ratio:.3f} builder / legacy docker build"
            + (f" ({comparison.median_ratio('buildkit'):.3f} BuildKit / legacy)" if with_buildkit else ""),
            f"≤ {TARGET}",
            ratio <= TARGET,
        )],
        bars=bars,
    )
