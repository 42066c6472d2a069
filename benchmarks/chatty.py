"""A chatty build: `RUN seq 1 200000`, printed to a pipe by the builder CLI vs by `docker build`.

Time from spawning the command until it has printed its last line and exited
(the harness reads its stdout to EOF), alternating the commands, and the count of
the numbers each printed: exactly 200,000, in order. BuildKit's plain style prints
them as `#5 0.154 1`; the legacy builder as bare lines.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, Result

LINES = 200_000
PAIRS = 7
TARGET = 1.10  # builder / docker build, each builder against its own
DOCKERFILE = harness.dockerfile(f"RUN seq 1 {LINES}")
BUILDER = str(harness.REPO_ROOT / ".venv" / "bin" / "builder")
LABELS = {
    "buildkit": "`DOCKER_BUILDKIT=1 docker build`",
    "builder": "`builder build` (CLI → daemon, BuildKit)",
    "legacy": "`DOCKER_BUILDKIT=0 docker build`",
    "builder-legacy": "`builder build` (CLI → daemon `--builder legacy`)",
}
EXPECTED = [str(n).encode() for n in range(1, LINES + 1)]
# A number as either builder prints it: `#5 0.154 17` (BuildKit's plain style) or `17`.
_NUMBER = re.compile(rb"^(?:#\d+ [\d.]+ )?(\d+)$", re.M)


def numeric_lines(output: bytes) -> tuple[int, bool]:
    """How many lines are a number of the build's output, and whether they are exactly 1..LINES in order."""
    numbers = _NUMBER.findall(output)
    return len(numbers), numbers == EXPECTED


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-chatty-"))
    counts: dict[str, list[tuple[int, bool]]] = {name: [] for name in LABELS}
    submit_to_done: list[tuple[float, float]] = []  # builder runs: (process seconds, CLI's "built … in" seconds)
    try:
        (workdir / "Dockerfile").write_text(DOCKERFILE)
        async with Daemon() as daemon, Daemon("--builder", "legacy") as legacy_daemon:

            async def measure(name: str, run_no: int, argv: list[str], env: dict[str, str] | None) -> float:
                try:
                    result = await harness.run_command(argv, env=env, capture_stdout=True)
                finally:
                    await harness.remove_images([f"bench-chatty-{name}:{run_no}"])
                # docker's BuildKit progress goes to stderr; the others print the log on stdout.
                counts[name].append(numeric_lines(result.stderr if name == "buildkit" else result.stdout))
                if name == "builder" and (built := re.search(rb"built \S+ in ([\d.]+)s", result.stderr)):
                    submit_to_done.append((result.seconds, float(built[1])))
                return result.seconds

            def docker(name: str, buildkit: str) -> compare.Command:
                async def run(n: int) -> float:
                    argv = [
                        harness.DOCKER_CLI,
                        "build",
                        "--no-cache",
                        "--progress=plain",
                        "-t",
                        f"bench-chatty-{name}:{n}",
                        str(workdir),
                    ]
                    if buildkit == "0":
                        argv.remove("--progress=plain")  # the legacy builder's CLI has no such flag
                    return await measure(name, n, argv, {"DOCKER_BUILDKIT": buildkit})

                return run

            def builder(name: str, target: Daemon) -> compare.Command:
                async def run(n: int) -> float:
                    argv = [
                        BUILDER,
                        "--url",
                        target.base_url,
                        "build",
                        "--no-cache",
                        "-t",
                        f"bench-chatty-{name}:{n}",
                        str(workdir),
                    ]
                    return await measure(name, n, argv, None)

                return run

            comparison = await compare.alternate(
                [
                    ("buildkit", docker("buildkit", "1")),
                    ("builder", builder("builder", daemon)),
                    ("legacy", docker("legacy", "0")),
                    ("builder-legacy", builder("builder-legacy", legacy_daemon)),
                ],
                pairs=PAIRS,
                label="chatty",
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ratio = comparison.median_ratio("builder")
    legacy_ratio = comparison.median_ratio_to("builder-legacy", "legacy")
    exact = {name: all(n == LINES and ordered for n, ordered in runs) for name, runs in counts.items()}
    count_rows = [
        [
            LABELS[name],
            ", ".join(f"{n:,}" + ("" if ordered else " (not 1..N in order)") for n, ordered in runs),
            "yes" if exact[name] else "**no**",
        ]
        for name, runs in counts.items()
    ]
    method = f"""\
```Dockerfile
{DOCKERFILE.rstrip()}
```

{LABELS["buildkit"]} `--no-cache --progress=plain -t … DIR` (the reference), {LABELS["builder"]}
`.venv/bin/builder --url <daemon> build --no-cache -t … DIR`, {LABELS["legacy"]} `--no-cache -t … DIR` and
{LABELS["builder-legacy"]} (the same CLI command against a second daemon), alternating, one warm-up round
then {PAIRS} measured rounds. The harness starts each command with its stdout and stderr on pipes, reads them to
EOF and waits for the exit: the time is spawn → last byte read and exit. Then it counts the lines (of
stdout; of stderr for docker with BuildKit, which prints its progress there) that are a number of the build's
output (`#5 0.154 17` in BuildKit's plain style, `17` from the legacy
builder; step lines do not count) and checks they are exactly 1..{LINES:,} in order. The engine runs with
BuildKit's step log limits raised (see README), so BuildKit does not clip. Images are removed after each run."""
    counts_table = harness.markdown_table(
        ["command", "numeric lines per run (warm-up first)", f"all exactly {LINES:,} in order"], count_rows
    )
    notes = [
        comparison.runs_note(LABELS),
        f"builder (legacy daemon) / legacy docker build = {legacy_ratio:.3f} (median of per-round ratios).",
    ]
    if measured := submit_to_done[-comparison.rounds :]:
        notes.append(
            "From the CLI's own stderr (`built … in`, 0.1 s resolution; BuildKit daemon): submit → `done` frame "
            f"{harness.median([b for _, b in measured]):.1f} s median; the rest of the process's time is "
            "interpreter start-up and imports before the submit and exit after."
        )
    all_exact = all(exact.values())
    return Result(
        body="\n\n".join([method, comparison.table(LABELS), counts_table, "\n".join(f"- {n}" for n in notes)]),
        headlines=[
            Headline(
                "chatty",
                f"{ratio:.3f} builder / `DOCKER_BUILDKIT=1 docker build`; all four print exactly "
                f"{LINES:,} numbers in order: {'yes' if all_exact else '**no**'}",
                f"≤ {TARGET}",
                ratio <= TARGET and all_exact,
            ),
            Headline(
                "chatty (legacy)",
                f"{legacy_ratio:.3f} builder `--builder legacy` / legacy docker build",
                f"≤ {TARGET}",
                legacy_ratio <= TARGET and all_exact,
            ),
        ],
        bars=[
            Bar("chatty: builder / BuildKit", ratio, TARGET),
            Bar("chatty: legacy builder / legacy", legacy_ratio, TARGET),
        ],
    )
