"""A chatty build: `RUN seq 1 200000`, printed to a pipe by the builder CLI vs by `docker build`.

Time from spawning the command until it has printed its last line and exited
(the harness reads its stdout to EOF), alternating the two, and the count of
purely numeric lines each printed: it must be exactly 200,000, in order.
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
TARGET = 1.10  # builder / legacy docker build
DOCKERFILE = harness.dockerfile(f"RUN seq 1 {LINES}")
BUILDER = str(harness.REPO_ROOT / ".venv" / "bin" / "builder")
LABELS = {"legacy": "`DOCKER_BUILDKIT=0 docker build`", "builder": "`builder build` (CLI → daemon)"}
EXPECTED = [str(n).encode() for n in range(1, LINES + 1)]


def numeric_lines(output: bytes) -> tuple[int, bool]:
    """How many lines are a bare number, and whether they are exactly 1..LINES in order."""
    numbers = [line for line in output.split(b"\n") if line.isdigit()]
    return len(numbers), numbers == EXPECTED


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-chatty-"))
    counts: dict[str, list[tuple[int, bool]]] = {"legacy": [], "builder": []}
    submit_to_done: list[tuple[float, float]] = []  # builder runs: (process seconds, CLI's "built … in" seconds)
    try:
        (workdir / "Dockerfile").write_text(DOCKERFILE)
        async with Daemon() as daemon:

            async def measure(name: str, run_no: int, argv: list[str], env: dict[str, str] | None) -> float:
                try:
                    result = await harness.run_command(argv, env=env, capture_stdout=True)
                finally:
                    await harness.remove_images([f"bench-chatty-{name}:{run_no}"])
                counts[name].append(numeric_lines(result.stdout))
                if name == "builder" and (built := re.search(rb"built \S+ in ([\d.]+)s", result.stderr)):
                    submit_to_done.append((result.seconds, float(built[1])))
                return result.seconds

            async def legacy(n: int) -> float:
                argv = [harness.DOCKER_CLI, "build", "--no-cache", "-t", f"bench-chatty-legacy:{n}", str(workdir)]
                return await measure("legacy", n, argv, {"DOCKER_BUILDKIT": "0"})

            async def builder(n: int) -> float:
                argv = [BUILDER, "--url", daemon.base_url, "build", "--no-cache", "-t", f"bench-chatty-builder:{n}",
                        str(workdir)]
                return await measure("builder", n, argv, None)

            comparison = await compare.alternate([("legacy", legacy), ("builder", builder)], pairs=PAIRS,
                                                 label="chatty")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ratio = comparison.median_ratio("builder")
    exact = {name: all(n == LINES and ordered for n, ordered in runs) for name, runs in counts.items()}
    count_rows = [
        [LABELS[name], ", ".join(f"{n:,}" + ("" if ordered else " (not 1..N in order)") for n, ordered in runs),
         "yes" if exact[name] else "**no**"]
        for name, runs in counts.items()
    ]
    method = f"""\
```Dockerfile
{DOCKERFILE.rstrip()}
```

{LABELS['legacy']} `--no-cache -t … DIR` (reference) and {LABELS['builder']}
`.venv/bin/builder --url <daemon> build --no-cache -t … DIR`, alternating, one warm-up round then {PAIRS}
measured rounds. The harness starts each command with its stdout on a pipe, reads the pipe to EOF and
waits for the exit: the time is spawn → last byte read and exit. Then it counts the lines of stdout that
are a bare number (both commands also print step lines, which do not count) and checks they are
exactly 1..{LINES:,} in order. Images are removed after each run."""
    counts_table = harness.markdown_table(["command", "numeric lines per run (warm-up first)", f"all exactly {LINES:,} in order"],
                                          count_rows)
    notes = [comparison.runs_note(LABELS)]
    if measured := submit_to_done[-comparison.rounds:]:
        notes.append(
            "From the CLI's own stderr (`built … in`, 0.1 s resolution): submit → `done` frame "
            f"{harness.median([b for _, b in measured]):.1f} s median; the rest of the process's time is "
            "interpreter start-up and imports before the submit and exit after."
        )
    return Result(
        body="\n\n".join([method, comparison.table(LABELS), counts_table, "\n".join(f"- {n}" for n in notes)]),
        headlines=[Headline(
            "chatty",
            f"{ratio:.3f} builder / legacy docker build; numeric lines exact: "
            f"builder {'yes' if exact['builder'] else '**no**'}, docker {'yes' if exact['legacy'] else '**no**'}",
            f"≤ {TARGET}",
            ratio <= TARGET and exact["builder"],
        )],
        bars=[Bar("chatty: builder / legacy", ratio, TARGET)],
    )
