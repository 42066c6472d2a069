"""Log fan-out: one chatty build, many SSE followers: how late the lines reach them, and what the daemon spends.

Two builds: `sustained` prints 2,000 lines/s for 30 s, `burst` prints 100,000 lines as fast as
`seq` does. Line n is `n`, except that every few lines a *marker* `@M n <sec>.<µs>` carries the
container's wall clock when it was written; the lag of a marker is when it reached a follower's
socket (the kernel's receive timestamp) minus that stamp. The followers are cheap
(benchmarks/followers.py: count frames, keep the last id, time the markers, in a few processes of
their own) so that on two cores the figures are the daemon's, not the harness's; ten of a hundred
or more decode the whole stream with the SDK's decoder and check every line, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import harness
from benchmarks.followers import (
    DAEMON_ARGS,
    FollowerProcesses,
    Report,
    Spec,
    Tally,
    submit_behind_blocker,
    wait_for_followers,
)
from benchmarks.harness import Bar, Daemon, Headline, Result

# busybox's `date` has no %N (it prints a literal "%N"), but its `adjtimex` applet prints the
# kernel's CLOCK_REALTIME (tv_sec, tv_usec), which the container shares with the host: a stamp
# compares directly with the harness's time.time(). One call (fork, exec, parse) takes ~0.6 ms.
_NOW = (
    'function now(  c, l, f) { c = "adjtimex"; while ((c | getline l) > 0) { '
    'if (l ~ /tv_sec/) { split(l, f, " "); S = f[2] } else if (l ~ /tv_usec/) { split(l, f, " "); U = f[2] } } '
    "close(c); return S + U / 1000000 }\n"
)
_MARK = 'printf "@M %d %d.%06d\\n", n, S, U'

SAMPLE = 10  # full-decoding followers among 100 or more
PER_PROCESS = 250  # cheap followers per worker process (at most 4 processes)
RUN_TIMEOUT = 240.0  # per run; far beyond a healthy daemon's time, so a stuck stream fails, not hangs


@dataclass(frozen=True)
class Shape:
    """One build's output: `lines` lines, every `marker_every`th a marker."""

    name: str
    lines: int
    marker_every: int
    awk: str  # the program, shipped in the context as /emit.awk
    run: str  # the RUN command
    counts: tuple[int, ...]  # follower counts measured
    about: str  # for the report

    @property
    def markers(self) -> int:
        return self.lines // self.marker_every

    @property
    def dockerfile(self) -> str:
        return harness.dockerfile("COPY emit.awk /emit.awk", f"RUN {self.run}")

    def context(self) -> bytes:
        return harness.make_context({"Dockerfile": self.dockerfile, "emit.awk": self.awk})


RATE, SECONDS, TICK = 2000, 30, 0.05
PER_TICK = round(RATE * TICK)
# Every TICK seconds, on a schedule kept from the first tick (a late tick does not push the
# others back): PER_TICK - 1 numbered lines and a marker, then one flush. awk cannot sleep:
# busybox `usleep` waits out the rest of a tick.
SUSTAINED = Shape(
    "sustained",
    lines=RATE * SECONDS,
    marker_every=PER_TICK,
    awk=_NOW
    + (
        f"BEGIN {{ t0 = now(); for (k = 0; k < {SECONDS / TICK:.0f}; k++) {{ due = t0 + k * {TICK}; "
        f'if (now() < due) {{ system("usleep " int((due - S - U / 1000000) * 1000000)); now() }} '
        f"for (i = 1; i < {PER_TICK}; i++) print ++n; n++; {_MARK}; fflush() }} }}\n"
    ),
    run="awk -f /emit.awk",
    counts=(1, 1000),
    about=(
        f"{RATE:,} lines/s for {SECONDS} s ({RATE * SECONDS:,} lines): every {TICK * 1000:.0f} ms {PER_TICK - 1} "
        f"numbered lines and a marker ({RATE * SECONDS // PER_TICK:,} markers). *Cores while printing*: the daemon's "
        "CPU from the first marker written to the last, over that time."
    ),
)
BURST_LINES, BURST_MARKER_EVERY = 100_000, 1000
# seq as fast as it goes; awk passes lines through and stamps every 1000th (flushed at once).
BURST = Shape(
    "burst",
    lines=BURST_LINES,
    marker_every=BURST_MARKER_EVERY,
    awk=_NOW + f"NR % {BURST_MARKER_EVERY} == 0 {{ now(); n = NR; {_MARK}; fflush(); next }} {{ print }}\n",
    run=f"seq 1 {BURST_LINES} | awk -f /emit.awk",
    counts=(1, 100, 1000),
    about=(
        f"`seq 1 {BURST_LINES}` through awk, which stamps every {BURST_MARKER_EVERY:,}th line "
        f"({BURST_LINES // BURST_MARKER_EVERY} markers)."
    ),
)
TARGETS = {  # (shape, followers): p99 lag limit (ms)
    ("sustained", 1000): 250.0,
    ("burst", 100): 1000.0,
    ("burst", 1000): 3000.0,
}
SUSTAINED_CORES_TARGET = 1.0


