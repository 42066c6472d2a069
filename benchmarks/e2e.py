"""End-to-end build: `builder build` through the daemon vs `docker build` on the same engine.

A 200-file, 20 MiB context and a Dockerfile with a COPY and three RUN steps,
built with --no-cache by the docker CLI with BuildKit (the reference) and with
the legacy builder, and by the builder CLI through a local daemon of each
builder. Commands run alternately; every built image is removed after its run.
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
TARGET = 1.05  # builder / docker build, each builder against its own
STEPS = (
    "COPY . /ctx",
    "RUN find /ctx/files -type f | wc -l",
    "RUN cat /ctx/files/* | md5sum",
    "RUN du -sk /ctx && echo done",
)
DOCKERFILE = harness.dockerfile(*STEPS)
BUILDER = str(harness.REPO_ROOT / ".venv" / "bin" / "builder")
LABELS = {
    "buildkit": "`DOCKER_BUILDKIT=1 docker build`",
    "builder": "`builder build` (CLI → daemon, BuildKit)",
    "legacy": "`DOCKER_BUILDKIT=0 docker build`",
    "builder-legacy": "`builder build` (CLI → daemon `--builder legacy`)",
}


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    context_dir = workdir / "context"
    breakdown: list[tuple[float, float | None, float | None]] = []  # builder runs: total, upload, build (s)
    try:
        harness.write_files(context_dir, count=FILES, total_bytes=TOTAL_BYTES, seed=20)
        (context_dir / "Dockerfile").write_text(DOCKERFILE)
        compressed = len(harness.tar_gz_of_directory(context_dir))
        async with Daemon() as daemon, Daemon("--builder", "legacy") as legacy_daemon:
            comparison = await _compare(daemon, legacy_daemon, context_dir, breakdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(comparison, compressed, breakdown[-comparison.rounds :])


async def _compare(
    daemon: Daemon, legacy_daemon: Daemon, context_dir: Path, breakdown: list[tuple[float, float | None, float | None]]
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

    async def builder_build(run_no: int, target: Daemon, name: str) -> float:
        tag = f"bench-e2e-{name}:{run_no}"
        try:
            run = await harness.run_command(
                [BUILDER, "--url", target.base_url, "build", "--no-cache", "-t", tag, str(context_dir)]
            )
        finally:
            await harness.remove_images([tag])
        if name == "builder":
            # The CLI's own account on stderr: "uploaded context: X MiB in Ys", "built T in Zs (build …)".
            stderr = run.stderr.decode(errors="replace")
            uploaded = re.search(r"uploaded context: ([\d.]+) MiB in ([\d.]+)s", stderr)
            built = re.search(r"built \S+ in ([\d.]+)s", stderr)
            breakdown.append(
                (run.seconds, float(uploaded[2]) if uploaded else None, float(built[1]) if built else None)
            )
        return run.seconds

    async def buildkit(n: int) -> float:
        return await docker_build(n, "buildkit")

    async def builder(n: int) -> float:
        return await builder_build(n, daemon, "builder")

    async def legacy(n: int) -> float:
        return await docker_build(n, "legacy")

    async def builder_legacy(n: int) -> float:
        return await builder_build(n, legacy_daemon, "builder-legacy")

    commands: list[tuple[str, compare.Command]] = [
        ("buildkit", buildkit),
        ("builder", builder),
        ("legacy", legacy),
        ("builder-legacy", builder_legacy),
    ]
    return await compare.alternate(commands, pairs=PAIRS, label="e2e")


def _report(
    comparison: compare.Comparison,
    compressed: int,
    breakdown: list[tuple[float, float | None, float | None]],
) -> Result:
    # The first command is the reference of every ratio: BuildKit.
    ratio = comparison.median_ratio("builder")
    legacy_ratio = comparison.median_ratio_to("builder-legacy", "legacy")
    notes = [comparison.runs_note(LABELS)]
    uploads = [u for _, u, _ in breakdown if u is not None]
    builds = [b for _, _, b in breakdown if b is not None]
    if uploads and builds:
        notes.append(
            "Where `builder build`'s time goes (BuildKit daemon), from the CLI's own stderr (0.1 s resolution; "
            f"medians of the measured runs): submit → `done` frame (its `built … in`) {harness.median(builds):.1f} s, "
            f"of which packing and uploading the context {harness.median(uploads):.1f} s; the remaining "
            f"{harness.median([t - b for t, _, b in breakdown if b is not None]):.2f} s of the process's "
            f"{comparison.median('builder'):.2f} s are interpreter start-up and imports before the submit and "
            f"exit after. The whole `DOCKER_BUILDKIT=1 docker build` takes {comparison.median('buildkit'):.2f} s."
        )
    notes.append(
        f"builder (legacy daemon) / legacy docker build = {legacy_ratio:.3f}. BuildKit's build cache of these "
        "runs stays in the engine (`docker builder prune` would be engine-wide, so the harness does not run it); "
        "the images are removed."
    )
    commands = [
        (f"- {LABELS['buildkit']} `--no-cache -t bench-e2e-buildkit:N DIR` (the reference; `/usr/bin/docker`),"),
        (
            f"- {LABELS['builder']}: `.venv/bin/builder --url <daemon> build --no-cache -t bench-e2e-builder:N DIR` "
            "against a `builder serve` started for this scenario (BuildKit, its default),"
        ),
        f"- {LABELS['legacy']} `--no-cache -t bench-e2e-legacy:N DIR`,",
        f"- {LABELS['builder-legacy']}: the same CLI command against a second daemon started with `--builder legacy`,",
    ]
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
    return Result(
        body="\n\n".join([method, comparison.table(LABELS), "\n".join(f"- {n}" for n in notes)]),
        headlines=[
            Headline("e2e", f"{ratio:.3f} builder / `DOCKER_BUILDKIT=1 docker build`", f"≤ {TARGET}", ratio <= TARGET),
            Headline(
                "e2e (legacy)",
                f"{legacy_ratio:.3f} builder `--builder legacy` / legacy docker build",
                f"≤ {TARGET}",
                legacy_ratio <= TARGET,
            ),
        ],
        bars=[Bar("e2e: builder / BuildKit", ratio, TARGET), Bar("e2e: legacy builder / legacy", legacy_ratio, TARGET)],
    )
