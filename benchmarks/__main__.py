"""`python -m benchmarks [SCENARIO…] [--out FILE]`: run scenarios, write the markdown report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import aiohttp

from benchmarks import SCENARIOS, Scenario, harness
from benchmarks.harness import Result


def _memory_gib() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "?"


def _git_revision() -> str:
    """The daemon code measured: HEAD, flagged when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=harness.REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "builder")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes in builder/" if dirty else head


def _revision_span(at_start: str, now: str) -> str:
    if at_start == now:
        return now
    return f"{at_start} at the start, {now} at the end (the code changed while the benchmarks ran)"


def _load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


async def _header(total_seconds: float | None, fd_limit: tuple[int, int], load: str, revision: str) -> str:
    rows = [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU cores", os.cpu_count()),
        ("memory", _memory_gib()),
        ("engine", await harness.engine_version()),
        ("docker CLI", f"`{harness.DOCKER_CLI}` ({_docker_cli_version()})"),
        ("daemon code", _revision_span(revision, _git_revision())),
        ("harness", f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, same machine as the daemon"),
        ("load average (1, 5, 15 min) at start / now", f"{load} / {_load_average()}"),
        ("open-file limit (harness and daemon)", f"{fd_limit[0]} (hard {fd_limit[1]})"),
        (
            "total run time",
            "still running" if total_seconds is None else f"{total_seconds:.0f} s ({total_seconds / 60:.1f} min)",
        ),
    ]
    return "# Benchmarks\n\nWritten by `scripts/bench`; rerun it to refresh.\n\n" + harness.markdown_table(
        ["", ""], rows
    )


def _docker_cli_version() -> str:
    try:
        return subprocess.run(
            [harness.DOCKER_CLI, "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _headline(done: list[tuple[Scenario, Result | None]], chart: Path | None, out: Path) -> str:
    rows = []
    for scenario, result in done:
        if result is None:
            rows.append([f"`{scenario.name}`", "**the scenario failed** (see its section)", "", "**missed**"])
            continue
        for h in result.headlines:
            rows.append([f"`{h.scenario}`", h.measured, h.target, harness.met_text(h.met)])
    text = "## Headline\n\n" + harness.markdown_table(["scenario", "measured", "target", "met?"], rows)
    if chart is not None:
        link = os.path.relpath(chart, out.resolve().parent)
        text += (
            f"\n\n![Ratio per scenario against its target]({link})\n\n"
            f"[`{link}`]({link}): each scenario's ratio (bars, log scale) with its target (black marker; "
            "≤ for times, ≥ for throughput). Scenarios whose target is an absolute number are drawn as "
            "measured ÷ target, so their marker sits at 1."
        )
    return text


async def _run_scenario(scenario: Scenario) -> tuple[str, Result | None]:
    harness.progress(f"scenario {scenario.name}")
    problems_before = len(harness.DAEMON_PROBLEMS)
    started = time.monotonic()
    result: Result | None
    try:
        outcome = await scenario.run()
        result = outcome if isinstance(outcome, Result) else Result(body=outcome)
        body = result.body
    except Exception:  # noqa: BLE001
        # Keep going: one broken scenario should not cost the others' numbers.
        body = "**The scenario failed:**\n\n```\n" + traceback.format_exc().rstrip() + "\n```"
        result = None
        harness.progress(f"scenario {scenario.name} failed:\n{traceback.format_exc()}")
    elapsed = time.monotonic() - started
    if problems := harness.DAEMON_PROBLEMS[problems_before:]:
        kinds: dict[str, list[str]] = {}
        for problem in problems:
            kinds.setdefault(problem.what, []).append(f"`{problem.workdir}`")
        body += "\n\n**Daemon problems in this scenario:**\n\n" + "\n".join(
            f"- {len(dirs)} × {what}; data dirs and logs kept in {', '.join(dirs[:3])}"
            + (f" and {len(dirs) - 3} more" if len(dirs) > 3 else "")
            for what, dirs in kinds.items()
        )
    harness.progress(f"scenario {scenario.name} took {elapsed:.0f}s")
    return f"## {scenario.title} (`{scenario.name}`)\n\n{body}\n\n_Scenario run time: {elapsed:.0f} s._", result


async def _main(names: list[str], out: Path, chart: Path | None) -> int:
    fd_limit = harness.raise_fd_limit()
    load = _load_average()
    revision = _git_revision()
    started = time.monotonic()
    sections: list[str] = []
    done: list[tuple[Scenario, Result | None]] = []

    async def write(total: float | None) -> None:
        bars = [bar for _, result in done if result is not None for bar in result.bars]
        chart_written = None
        if chart is not None and bars:
            from benchmarks.chart import write_chart

            write_chart(bars, chart)
            chart_written = chart
        header = await _header(total, fd_limit, load, revision)
        out.write_text("\n\n".join([header, _headline(done, chart_written, out), *sections]) + "\n")

    for name in names:
        scenario = SCENARIOS[name]
        section, result = await _run_scenario(scenario)
        sections.append(section)
        done.append((scenario, result))
        # Rewritten after every scenario, so an interrupted run still leaves what it measured.
        await write(None)
    total = time.monotonic() - started
    await write(total)
    harness.progress(f"wrote {out} in {total:.0f}s total" + (f" and {chart}" if chart else ""))
    failed = [scenario.name for scenario, result in done if result is None]
    if failed:
        harness.progress(f"failed scenarios: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"scenarios to run, in report order: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("BENCHMARKS.md"), help="report to write, overwriting it (default %(default)s)"
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=Path("benchmarks/ratios.png"),
        help="ratio chart to write, overwriting it (default %(default)s)",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    # Report order is registry order, whatever order they were named in.
    names = [n for n in SCENARIOS if not args.scenarios or n in args.scenarios]
    return asyncio.run(_main(names, args.out, None if args.no_chart else args.chart))


if __name__ == "__main__":
    sys.exit(main())
