"""`python -m benchmarks [SCENARIO…] [--out FILE]`: run scenarios, write the markdown report."""

from __future__ import annotations

import argparse
import asyncio
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


async def _header() -> str:
    rows = [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU cores", os.cpu_count()),
        ("memory", _memory_gib()),
        ("engine", await harness.engine_version()),
        ("daemon code", _git_revision()),
        ("harness", f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, same machine as the daemon"),
    ]
    return "# Benchmarks\n\nWritten by `scripts/bench`; rerun it to refresh.\n\n" + harness.markdown_table(
        ["", ""], rows
    )


async def _run_scenario(scenario: Scenario) -> tuple[str, bool]:
    harness.progress(f"scenario {scenario.name}")
    started = time.monotonic()
    try:
        body = await scenario.run()
        ok = True
    except Exception:  # noqa: BLE001
        # Keep going: one broken scenario should not cost the others' numbers.
        body = "**The scenario failed:**\n\n```\n" + traceback.format_exc().rstrip() + "\n```"
        ok = False
        harness.progress(f"scenario {scenario.name} failed:\n{traceback.format_exc()}")
    elapsed = time.monotonic() - started
    harness.progress(f"scenario {scenario.name} took {elapsed:.0f}s")
    return f"## {scenario.title} (`{scenario.name}`)\n\n{body}\n\n_Scenario run time: {elapsed:.0f} s._", ok


async def _main(names: list[str], out: Path) -> int:
    sections = [await _header()]
    failed = []
    for name in names:
        section, ok = await _run_scenario(SCENARIOS[name])
        sections.append(section)
        if not ok:
            failed.append(name)
        # Rewritten after every scenario, so an interrupted run still leaves what it measured.
        out.write_text("\n\n".join(sections) + "\n")
    harness.progress(f"wrote {out}")
    if failed:
        harness.progress(f"failed scenarios: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO",
        help=f"scenarios to run, in report order: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"),
                        help="report to write, overwriting it (default %(default)s)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    # Report order is registry order, whatever order they were named in.
    names = [n for n in SCENARIOS if not args.scenarios or n in args.scenarios]
    return asyncio.run(_main(names, args.out))


if __name__ == "__main__":
    sys.exit(main())