class CpuTrace:
    """CPU seconds on a timer: the daemon, the harness's main process, each group of follower processes."""

    PERIOD = 0.25

    def __init__(self, daemon: Daemon, groups: Sequence[FollowerProcesses]) -> None:
        self._daemon = daemon
        self._groups = groups
        self.samples: list[tuple[float, list[float]]] = []  # (wall clock, [daemon, main, *groups])

    def sample(self) -> None:
        readings = [self._daemon.cpu_seconds(), time.process_time(), *(g.cpu_seconds() for g in self._groups)]
        self.samples.append((time.time(), readings))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.PERIOD)

    def used(self, start: float, end: float) -> list[float]:
        """CPU seconds [daemon, main, *groups] from `start` to `end`, interpolated between samples."""
        return [b - a for a, b in zip(self._at(start), self._at(end), strict=True)]

    def _at(self, t: float) -> list[float]:
        samples = self.samples
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, before), (t1, after) in itertools.pairwise(samples):
            if t <= t1:
                w = (t - t0) / ((t1 - t0) or 1)
                return [x + w * (y - x) for x, y in zip(before, after, strict=True)]
        return samples[-1][1]


@dataclass
class Run:
    shape: Shape
    count: int
    processes: int  # cheap follower processes
    report: Report  # the cheap followers
    checked: Report  # the content followers
    status: dict[str, Any]
    submitted_at: float
    opened_at: float  # every stream open (the daemon counts them all)
    released_at: float  # the blocker cancelled: the build starts
    trace: CpuTrace
    peak_rss_mib: float | None
    idle_rss_mib: float
    alive: bool
    tcp: dict[str, int]
    lags: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lags = sorted(lag for t in self.report.tallies for lag in t.lags_ms)

    @property
    def final_id(self) -> int | None:
        """The id of the terminal frame, as the content-checked followers saw it (None without them)."""
        ids = {c.last_id for c in self.checked.checks if c.complete}
        return ids.pop() if len(ids) == 1 else None

    def complete(self, tally: Tally) -> bool:
        final = self.final_id
        return (
            not tally.error
            and tally.status == 200
            and tally.terminal.startswith('{"type":"done"')
            and '"status":"succeeded"' in tally.terminal
            and tally.frames == tally.last_id
            and tally.markers == self.shape.markers
            and (final is None or tally.last_id == final)
        )

    @property
    def complete_count(self) -> int:
        return sum(map(self.complete, self.report.tallies)) + sum(c.complete for c in self.checked.checks)

    @property
    def ended_at(self) -> float:
        """When the last cheap follower's stream ended (the content followers may lag behind)."""
        return max(t.ended_at for t in self.report.tallies)

    @property
    def emitted(self) -> tuple[float, float] | None:
        """When the build wrote its first and last marker, as the followers got them."""
        firsts = [t.first_stamp for t in self.report.tallies if t.markers]
        lasts = [t.last_stamp for t in self.report.tallies if t.markers]
        return (min(firsts), max(lasts)) if firsts else None


