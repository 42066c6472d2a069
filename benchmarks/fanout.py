"""Log fan-out: N concurrent SSE followers of one chatty build.

One build prints 100,000 numbered lines and then a line stamped with the
container's clock. N followers connect right after submit and read the stream
from the start. Each checks the stream is exact (ids 1..k contiguous, numbers
1..100000 once each and in order, a terminal `done` frame) and notes when the
stamped line reached it, which gives the engine → client latency for that line.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
from dataclasses import dataclass

from benchmarks import harness
from benchmarks.harness import Daemon, LogFollower

FOLLOWER_COUNTS = (1, 100, 500)
LINES = 100_000
# Per N; far above what a healthy daemon needs, so a stuck stream shows as a failure, not a hang.
RUN_TIMEOUT = 240.0

# busybox's `date` has no %N (it prints a literal "%N"), but its `adjtimex`
# applet prints the kernel's CLOCK_REALTIME in µs (tv_sec, tv_usec). Containers
# share the host kernel's clock, so the stamp compares directly with the host's
# time.time() at receipt.
STAMP = "adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf \"LAST %d.%06d\\n\", s, u}'"
DOCKERFILE = harness.dockerfile(f"RUN seq 1 {LINES} && {STAMP}")


class NumberedFrames:
    """The exact bytes a correct daemon sends for lines "1".."100000", once the id of line "1" is known.

    500 followers × 100,000 frames is 50 million frames: parsing each in Python
    would load the harness about as much as the daemon, on the same two cores,
    and the benchmark would partly measure itself. So a follower
    compares whole blocks of the numbered run against these bytes (a memcmp)
    and only parses frame by frame where they differ (pings, other lines, or a
    real fault, which the frame parser then pins down and reports).
    """

    def __init__(self, first_id: int) -> None:
        frames = [
            b"id: %d\ndata: %s\n\n"
            % (first_id + i, json.dumps({"type": "log", "line": str(i + 1)}, separators=(",", ":")).encode())
            for i in range(LINES)
        ]
        self.first_id = first_id
        self.data = b"".join(frames)
        # starts[k - 1] is the offset of the frame carrying line k.
        self.starts = [0, *itertools.accumulate(len(f) for f in frames)][:-1]


@functools.lru_cache(maxsize=4)
def numbered_frames(first_id: int) -> NumberedFrames:
    # Every follower of a build sees line "1" at the same id: built once, shared.
    return NumberedFrames(first_id)


class NumberedFollower(LogFollower):
    def __init__(self) -> None:
        super().__init__()
        self.next_number = 1
        self.emitted_at: float | None = None  # container clock when it printed the LAST line
        self.received_at: float | None = None  # host clock when this follower parsed it
        self.fast_frames = 0  # frames verified by the byte comparison rather than parsed
        self._expected: NumberedFrames | None = None
        self._pos: int | None = None  # offset into _expected.data while on the fast path

    @property
    def complete(self) -> bool:
        return (
            self.ok
            and self.terminal is not None
            and self.terminal.get("status") == "succeeded"
            and self.next_number == LINES + 1
            and self.received_at is not None
        )

    def consume(self, block: bytes) -> None:
        if self._pos is not None:
            expected = self._expected.data
            size = min(len(block), len(expected) - self._pos)
            # Blocks and _pos both sit on frame boundaries, and no frame contains
            # a blank line, so an equal prefix is a run of whole, correct frames.
            if block[:size] == expected[self._pos : self._pos + size]:
                frames = block.count(b"\n\n", 0, size)
                self.last_id += frames
                self.log_lines += frames
                self.next_number += frames
                self.fast_frames += frames
                self._pos += size
                block = block[size:]
                if self._pos == len(expected):
                    self._pos = None
            else:
                self._pos = None
        if block:
            super().consume(block)
            self._resync()

    def _resync(self) -> None:
        """Back onto the fast path if the parsed frames left us exactly where the numbered run expects."""
        expected = self._expected
        if expected is None or self.error is not None or not 2 <= self.next_number <= LINES:
            return
        if self.last_id == expected.first_id + self.next_number - 2:
            self._pos = expected.starts[self.next_number - 1]

    def on_log(self, event_id: int, line: str) -> None:
        if line.isdigit():
            number = int(line)
            if number != self.next_number:
                self.fail(f"line {number} at id {event_id} where {self.next_number} was expected")
            if number == 1 and self._expected is None:
                self._expected = numbered_frames(event_id)
            self.next_number = number + 1
        elif line.startswith("LAST "):
            self.received_at = time.time()
            self.emitted_at = float(line.split()[1])
            if self.next_number != LINES + 1:
                self.fail(f"LAST arrived after {self.next_number - 1} numbered lines")


@dataclass
class RunResult:
    followers: list[NumberedFollower]
    status: dict
    idle_rss_mib: float
    peak_rss_mib: float | None
    daemon_cpu_s: float | None  # CPU the daemon used from submit until every follower was done
    harness_cpu_s: float  # CPU this process used for the same span (it shares the machine)
    daemon_alive: bool
    submitted_at: float


async def _run_once(count: int) -> RunResult:
    # A fresh daemon per N: VmHWM is the peak over the process's life, so it
    # only isolates this N's peak if nothing else ran in that process.
    async with Daemon() as daemon, harness.client_session(unlimited=True) as session:
        idle = daemon.rss_mib()
        context = harness.make_context({"Dockerfile": DOCKERFILE})
        daemon_cpu_start, harness_cpu_start = daemon.cpu_seconds(), time.process_time()
        build_id = await harness.submit_build(session, daemon, context, no_cache="true")
        submitted_at = time.time()
        url = harness.logs_url(daemon, build_id)
        followers = [NumberedFollower() for _ in range(count)]
        tasks = [asyncio.create_task(f.run(session, url)) for f in followers]
        _, pending = await asyncio.wait(tasks, timeout=RUN_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for follower in followers:
            if follower.terminal is None:
                follower.fail(f"no terminal frame within {RUN_TIMEOUT:.0f}s")
        harness_cpu = time.process_time() - harness_cpu_start
        alive = daemon.alive()
        status: dict = {}
        peak = daemon_cpu = None
        if alive:
            peak = daemon.peak_rss_mib()
            daemon_cpu = daemon.cpu_seconds() - daemon_cpu_start
            status = await harness.get_build(session, daemon, build_id)
        else:
            harness.progress(f"daemon died; log tail:\n{daemon.log_tail()}")
    await harness.remove_image(status.get("image_id"))
    return RunResult(
        followers=followers, status=status, idle_rss_mib=idle, peak_rss_mib=peak, daemon_cpu_s=daemon_cpu,
        harness_cpu_s=harness_cpu, daemon_alive=alive, submitted_at=submitted_at,
    )


def _row(count: int, result: RunResult) -> list[object]:
    followers = result.followers
    complete = sum(f.complete for f in followers)
    lines = sorted({f.log_lines for f in followers})
    latencies = [(f.received_at - f.emitted_at) * 1000 for f in followers if f.received_at and f.emitted_at]
    return [
        count,
        "yes" if complete == count else f"**no** ({complete}/{count})",
        " / ".join(str(n) for n in lines) if len(lines) <= 3 else f"{lines[0]}–{lines[-1]}",
        harness.fmt(max(latencies) if latencies else None, 0),
        harness.fmt(harness.median(latencies) if latencies else None, 0),
        harness.fmt(harness.build_wall_seconds(result.status), 2),
        harness.fmt(result.daemon_cpu_s),
        harness.fmt(result.idle_rss_mib),
        harness.fmt(result.peak_rss_mib),
    ]


def _notes(count: int, result: RunResult) -> list[str]:
    notes = []
    followers = result.followers
    if not result.daemon_alive:
        notes.append(f"N={count}: **the daemon died during the run**.")
    if result.status and result.status.get("status") != "succeeded":
        notes.append(f"N={count}: build ended `{result.status.get('status')}`: {result.status.get('error')}")
    errors = [f.error for f in followers if f.error]
    if errors:
        distinct = sorted(set(errors))
        shown = "; ".join(f"`{e}`" for e in distinct[:3])
        notes.append(f"N={count}: {len(errors)} follower(s) failed ({len(distinct)} distinct): {shown}")
    opened = [f.opened_at - result.submitted_at for f in followers if f.opened_at]
    finished = [f.ended_at - result.submitted_at for f in followers if f.ended_at]
    frames = sum(f.last_id for f in followers)
    fast = sum(f.fast_frames for f in followers)
    if opened and finished:
        notes.append(
            f"N={count}: slowest stream open {max(opened) * 1000:.0f} ms after submit; "
            f"last stream closed {max(finished):.2f} s after submit; "
            f"harness CPU {result.harness_cpu_s:.1f} s; "
            f"{fast / max(frames, 1):.0%} of frames verified by byte comparison, the rest parsed."
        )
    return notes


async def run() -> str:
    rows, notes = [], []
    for count in FOLLOWER_COUNTS:
        harness.progress(f"fanout: {count} follower(s)")
        result = await _run_once(count)
        rows.append(_row(count, result))
        notes += _notes(count, result)
        harness.progress(f"fanout: {count} follower(s): {rows[-1]}")
    table = harness.markdown_table(
        [
            "followers",
            "all complete",
            "log lines per client",
            "LAST line: engine → last client (ms)",
            "engine → median client (ms)",
            "build wall (s)",
            "daemon CPU (s)",
            "daemon RSS idle (MiB)",
            "daemon peak RSS (MiB)",
        ],
        rows,
    )
    method = f"""\
