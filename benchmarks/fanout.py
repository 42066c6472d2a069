"""Log fan-out: N concurrent SSE followers of one chatty build.

One build prints 100,000 numbered lines; every 1000th carries the container's
clock in µs. N followers connect right after submit and read the stream from
the start. Each checks the stream is exact (ids 1..k contiguous, numbers
1..100000 once each and in order, a terminal `done` frame) and, for each
stamped line, notes when it arrived: the delivery lag engine → client, sampled
every 1000 lines, for every client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass

from benchmarks import harness
from benchmarks.harness import Bar, Daemon, Headline, LogFollower, Result
from builder.client.sse import ServerSentEvent

FOLLOWER_COUNTS = (1, 100, 1000)
LINES = 100_000
STAMP_EVERY = 1000
STAMPS = LINES // STAMP_EVERY
TARGET_P99_MS = 500.0  # at the largest N
# Per N; far above what a healthy daemon needs, so a stuck stream shows as a failure, not a hang.
RUN_TIMEOUT = 180.0

# busybox's `date` has no %N (it prints a literal "%N"), but its `adjtimex`
# applet prints the kernel's CLOCK_REALTIME in µs (tv_sec, tv_usec). Containers
# share the host kernel's clock, so the stamp compares directly with the host's
# time.time() at receipt. awk runs adjtimex for every 1000th line (100 short
# processes, ~0.1 s in all), prints "<n> <sec>.<µs>" instead of "<n>", and
# flushes right after, so a stamped line never waits in awk's output buffer.
AWK = (
    "NR % " + str(STAMP_EVERY) + ' == 0 { c = "adjtimex"; while ((c | getline l) > 0) '
    '{ if (l ~ /tv_sec/) { split(l, f, " "); s = f[2] } else if (l ~ /tv_usec/) { split(l, f, " "); u = f[2] } } '
    'close(c); printf "%d %d.%06d\\n", NR, s, u; fflush(); next } { print }'
)
DOCKERFILE = harness.dockerfile(f"RUN seq 1 {LINES} | awk '{AWK}'")


class NumberedFrames:
    """The exact bytes a correct daemon sends for the unstamped lines, once the id of line "1" is known.

    1000 followers × 100,000 frames is 100 million frames: parsing each in
    Python would load the harness about as much as the daemon, on the same two
    cores, and the benchmark would partly measure itself. So a follower
    compares whole runs of numbered frames against these bytes (a memcmp) and
    parses frame by frame only where they differ: the stamped lines (whose
    content is a clock), pings, other lines, or a real fault, which the frame
    parser then pins down and reports.

    `segments[j]` holds the frames of lines 1000j+1 .. 1000j+999 (the stamped
    line 1000(j+1) follows it); `offsets[k]` is where line k's frame starts in
    its segment.
    """

    def __init__(self, first_id: int) -> None:
        self.first_id = first_id
        self.segments: list[bytes] = []
        self.offsets = [0] * (LINES + 1)
        for j in range(STAMPS):
            frames, offset = [], 0
            for k in range(j * STAMP_EVERY + 1, (j + 1) * STAMP_EVERY):
                frame = b"id: %d\ndata: %s\n\n" % (
                    first_id + k - 1,
                    json.dumps({"type": "log", "line": str(k)}, separators=(",", ":")).encode(),
                )
                self.offsets[k] = offset
                offset += len(frame)
                frames.append(frame)
            self.segments.append(b"".join(frames))


@functools.lru_cache(maxsize=4)
def numbered_frames(first_id: int) -> NumberedFrames:
    # Every follower of a build sees line "1" at the same id: built once, shared.
    return NumberedFrames(first_id)


class NumberedFollower(LogFollower):
    def __init__(self) -> None:
        super().__init__()
        self.next_number = 1
        self.lags_ms: list[float] = []  # host receipt − container stamp, per stamped line
        self.fast_frames = 0  # frames verified by the byte comparison rather than parsed
        self._expected: NumberedFrames | None = None
        self._segment: int | None = None  # on the fast path: the segment and offset we are in
        self._offset = 0
        self._received_at = 0.0

    @property
    def complete(self) -> bool:
        return (
            self.ok
            and self.terminal is not None
            and self.terminal.get("status") == "succeeded"
            and self.next_number == LINES + 1
            and len(self.lags_ms) == STAMPS
        )

    def consume(self, chunk: bytes) -> None:
        # One clock reading per network read: every frame in it arrived together.
        self._received_at = time.time()
        while chunk:
            if self._segment is not None and not self.decoder.incomplete:
                segment = self._expected.segments[self._segment]
                size = min(len(chunk), len(segment) - self._offset)
                # Equal bytes from a frame boundary on are a run of correct frames; no frame
                # contains a blank line, so the last one in the run ends at its last b"\n\n".
                end = chunk.rfind(b"\n\n", 0, size) + 2
                if end > 1 and chunk[:end] == segment[self._offset : self._offset + end]:
                    frames = chunk.count(b"\n\n", 0, end)
                    self.last_id += frames
                    self.log_lines += frames
                    self.next_number += frames
                    self.fast_frames += frames
                    self._offset += end
                    chunk = chunk[end:]
                    if self._offset == len(segment):
                        self._segment = None  # the stamped line comes next: parse it
                    continue
                self._segment = None
            # Through the decoder up to the end of the next frame; `consume_event` may then
            # put us back on the fast path for the bytes after it.
            cut = chunk.find(b"\n\n") + 2
            if cut == 1:
                cut = len(chunk)
            super().consume(chunk[:cut])
            chunk = chunk[cut:]

    def consume_event(self, event: ServerSentEvent) -> None:
        super().consume_event(event)
        self._resync()

    def _resync(self) -> None:
        """Back onto the fast path if the parsed frames left us exactly where the numbered run expects."""
        expected = self._expected
        k = self.next_number
        if expected is None or self.error is not None or not 1 <= k <= LINES or k % STAMP_EVERY == 0:
            return
        if self.last_id == expected.first_id + k - 2:
            self._segment = (k - 1) // STAMP_EVERY
            self._offset = expected.offsets[k]

    def on_log(self, event_id: int, line: str) -> None:
        number_text, _, stamp = line.partition(" ")
        if not number_text.isdigit() or (stamp and not stamp.replace(".", "", 1).isdigit()):
            return  # the engine's step lines
        number = int(number_text)
        if number != self.next_number:
            self.fail(f"line {number} at id {event_id} where {self.next_number} was expected")
        if number == 1 and self._expected is None:
            self._expected = numbered_frames(event_id)
        if stamp:
            self.lags_ms.append((self._received_at - float(stamp)) * 1000)
        elif number % STAMP_EVERY == 0:
            self.fail(f"line {number} carries no stamp")
        self.next_number = number + 1


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


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
    tcp: dict[str, int]  # change of the kernel's TcpExt counters over the run


async def _run_once(count: int) -> RunResult:
    # A fresh daemon per N: VmHWM is the peak over the process's life, so it
    # only isolates this N's peak if nothing else ran in that process.
    async with Daemon() as daemon, harness.client_session(unlimited=True) as session:
        idle = daemon.rss_mib()
        context = harness.make_context({"Dockerfile": DOCKERFILE})
        daemon_cpu_start, harness_cpu_start = daemon.cpu_seconds(), time.process_time()
        tcp_before = harness.tcp_counters()
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
        tcp_after = harness.tcp_counters()
        tcp = {name: tcp_after[name] - tcp_before.get(name, 0) for name in tcp_after}
        alive = daemon.alive()
        status: dict = {}
        peak = daemon_cpu = None
        if alive:
            peak = daemon.peak_rss_mib()
            daemon_cpu = daemon.cpu_seconds() - daemon_cpu_start
            status = await harness.get_build(session, daemon, build_id)
        else:
            harness.progress(f"daemon died; log tail:\n{daemon.log_tail()}")
    await harness.remove_images([status.get("image_id")])
    return RunResult(
        followers=followers,
        status=status,
        idle_rss_mib=idle,
        peak_rss_mib=peak,
        daemon_cpu_s=daemon_cpu,
        harness_cpu_s=harness_cpu,
        daemon_alive=alive,
        submitted_at=submitted_at,
        tcp=tcp,
    )


async def _engine_baseline() -> tuple[list[float], int]:
    """The same build POSTed straight to the engine's /build, read by one client: the lag with no daemon.

    Returns the stamp lags (ms) and how many numbered lines arrived.
    """
    tag = "bench-fanout-engine:latest"
    context = harness.make_context({"Dockerfile": DOCKERFILE})
    lags: list[float] = []
    numbers = 0
    pending = b""
    text = ""  # the engine cuts its output into "stream" messages anywhere, even mid-line
    async with (
        harness.engine_session() as engine,
        engine.post(
            f"{harness.ENGINE_API}/build",
            data=context,
            params={"t": tag, "nocache": "1", "rm": "1", "forcerm": "1"},
            headers={"Content-Type": "application/x-tar"},
        ) as response,
    ):
        async for chunk in response.content.iter_any():
            received_at = time.time()
            *messages, pending = (pending + chunk).split(b"\n")
            for message in messages:
                if not message.strip():
                    continue
                *lines, text = (text + json.loads(message).get("stream", "")).split("\n")
                for line in lines:
                    number, _, stamp = line.partition(" ")
                    if number.isdigit():
                        numbers += 1
                        if stamp:
                            lags.append((received_at - float(stamp)) * 1000)
    await harness.remove_images([tag])
    return lags, numbers


def _lags(result: RunResult) -> list[float]:
    return [lag for f in result.followers for lag in f.lags_ms]


def _row(count: int, result: RunResult) -> list[object]:
    followers = result.followers
    complete = sum(f.complete for f in followers)
    lines = sorted({f.log_lines for f in followers})
    lags = _lags(result)
    return [
        count,
        f"{complete}/{count}" if complete == count else f"**{complete}/{count}**",
        " / ".join(str(n) for n in lines) if len(lines) <= 3 else f"{lines[0]}–{lines[-1]}",
        f"{len(lags):,}",
        harness.fmt(percentile(lags, 50), 0),
        harness.fmt(percentile(lags, 99), 0),
        harness.fmt(max(lags) if lags else None, 0),
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
            f"N={count}: streams open (response headers read) after submit: median "
            f"{harness.median(opened) * 1000:.0f} ms, p99 {percentile(opened, 99) * 1000:.0f} ms, "
            f"slowest {max(opened) * 1000:.0f} ms; "
            f"kernel TCP counters over the run: "
            + (", ".join(f"{k} +{v}" for k, v in result.tcp.items()) or "n/a")
            + "; "
            f"last stream closed {max(finished):.2f} s after submit; "
            f"harness CPU {result.harness_cpu_s:.1f} s; "
            f"{fast / max(frames, 1):.0%} of frames verified by byte comparison, the rest parsed."
        )
    first = [f.lags_ms[0] for f in followers if f.lags_ms]
    last = [f.lags_ms[-1] for f in followers if len(f.lags_ms) == STAMPS]
    if first and last:
        notes.append(
            f"N={count}: lag of line {STAMP_EVERY:,} (median over clients) {harness.median(first):.0f} ms; "
            f"of line {LINES:,} {harness.median(last):.0f} ms."
        )
    return notes


async def run() -> Result:
    harness.raise_fd_limit()
    rows, notes, results = [], [], {}
    engine_lags, engine_numbers = await _engine_baseline()
    rows.append(
        [
            "engine directly, 1 client (reference)",
            "—",
            f"{engine_numbers} numbered",
            f"{len(engine_lags)}",
            harness.fmt(percentile(engine_lags, 50), 0),
            harness.fmt(percentile(engine_lags, 99), 0),
            harness.fmt(max(engine_lags) if engine_lags else None, 0),
            "—",
            "—",
            "—",
            "—",
        ]
    )
    for count in FOLLOWER_COUNTS:
        harness.progress(f"fanout: {count} follower(s)")
        result = await _run_once(count)
        results[count] = result
        rows.append(_row(count, result))
        notes += _notes(count, result)
        harness.progress(f"fanout: {count} follower(s): {rows[-1]}")
    table = harness.markdown_table(
        [
            "followers",
            "complete",
            "log lines per client",
            "lag samples",
            "lag p50 (ms)",
            "lag p99 (ms)",
            "lag max (ms)",
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

It prints the numbers 1..{LINES:,}; every {STAMP_EVERY}th line is `<n> <sec>.<µs>`, the container's clock when awk
wrote it (busybox `date` has no `%N`; busybox `adjtimex` reads the kernel's realtime clock in µs, which
container and host share), flushed at once. N followers open `GET /builds/{{id}}/logs`
(`Accept: text/event-stream`, from the start) concurrently right after the 202, over one aiohttp session
with no connection limit. Each checks ids are exactly 1..k, the lines 1..{LINES:,} arrive once each in order,
all {STAMPS} stamps arrive, and the stream ends with a `done` frame of a succeeded build; *complete* counts
followers that passed every check; *log lines* counts `log` frames (the numbered lines plus the engine's
step lines).

*Lag*: host `time.time()` when the harness read the network chunk holding a stamped line, minus its
stamp: engine, daemon and delivery to that client, sampled every {STAMP_EVERY} lines, pooled over all
clients ({STAMPS} samples per client); nearest-rank percentiles. The first row is the reference: the same
build POSTed straight to the engine's `/build` (unix socket) and read by one client, so the engine's own
share of the lag. The harness reads all N streams on one
event loop on the same two cores as the daemon, so at large N some lag is the harness's own queueing
(its CPU time is in the notes). *Build wall*: `created_at` → `finished_at` from `GET /builds/{{id}}`.
*Peak RSS*: the daemon's `VmHWM` after the run, from a fresh daemon per N; *idle*: its `VmRSS` before the
submit. *Daemon CPU*: user + system time of the daemon process from the submit until every follower was
done (from `/proc/<pid>/stat`). The notes give when the streams opened (response headers read) and the
change of the kernel's TcpExt counters over the run: `ListenOverflows`/`ListenDrops` count connection
attempts dropped because the daemon's accept queue (its listen backlog) was full, `TCPSynRetrans` the SYNs
clients then had to resend, 1 s, 3 s, 7 s, 15 s … after the first. The harness raises its open-file limit
(`RLIMIT_NOFILE`) before it starts
the daemon, which inherits it."""
    parts = [method, table]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    top = max(FOLLOWER_COUNTS)
    top_result = results[top]
    p99 = percentile(_lags(top_result), 99)
    complete = sum(f.complete for f in top_result.followers)
    return Result(
        body="\n\n".join(parts),
        headlines=[
            Headline(
                "fanout",
                f"{top} followers: lag p99 {harness.fmt(p99, 0)} ms "
                f"(p50 {harness.fmt(percentile(_lags(top_result), 50), 0)} ms), "
                f"{complete}/{top} clients complete",
                f"p99 < {TARGET_P99_MS:.0f} ms, all complete",
                p99 is not None and p99 < TARGET_P99_MS and complete == top,
            )
        ],
        bars=[Bar(f"fanout {top}: p99 lag ÷ 500 ms", None if p99 is None else max(p99, 1) / TARGET_P99_MS, 1.0)],
    )