async def _run(shape: Shape, count: int) -> Run:
    sample = SAMPLE if count >= 100 else 0
    cheap = count - sample
    # A fresh daemon per run: VmHWM is the peak over the process's life.
    async with Daemon(*DAEMON_ARGS) as daemon, harness.client_session() as session:
        idle_rss = daemon.rss_mib()
        submitted_at = time.time()
        blocker, build_id = await submit_behind_blocker(session, daemon, shape.context())
        spec = Spec("127.0.0.1", daemon.port, f"/builds/{build_id}/logs", cheap, "read", RUN_TIMEOUT)
        process_count = FollowerProcesses.processes_for(cheap, PER_PROCESS)
        groups = [FollowerProcesses(spec, process_count)]
        if sample:
            groups.append(
                FollowerProcesses(
                    dataclasses.replace(
                        spec, count=sample, mode="check", lines=shape.lines, marker_every=shape.marker_every
                    ),
                    1,
                )
            )
        trace = CpuTrace(daemon, groups)
        tracing = asyncio.create_task(trace.run())
        cancel: asyncio.Task[tuple[int, dict[str, Any]]] | None = None
        try:
            for group in groups:
                await group.open()
            await wait_for_followers(session, daemon, count)
            opened_at = time.time()
            tcp_before = harness.tcp_counters()
            released_at = time.time()
            cancel = asyncio.create_task(harness.cancel_build(session, daemon, blocker))
            report, *checked = [await group.finish() for group in groups]
            trace.sample()
        finally:
            tracing.cancel()
            for group in groups:
                await group.kill()
            if cancel is None:
                await harness.cancel_build(session, daemon, blocker)
            else:
                await cancel
        tcp_after = harness.tcp_counters()
        alive = daemon.alive()
        status = await harness.get_build(session, daemon, build_id) if alive else {}
        peak = daemon.peak_rss_mib() if alive else None
    await harness.remove_images([status.get("image_id")])
    return Run(
        shape=shape,
        count=count,
        processes=process_count,
        report=report,
        checked=checked[0] if checked else Report([], [], 0.0, 0.0, 0.0, 0.0, 0, 0),
        status=status,
        submitted_at=submitted_at,
        opened_at=opened_at,
        released_at=released_at,
        trace=trace,
        peak_rss_mib=peak,
        idle_rss_mib=idle_rss,
        alive=alive,
        tcp={k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after},
    )


def _ms(value: float | None) -> str:
    return harness.fmt(value, 0)


def _cores(run: Run) -> float | None:
    """The daemon's mean CPU use (cores) from the first marker written to the last."""
    emitted = run.emitted
    if emitted is None or emitted[1] <= emitted[0]:
        return None
    return run.trace.used(*emitted)[0] / (emitted[1] - emitted[0])


def _row(run: Run) -> list[object]:
    daemon_cpu, main_cpu, cheap_cpu, *check_cpu = run.trace.used(run.released_at, run.ended_at)
    frames = sorted({t.frames for t in run.report.tallies})
    complete = run.complete_count
    cores = _cores(run) if run.shape is SUSTAINED else None
    return [
        run.count,
        f"{complete}/{run.count}" if complete == run.count else f"**{complete}/{run.count}**",
        " / ".join(f"{n:,}" for n in frames) if len(frames) <= 2 else f"{frames[0]:,}–{frames[-1]:,}",
        f"{len(run.lags):,}",
        _ms(harness.percentile(run.lags, 50)),
        _ms(harness.percentile(run.lags, 99)),
        _ms(run.lags[-1] if run.lags else None),
        f"{daemon_cpu:.1f}" + (f" ({cores:.2f} cores while printing)" if cores is not None else ""),
        f"{cheap_cpu:.1f} + {check_cpu[0]:.1f} + {main_cpu:.1f}"
        if check_cpu
        else f"{cheap_cpu:.1f} + — + {main_cpu:.1f}",
        harness.fmt(run.report.read_delay_p99_ms, 1),
        f"{harness.fmt(run.idle_rss_mib)} → {harness.fmt(run.peak_rss_mib)}",
    ]


