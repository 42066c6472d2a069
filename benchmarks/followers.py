"""Log followers for the fan-out benchmarks, many to a worker process (`FollowerProcesses`).

A fan-out benchmark on two cores measures the harness as much as the daemon if it decodes
every frame of a thousand streams. The *cheap* followers don't: a worker runs hundreds of
them on one bare epoll loop (no asyncio, no aiohttp client), undoes the HTTP chunking, and
then only counts `id:` frames (numpy finds the newlines), keeps the last id and the last
frame, and finds the marker lines (a memchr-speed `bytes.find`) to note when each arrived.
What they do not check (that every line is the right one, in order) a few *content*
followers check on the same build, decoding every frame with the SDK's decoder, in a process
of lowest priority: they may fall behind; the cheap ones time the markers.

*When a marker arrived* is the kernel's receive timestamp of the read that held it
(`SO_TIMESTAMPNS`: when the segment reached the socket; TCP gives the latest segment's when a
read spans several), not when the worker got round to reading it: a busy harness delays its
reads, not the figure. How long reads waited is reported beside it (*read delay*).

Modes of a worker: `read` (cheap followers, to the end of the stream), `idle` (cheap
followers that stop reading once the response headers are in and hold their sockets open
until the parent writes a line to stdin), `check` (content followers). A worker talks to its
parent on stdio: one JSON line once every stream is open, then one with its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import numpy as np

from benchmarks import harness

# A marker line is `@M <line number> <seconds>.<microseconds>`, the second part being the build
# container's wall clock when it wrote the line (see benchmarks/fanout.py). No other byte of the
# stream is likely to be an "@", and a one-byte find runs at memchr speed.
MARKER = b"@M "
MARKER_LINE = re.compile(r"@M (\d+) \d+\.\d{6}")
# At most this many connections of one worker wait for their response headers at once: a
# thousand SYNs at once would overflow the daemon's accept queue and measure SYN retries.
CONNECTS_IN_FLIGHT = 64
RECV_SIZE = 1 << 18
# Not in Python's socket module; the asm-generic value (x86-64, arm64).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
# Above this many bytes numpy counts id frames faster than `bytes.count` (it costs ~6 µs a call).
_NUMPY_FROM = 16 * 1024

Mode = Literal["read", "idle", "check"]
# Nice values. The cheap followers run at the default priority. At a lower one (nice 10) the
# machine's other load delays their reads, TCP merges the segments waiting meanwhile, and a marker's
# arrival becomes the later segment's (measured in a burst: read delay p99 1.3–2.5 s instead of
# 0.2 s); at a higher one they would take the CPU from the daemon. The content check must never take
# CPU anyone else wants.
PRIORITY: dict[str, int] = {"read": 0, "idle": 0, "check": 19}


@dataclass(frozen=True)
class Spec:
    host: str
    port: int
    path: str
    count: int
    mode: Mode
    deadline: float  # seconds from start-up; then every stream still open is cut and reported
    rcvbuf: int = 0  # SO_RCVBUF of every socket (0: the kernel's default)
    mss: int = 0  # TCP_MAXSEG announced to the daemon (0: loopback's 64 KiB), see fanout_idle
    lines: int = 0  # `check` mode: the build's numbered lines
    marker_every: int = 0  # `check` mode: every this many lines is a marker


@dataclass
class Tally:
    """One cheap follower's stream, as far as it was checked (all times are wall-clock seconds)."""

    status: int = 0  # HTTP status
    opened_at: float = 0.0  # response headers read
    ended_at: float = 0.0
    frames: int = 0  # id frames
    last_id: int = 0
    terminal: str = ""  # the data of the last frame, when the stream ended cleanly
    markers: int = 0
    last_marker: int = 0  # its line number: markers must come in order
    first_stamp: float = 0.0  # when the build wrote the first marker this follower got
    last_stamp: float = 0.0
    lags_ms: list[float] = field(default_factory=list)  # arrival − stamp, per marker
    # Markers whose read also held a later daemon write (HTTP chunk): their segments may have
    # been merged with later ones, whose arrival time they then carry (an upper bound).
    inexact: int = 0
    error: str = ""

    def fail(self, message: str) -> None:
        self.error = self.error or message