One build, `no_cache=true`, raw tar.gz upload:

```Dockerfile
{DOCKERFILE.rstrip()}
```

N followers open `GET /builds/{{id}}/logs` (`Accept: text/event-stream`, from the start) concurrently
right after the 202, over one aiohttp session with no connection limit. Each checks ids are exactly
1..k, the numbered lines 1..{LINES:,} arrive once each in order, and the stream ends with a
`done` frame of a succeeded build. *All complete* counts followers that passed every check;
*log lines* counts `log` frames (the numbered lines plus the engine's step lines).

*LAST line latency*: host clock when a follower parsed the `LAST` line minus the stamp the container
put in it. busybox `date` has no `%N`, so the stamp comes from busybox `adjtimex` (the kernel's
realtime clock in µs, shared by container and host). The stamp is taken just before the line is
written, so the figure includes the engine's and the daemon's whole path to each client.
*Build wall*: `created_at` → `finished_at` from `GET /builds/{{id}}`. *Peak RSS*: the daemon's
`VmHWM` after the run, from a fresh daemon per N; *idle*: its `VmRSS` before the submit.
*Daemon CPU*: user + system time of the daemon process from the submit until every follower was
done (from `/proc/<pid>/stat`); the harness's own CPU for that span is in the notes, since it runs
on the same cores."""
    parts = [method, table]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)