def _notes(run: Run) -> list[str]:
    n = f"N={run.count}"
    notes = []
    if not run.alive:
        notes.append(f"{n}: **the daemon died during the run**.")
    if run.status and run.status.get("status") != "succeeded":
        notes.append(f"{n}: build ended `{run.status.get('status')}`: {run.status.get('error')}")
    errors = [t.error for t in run.report.tallies if t.error] + [c.error for c in run.checked.checks if c.error]
    if errors:
        distinct = sorted(set(errors))
        notes.append(
            f"{n}: {len(errors)} follower(s) failed ({len(distinct)} distinct): "
            + "; ".join(f"`{e}`" for e in distinct[:3])
        )
    incomplete = [t for t in run.report.tallies if not t.error and not run.complete(t)]
    if incomplete:
        t = incomplete[0]
        notes.append(
            f"{n}: {len(incomplete)} cheap follower(s) ended without error but incomplete, e.g. "
            f"{t.frames} frames, last id {t.last_id} (expected {run.final_id}), {t.markers} markers, "
            f"last frame `{t.terminal[:120]}`"
        )
    if checks := run.checked.checks:
        checked = sum(c.complete for c in checks)
        notes.append(
            f"{n}: content check (SDK decoder, every line): {checked}/{len(checks)} followers got lines "
            f"1..{run.shape.lines:,} in order with every marker in place and a `done` frame; the terminal frame's "
            f"id {run.final_id} is what every cheap follower must end at; "
            f"{checks[0].other_lines} other log lines (the engine's); the check took "
            f"{run.checked.cpu_seconds:.1f} s CPU at nice 19, and its last stream ended "
            f"{max(c.ended_at for c in checks) - run.ended_at:+.2f} s after the cheap followers' last."
        )
    emitted = run.emitted
    wall = harness.build_wall_seconds(run.status)
    if emitted:
        first = [t.lags_ms[0] for t in run.report.tallies if t.lags_ms]
        last = [t.lags_ms[-1] for t in run.report.tallies if t.markers == run.shape.markers]
        notes.append(
            f"{n}: streams all open {run.opened_at - run.submitted_at:.2f} s after the submit; the build then "
            f"started, wrote its first marker {emitted[0] - run.released_at:.2f} s after the blocker was cancelled "
            f"and its last {emitted[1] - emitted[0]:.2f} s after the first; the last stream ended "
            f"{run.ended_at - emitted[1]:.2f} s after the last marker was written; build created → finished "
            f"{harness.fmt(wall, 2)} s (queued behind the blocker included)."
            + (
                f" Lag of the first marker (median over followers) {harness.median(first):.0f} ms, of the last "
                f"{harness.median(last):.0f} ms."
                if first and last
                else ""
            )
            + f" Inexact lags (see above): {sum(t.inexact for t in run.report.tallies):,} of {len(run.lags):,}."
        )
    notes.append(
        f"{n}: cheap followers' CPU {run.report.cpu_seconds:.1f} s ({run.report.system_seconds:.1f} s of it in the "
        f"kernel) in {run.processes} follower process(es) (start-up and connecting included), "
        f"{run.report.reads:,} reads of {harness.mib(run.report.bytes_read)}; read delay p99 "
        f"{run.report.read_delay_p99_ms:.1f} ms, max {run.report.read_delay_max_ms:.0f} ms; TCP counters: "
        + (", ".join(f"{k} +{v}" for k, v in run.tcp.items()) or "n/a")
        + "."
    )
    return notes


TABLE_HEADERS = [
    "followers",
    "complete",
    "frames per stream",
    "lag samples",
    "lag p50 (ms)",
    "lag p99 (ms)",
    "lag max (ms)",
    "daemon CPU (s)",
    "harness CPU (s): cheap followers + content check + main",
    "followers' read delay p99 (ms)",
    "daemon RSS idle → peak (MiB)",
]


def _section(shape: Shape, runs: list[Run]) -> str:
    return "\n\n".join(
        [
            f"### {shape.name.capitalize()}",
            shape.about,
            f"```Dockerfile\n{shape.dockerfile.rstrip()}\n```",
            f"`emit.awk`:\n\n```awk\n{shape.awk.rstrip()}\n```",
            harness.markdown_table(TABLE_HEADERS, [_row(r) for r in runs]),
            "\n".join(f"- {note}" for r in runs for note in _notes(r)),
        ]
    )