def id_frames(data: bytes, end: int) -> int:
    """How many `id:` frames data[:end] holds, whole frames from a frame start.

    An id frame is `id: N\ndata: J\n\n` (J is one line of JSON), so a frame starts with `id: `
    exactly where one follows a newline or the start. For a large buffer, numpy instead counts
    newlines: an id frame has three, a `retry:` or comment frame two, and every frame ends with
    its only two adjacent ones, so ids = newlines − 2 × frames; twice the speed of `count`.
    """
    if end < _NUMPY_FROM:
        return data.count(b"\nid: ", 0, end) + data.startswith(b"id: ")
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8, count=end) == ord("\n"))
    return len(newlines) - 2 * int(np.count_nonzero(np.diff(newlines) == 1))


class CheapStream:
    """One cheap follower's response, fed as it arrives and tallied without decoding a frame."""

    def __init__(self, *, idle: bool) -> None:
        self.tally = Tally()
        self.idle = idle  # stop at the response headers
        self.opened = False  # the response headers are in
        self.ended = False  # nothing more to read: the last chunk came, or the stream failed
        self._head = b""  # response head, until it is complete
        self._chunked = False
        self._chunk_left = 0  # payload bytes left in the current HTTP chunk
        self._crlf_left = 0  # bytes of the CRLF after it
        self._size_line = b""  # a chunk-size line cut by a read
        self._carry = b""  # the SSE frame a read ended inside
        self._last_frame = b""
        self._read_markers = 0  # markers of the last HTTP chunk so far in the current read

    def feed(self, data: bytes, at: float) -> None:
        """Bytes of the response, which reached the socket at `at` (wall clock)."""
        self._read_markers = 0
        if not self.opened:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end].lower(), self._head[end + 4 :]
            self._head = b""
            self.opened = True
            self.tally.status = int(head.split(b" ", 2)[1])
            self.tally.opened_at = at
            if self.tally.status != 200:
                self.tally.fail(f"HTTP {self.tally.status}")
                self.ended = True
                return
            self._chunked = b"\r\ntransfer-encoding: chunked" in head
            if self.idle:
                return
        if not self._chunked:
            self._payload(data, at)
            return
        pos, size = 0, len(data)
        while pos < size and not self.ended:
            if self._chunk_left:
                end = min(size, pos + self._chunk_left)
                self._payload(data[pos:end], at)
                self._chunk_left -= end - pos
                pos = end
            elif self._crlf_left:
                skip = min(self._crlf_left, size - pos)
                self._crlf_left -= skip
                pos += skip
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self._size_line += data[pos:]
                    return
                line, self._size_line = self._size_line + data[pos:newline], b""
                pos = newline + 1
                self._chunk_left = int(line.split(b";", 1)[0], 16)
                self._crlf_left = 2
                # A later write in the same read: the markers before it may carry its arrival time.
                self.tally.inexact += self._read_markers if self._chunk_left else 0
                self._read_markers = 0
                if not self._chunk_left:
                    self._end(at)

    def lost(self, reason: str, at: float) -> None:
        """The connection ended (`reason`: "EOF" or an error) before the stream did."""
        if self.opened and not self._chunked and reason == "EOF" and not self.tally.error:
            self._end(at)  # without chunking, the body ends with the connection
            return
        self.ended = True
        self.tally.ended_at = at
        where = f"after id {self.tally.last_id}" if self.opened else "before the response headers"
        self.tally.fail(f"connection lost {where} ({reason})")

    def _payload(self, piece: bytes, at: float) -> None:
        """Tally the whole frames in `piece` (after what the last read left); keep the rest."""
        data = self._carry + piece if self._carry else piece
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            self._carry = data
            return
        tally = self.tally
        tally.frames += id_frames(data, end)
        last = data.rfind(b"\nid: ", 0, end) + 1
        if last or data.startswith(b"id: "):
            tally.last_id = int(data[last + 4 : data.index(b"\n", last)])
        marker = data.find(b"@", 0, end)
        while marker >= 0:
            if not data.startswith(MARKER, marker):
                marker = data.find(b"@", marker + 1, end)
                continue
            close = data.index(b'"', marker)
            number, stamp_text = data[marker + 3 : close].split(b" ")
            line, stamp = int(number), float(stamp_text)
            if line <= tally.last_marker:
                tally.fail(f"marker of line {line} after that of line {tally.last_marker}")
            tally.last_marker = line
            tally.markers += 1
            tally.first_stamp = tally.first_stamp or stamp
            tally.last_stamp = stamp
            tally.lags_ms.append(round((at - stamp) * 1000, 2))
            self._read_markers += 1
            marker = data.find(b"@", close, end)
        before = data.rfind(b"\n\n", 0, end - 2)
        self._last_frame = data[before + 2 if before >= 0 else 0 : end]
        self._carry = data[end:]

    def _end(self, at: float) -> None:
        self.ended = True
        self.tally.ended_at = at
        data_at = self._last_frame.find(b"\ndata: ")
        self.tally.terminal = self._last_frame[data_at + 7 :].decode(errors="replace").strip() if data_at >= 0 else ""
        if self._carry:
            self.tally.fail(f"stream ended inside the frame after id {self.tally.last_id}")


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The kernel's receive timestamp among a recvmsg's ancillary data."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = _TIMESPEC.unpack_from(value)
            return seconds + nanoseconds / 1e9
    return None


class CheapWorker:
    """`spec.count` cheap followers of one URL on one epoll loop."""

    def __init__(self, spec: Spec) -> None:
        self._spec = spec
        self._request = (
            f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        self.streams = [CheapStream(idle=spec.mode == "idle") for _ in range(spec.count)]
        self._to_connect = iter(self.streams)
        self._poller = select.epoll()
        self._polled: dict[int, tuple[socket.socket, CheapStream]] = {}
        self._connecting: set[int] = set()  # fds whose connect has not completed
        self._held: list[socket.socket] = []  # idle mode: open, never read again
        self._pending_heads = 0  # streams connecting or waiting for their response headers
        self._unsettled = spec.count  # streams neither open nor failed
        self.read_delays_ms: list[float] = []  # per read: when it was read − when its bytes arrived
        self.bytes_read = 0

    def run(self, deadline: float) -> None:
        """Follow every stream to its end (read mode), or hold them until stdin says (idle mode)."""
        self._connect_more()
        announced = False
        while self._polled or not announced:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            for fd, events in self._poller.poll(min(timeout, 1.0)):
                self._handle(fd, events)
            if not announced and not self._unsettled:
                _opened()
                announced = True
                if self._spec.mode == "idle":
                    sys.stdin.readline()  # whatever the parent writes (or its exit) means: hang up now
                    break
        now = time.time()
        for fd, (_sock, stream) in list(self._polled.items()):
            if not stream.ended:
                stream.lost("still open at the deadline" if self._spec.mode == "read" else "hung up", now)
            self._drop(fd)
        for sock in self._held:
            sock.close()

    def _connect_more(self) -> None:
        while self._pending_heads < CONNECTS_IN_FLIGHT and (stream := next(self._to_connect, None)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # Both before connect: they shape the window and segment size the daemon is offered.
            if self._spec.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._spec.rcvbuf)
            if self._spec.mss:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self._spec.mss)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            code = sock.connect_ex((self._spec.host, self._spec.port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                stream.lost(f"connect: {os.strerror(code)}", time.time())
                self._unsettled -= 1
                continue
            fd = sock.fileno()
            self._polled[fd] = (sock, stream)
            self._connecting.add(fd)
            self._poller.register(fd, select.EPOLLOUT)
            self._pending_heads += 1

    def _handle(self, fd: int, events: int) -> None:
        sock, stream = self._polled[fd]
        if fd in self._connecting:
            self._connecting.discard(fd)
            if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._fail(fd, f"connect: {os.strerror(code)}")
                return
            try:
                sock.send(self._request)  # a few dozen bytes into an empty send buffer
            except OSError as exc:
                self._fail(fd, f"send: {exc}")
                return
            self._poller.modify(fd, select.EPOLLIN)
            return
        try:
            data, ancillary, _, _ = sock.recvmsg(RECV_SIZE, 64)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(fd, str(exc))
            return
        now = time.time()
        if not data:
            self._fail(fd, "EOF")
            return
        arrived = _arrival(ancillary) or now
        self.bytes_read += len(data)
        self.read_delays_ms.append((now - arrived) * 1000)
        opened = stream.opened
        stream.feed(data, arrived)
        if stream.opened and not opened:
            self._settled()
            if stream.idle and not stream.ended:
                # From here on the kernel's buffers fill and the daemon's writes to us stall.
                self._poller.unregister(fd)
                del self._polled[fd]
                self._held.append(sock)
                return
        if stream.ended:
            self._drop(fd)

    def _fail(self, fd: int, reason: str) -> None:
        stream = self._polled[fd][1]
        if not stream.opened:
            self._settled()
        stream.lost(reason, time.time())
        self._drop(fd)

    def _settled(self) -> None:
        self._pending_heads -= 1
        self._unsettled -= 1
        self._connect_more()

    def _drop(self, fd: int) -> None:
        sock, _ = self._polled.pop(fd)
        self._connecting.discard(fd)
        self._poller.unregister(fd)
        sock.close()


class ContentFollower(harness.LogFollower):
    """Decodes the whole stream with the SDK's decoder: lines 1..N once each, in order, every
    `marker_every`th a marker and no other, and a `done` frame of a succeeded build last."""

    def __init__(self, lines: int, marker_every: int) -> None:
        super().__init__()
        self.lines = lines
        self.marker_every = marker_every
        self.next_line = 1
        self.other_lines = 0  # the engine's own log lines

    @property
    def complete(self) -> bool:
        return (
            self.ok
            and self.terminal is not None
            and self.terminal.get("status") == "succeeded"
            and self.next_line == self.lines + 1
        )

    def on_log(self, event_id: int, line: str) -> None:
        if match := MARKER_LINE.fullmatch(line):
            number, marker = int(match[1]), True
        elif line.isdigit():
            number, marker = int(line), False
        else:
            self.other_lines += 1
            return
        if number != self.next_line:
            self.fail(f"line {number} at id {event_id} where {self.next_line} was expected")
        if marker != (number % self.marker_every == 0):
            self.fail(f"line {number} at id {event_id} {'is' if marker else 'is not'} a marker")
        self.next_line = number + 1


@dataclass
class Check:
    """A content-checked follower's verdict."""

    complete: bool
    error: str
    last_id: int
    other_lines: int
    ended_at: float


def _emit(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _opened() -> None:
    _emit({"event": "open", "at": time.time()})


async def _check(spec: Spec, deadline: float) -> list[Check]:
    url = f"http://{spec.host}:{spec.port}{spec.path}"
    followers = [ContentFollower(spec.lines, spec.marker_every) for _ in range(spec.count)]
    async with harness.client_session(unlimited=True) as session:
        tasks = [asyncio.create_task(f.run(session, url)) for f in followers]
        while not all(f.opened_at or t.done() for f, t in zip(followers, tasks, strict=True)):
            await asyncio.sleep(0.01)
        _opened()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for follower in followers:
        if follower.terminal is None:
            follower.fail(f"no terminal frame by the deadline, after id {follower.last_id}")
    return [Check(f.complete, f.error or "", f.last_id, f.other_lines, f.ended_at or 0.0) for f in followers]


def main(spec_json: str) -> None:
    """A worker process's life (see the module's docstring)."""
    spec = Spec(**json.loads(spec_json))
    deadline = time.monotonic() + spec.deadline
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY[spec.mode])
    report: dict[str, Any] = {}
    if spec.mode == "check":
        report["checks"] = [asdict(c) for c in asyncio.run(_check(spec, deadline))]
    else:
        worker = CheapWorker(spec)
        worker.run(deadline)
        report["tallies"] = [asdict(s.tally) for s in worker.streams]
        delays = worker.read_delays_ms
        report["read_delay_ms"] = {"p99": harness.percentile(delays, 99) or 0.0, "max": max(delays, default=0.0)}
        report["reads"], report["bytes_read"] = len(delays), worker.bytes_read
    _emit({"event": "end", "cpu_seconds": time.process_time(), "system_seconds": os.times().system, **report})


# ---------------------------------------------------------------- the parent's side

# One build at a time, so the measured build can wait behind a blocker while its followers
# connect; no cap on connections per client address or on a tenant's log streams.
DAEMON_ARGS = ("--max-concurrent", "1", "--max-connections-per-client", "0", "--max-followers-per-tenant", "100000")
BLOCKER = harness.make_context({"Dockerfile": harness.dockerfile("RUN sleep 600")})
OPEN_TIMEOUT = 60.0


async def submit_behind_blocker(
    session: aiohttp.ClientSession, daemon: harness.Daemon, context: bytes, **fields: str
) -> tuple[str, str]:
    """Submit a blocker build, then the measured one (`no_cache`, and `fields`), which waits in
    the queue (daemon run with DAEMON_ARGS); returns (blocker id, build id). Followers then attach
    before the build prints anything, however long they take to connect; cancelling the blocker
    starts it."""
    blocker = await harness.submit_build(session, daemon, BLOCKER, no_cache="true")
    return blocker, await harness.submit_build(session, daemon, context, no_cache="true", **fields)


async def wait_for_followers(session: aiohttp.ClientSession, daemon: harness.Daemon, count: int) -> None:
    """Until the daemon counts `count` open log streams."""
    deadline = time.monotonic() + OPEN_TIMEOUT
    while (seen := await harness.subscriber_count(session, daemon)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon counts {seen} of {count} log streams after {OPEN_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)


@dataclass
class Report:
    tallies: list[Tally]  # cheap followers
    checks: list[Check]  # content followers
    cpu_seconds: float  # all worker processes, from start-up to exit
    system_seconds: float  # the part spent in the kernel (receiving the bytes, mostly)
    read_delay_p99_ms: float  # the worst cheap worker's (see CheapWorker.read_delays_ms)
    read_delay_max_ms: float
    reads: int  # recvmsg calls that returned data, all cheap workers
    bytes_read: int


class FollowerProcesses:
    """`spec.count` cheap followers in `processes` worker processes, split evenly.

    `open()` returns once every stream is open; then `finish()` (after `hang_up()` in idle
    mode) collects the tallies.
    """

    def __init__(self, spec: Spec, processes: int) -> None:
        processes = max(1, min(processes, spec.count))
        share, extra = divmod(spec.count, processes)
        self._specs = [dataclasses.replace(spec, count=share + (i < extra)) for i in range(processes)]
        self._procs: list[asyncio.subprocess.Process] = []
        self._cpu: dict[int, float] = {}  # last reading per worker: it stands once the worker has exited

    @staticmethod
    def processes_for(count: int, per_process: int, most: int = 4) -> int:
        return max(1, min(most, math.ceil(count / per_process)))

    async def open(self) -> float:
        """Start the workers; returns the wall-clock time the last of their streams opened."""
        for spec in self._specs:
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    "import sys; from benchmarks.followers import main; main(sys.argv[1])",
                    json.dumps(asdict(spec)),
                    cwd=harness.REPO_ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    limit=1 << 30,  # the final report is one long line
                )
            )
        opened: list[float] = []
        for proc in self._procs:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"follower process {proc.pid} exited with {await proc.wait()} before its streams opened"
                )
            opened.append(json.loads(line)["at"])
        return max(opened)

    def cpu_seconds(self) -> float:
        """CPU the workers have used so far (up to their last reading, for one that has exited)."""
        for proc in self._procs:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._cpu[proc.pid] = harness.cpu_seconds(proc.pid)
        return sum(self._cpu.values())

    def hang_up(self) -> None:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(b"close\n")

    async def finish(self) -> Report:
        ends: list[dict[str, Any]] = []
        for proc in self._procs:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            code = await proc.wait()
            if not line:
                raise RuntimeError(f"follower process {proc.pid} exited with {code} without a report")
            ends.append(json.loads(line))
        return Report(
            tallies=[Tally(**t) for end in ends for t in end.get("tallies", ())],
            checks=[Check(**c) for end in ends for c in end.get("checks", ())],
            cpu_seconds=sum(end["cpu_seconds"] for end in ends),
            system_seconds=sum(end["system_seconds"] for end in ends),
            read_delay_p99_ms=max((end["read_delay_ms"]["p99"] for end in ends if "read_delay_ms" in end), default=0.0),
            read_delay_max_ms=max((end["read_delay_ms"]["max"] for end in ends if "read_delay_ms" in end), default=0.0),
            reads=sum(end.get("reads", 0) for end in ends),
            bytes_read=sum(end.get("bytes_read", 0) for end in ends),
        )

    async def kill(self) -> None:
        """Stop workers still running (a scenario that failed half-way)."""
        for proc in self._procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