METHOD = f"""\
Every run has a fresh daemon (`{" ".join(DAEMON_ARGS)}`) and goes: submit a blocker build (`RUN sleep
600`), submit the measured build (`no_cache=true`, BuildKit), which waits in the queue; open the N log
streams (`GET /builds/{{id}}/logs`, `Accept: text/event-stream`, from the start) and wait until the
daemon's `/healthz` counts all N; then cancel the blocker: the build starts with every follower attached.

*Followers.* With N ≥ 100, {SAMPLE} are *content* followers (aiohttp and the SDK's SSE decoder, in a process
of their own at nice 19): ids 1..k with no gap, every line 1..L once and in order, a marker exactly every
k-th line, a `done` frame of a succeeded build last. The others are *cheap*: up to {PER_PROCESS} per process on
a bare epoll loop (1–4 processes, default priority), which undo the HTTP
chunking, count `id:` frames (numpy counts newlines), keep the last id and the last frame, and find the
markers with a one-byte `bytes.find`; they never decode JSON. A cheap follower is *complete* with no
error, as many frames as its last id, every marker in order, a `done` frame of a succeeded build last,
and the content followers' last id.

*Lag* of a marker: when the bytes holding it reached the follower's socket (the kernel's receive timestamp,
`SO_TIMESTAMPNS`, so the harness's own delay in reading does not count), minus the stamp in the line (the
container's `CLOCK_REALTIME`, read by busybox `adjtimex` (its `date` has no `%N`): host and container
share the kernel's clock, there is no offset to estimate). The stamp is read before the line is written:
fork, exec and parse of `adjtimex` take 0.6 ms mean, 2.2 ms max in this image, so a lag is good to about
a millisecond, with one exception: when a read also held a later daemon write, TCP may have merged their
segments and reports the later arrival; such lags are upper bounds, counted in the notes (*inexact*),
and the *read delay* (when a worker read − when the bytes arrived) bounds the error. All markers of all
cheap followers are pooled; nearest-rank percentiles.

*CPU*: user + system time from `/proc/<pid>/stat`, sampled every {CpuTrace.PERIOD} s, from the blocker's
cancel until the last cheap stream ended: the daemon; the cheap followers' processes; the content check's
process; the harness's main process. *RSS*: the daemon's `VmRSS` before the submit → its `VmHWM` (peak)
at the end."""


async def run() -> Result:
    harness.raise_fd_limit()
    runs: dict[tuple[str, int], Run] = {}
    sections = [METHOD]
    for shape in (SUSTAINED, BURST):
        shape_runs = []
        for count in shape.counts:
            harness.progress(f"fanout {shape.name}: {count} follower(s)")
            result = await _run(shape, count)
            runs[shape.name, count] = result
            shape_runs.append(result)
            harness.progress(f"fanout {shape.name}: {count} follower(s): {_row(result)}")
        sections.append(_section(shape, shape_runs))
    headlines, bars = [], []
    for (name, count), limit in TARGETS.items():
        r = runs[name, count]
        p99 = harness.percentile(r.lags, 99)
        complete = r.complete_count
        p50 = _ms(harness.percentile(r.lags, 50))
        measured = f"{name}, {count} followers: lag p99 {_ms(p99)} ms (p50 {p50} ms), {complete}/{count} complete"
        target = f"p99 < {limit:.0f} ms, all complete"
        met = p99 is not None and p99 < limit and complete == count
        if name == "sustained":
            cores = _cores(r)
            measured += f"; daemon {harness.fmt(cores, 2)} cores while printing"
            target += f", daemon < {SUSTAINED_CORES_TARGET:.0f} core"
            met = met and cores is not None and cores < SUSTAINED_CORES_TARGET
            bars.append(Bar(f"fanout {name} {count}: daemon cores ÷ 1", cores, 1.0))
        headlines.append(Headline("fanout", measured, target, met))
        bars.append(
            Bar(f"fanout {name} {count}: p99 lag ÷ {limit:.0f} ms", None if p99 is None else max(p99, 1) / limit, 1.0)
        )
    return Result(body="\n\n".join(sections), headlines=headlines, bars=bars)
