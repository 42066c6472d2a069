"""Shared machinery for the benchmark scenarios.

Every scenario runs the real `builder serve` as a subprocess (so its memory and
CPU are its own and measurable from /proc) against the real Docker engine, and
talks to it only over HTTP, like any client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiodocker
import aiohttp

from builder.client.sse import ServerSentEvent, SSEDecoder

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("BUILDER_BASE_IMAGE", "builder-busybox:latest")
SSE_HEADERS = {"Accept": "text/event-stream"}
TERMINAL_TYPES = frozenset({"done", "error"})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

STARTUP_TIMEOUT = 30.0
STOP_GRACE = 10.0


# Daemons that died on their own or exited non-zero when stopped, in order: the report names them
# under the scenario they happened in (a crash is a finding, not something to work around).
@dataclass(frozen=True)
class DaemonProblem:
    what: str
    workdir: Path  # kept, with the daemon's log


DAEMON_PROBLEMS: list[DaemonProblem] = []


def progress(message: str) -> None:
    # Progress goes to stderr so a long run is visibly alive; results go to the report.
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """One `builder serve` subprocess with its own port and data dir.

    Use as `async with Daemon() as daemon:`. The data dir (with the daemon's log)
    is removed afterwards unless the daemon died or exited non-zero, so a
    misbehaving run leaves its evidence behind.
    """

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="builder-bench-"))
        self.log_path = self.workdir / "daemon.log"
        self._extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        # Set when the daemon exited on its own before we stopped it.
        self.died_early = False

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        cmd = [
            str(REPO_ROOT / ".venv" / "bin" / "builder"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.workdir / "data"),
            "--log-format",
            "json",
            *self._extra_args,
        ]
        # A plain Popen (not asyncio's) so poll() answers synchronously; both calls return at once.
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                if not self.alive():
                    raise RuntimeError(f"daemon exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with session.get(f"{self.base_url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"daemon did not answer /healthz within {STARTUP_TIMEOUT:.0f}s")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        proc = self._proc
        if proc is None or self.exit_code is not None:
            return
        if proc.poll() is not None:
            self.died_early = True
        else:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                progress(f"daemon {proc.pid} ignored SIGTERM for {STOP_GRACE:.0f}s; killing it")
                proc.kill()
                proc.wait()
        self.exit_code = proc.returncode
        if self.died_early or self.exit_code != 0:
            progress(f"daemon exit code {self.exit_code}; keeping {self.workdir}")
            what = "died before the harness stopped it" if self.died_early else "exited non-zero on SIGTERM"
            last = next(
                (
                    line
                    for line in reversed(self.log_tail(40).splitlines())
                    if line.strip() and not line.startswith("sys:")
                ),
                "",
            )
            DAEMON_PROBLEMS.append(
                DaemonProblem(
                    f"`builder serve` {what} (exit code {self.exit_code}), last log line `{last.strip()[:300]}`",
                    self.workdir,
                )
            )
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # /proc readings of the daemon process.

    def proc_status_kib(self, field: str) -> int:
        """A `kB` field of /proc/<pid>/status, e.g. VmRSS (current) or VmHWM (peak RSS so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_mib(self) -> float:
        return self.proc_status_kib("VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return self.proc_status_kib("VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon has used so far (all its threads)."""
        return cpu_seconds(self.pid)

    def reset_peak_rss(self) -> bool:
        """Start VmHWM afresh from the current RSS (Linux `clear_refs` 5); False if not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (all its threads), from /proc/<pid>/stat."""
    # Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- builds


def make_context(files: Mapping[str, str | bytes]) -> bytes:
    """An in-memory tar.gz build context."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dockerfile(*steps: str) -> str:
    return "\n".join([f"FROM {BASE_IMAGE}", *steps]) + "\n"


async def submit_build(session: aiohttp.ClientSession, daemon: Daemon, context: bytes, **fields: str) -> str:
    """POST a raw tar.gz context (fields as query parameters); returns the build id."""
    async with session.post(
        f"{daemon.base_url}/builds", data=context, params=fields, headers={"Content-Type": "application/gzip"}
    ) as response:
        body = await response.json()
        if response.status != 202:
            raise RuntimeError(f"POST /builds answered {response.status}: {body}")
        return body["build_id"]


async def get_build(session: aiohttp.ClientSession, daemon: Daemon, build_id: str) -> dict[str, Any]:
    async with session.get(f"{daemon.base_url}/builds/{build_id}") as response:
        response.raise_for_status()
        return await response.json()


async def cancel_build(session: aiohttp.ClientSession, daemon: Daemon, build_id: str) -> tuple[int, dict[str, Any]]:
    async with session.delete(f"{daemon.base_url}/builds/{build_id}") as response:
        return response.status, await response.json()


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)  # 3.11+ reads the trailing Z


def build_wall_seconds(status: Mapping[str, Any], since: str = "created_at") -> float | None:
    """`since` (created_at, or started_at: its time out of the queue) → finished_at of a finished
    build, as the daemon recorded it."""
    if not status.get(since) or not status.get("finished_at"):
        return None
    return (parse_time(status["finished_at"]) - parse_time(status[since])).total_seconds()


def logs_url(daemon: Daemon, build_id: str) -> str:
    return f"{daemon.base_url}/builds/{build_id}/logs"


async def subscriber_count(session: aiohttp.ClientSession, daemon: Daemon) -> int:
    """Open log streams, as the daemon reports them on /healthz."""
    async with session.get(daemon.base_url + "/healthz") as response:
        return (await response.json())["log_followers"]


async def engine_version() -> str:
    async with aiodocker.Docker() as docker:
        info = await docker.version()
    return f"Docker Engine {info.get('Version', '?')} (API {info.get('ApiVersion', '?')})"


async def remove_image(image_id: str | None) -> None:
    """Drop an image a scenario built, so repeated runs do not pile up images in the engine."""
    if not image_id:
        return
    async with aiodocker.Docker() as docker:
        with contextlib.suppress(aiodocker.DockerError):
            await docker.images.delete(image_id, force=True)


# ---------------------------------------------------------------- SSE following


class LogFollower:
    """Follows one build's log stream and checks the SSE contract as it goes.

    The bytes go through the SDK's decoder. Checks: every event came in a frame of exactly
    one `id:` and one `data:` line; ids are exactly 1..k with no gap or repeat; the stream
    ends with a terminal frame and then EOF, not inside a frame. The first violation is
    kept in `error` (reading goes on, so counts stay meaningful). Subclasses hook `on_log`
    to check the content of log lines.
    """

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.last_id = 0
        self.log_lines = 0
        self.terminal: dict[str, Any] | None = None
        self.error: str | None = None
        self.opened_at: float | None = None  # wall clock when the response headers arrived
        self.ended_at: float | None = None

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    @property
    def ok(self) -> bool:
        return self.error is None and self.terminal is not None

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url, headers=SSE_HEADERS) as response:
                if response.status != 200:
                    self.fail(f"HTTP {response.status}: {(await response.text())[:200]}")
                    return
                self.opened_at = time.time()
                async for chunk in response.content.iter_any():
                    self.consume(chunk)
            if self.decoder.incomplete:
                self.fail(f"stream ended inside the frame after id {self.last_id}")
            if self.terminal is None:
                self.fail(f"stream ended after id {self.last_id} without a terminal frame")
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            self.fail(f"connection error after id {self.last_id}: {type(exc).__name__}: {exc}")
        finally:
            self.ended_at = time.time()

    def consume(self, chunk: bytes) -> None:
        """Handle bytes as they arrive."""
        for event in self.decoder.feed(chunk):
            self.consume_event(event)

    def consume_event(self, event: ServerSentEvent) -> None:
        if event.fields != ("id", "data") or not event.id.isdigit():
            self.fail(f"frame after id {self.last_id} has the fields {event.fields} and id {event.id!r}")
            return
        event_id = int(event.id)
        if self.terminal is not None:
            self.fail(f"frame {event_id} after the terminal frame")
        if event_id != self.last_id + 1:
            self.fail(f"id {event_id} follows id {self.last_id}")
        self.last_id = event_id
        payload = json.loads(event.data)
        if payload.get("type") == "log":
            self.log_lines += 1
            self.on_log(event_id, payload["line"])
        elif payload.get("type") in TERMINAL_TYPES:
            self.terminal = payload

    def on_log(self, event_id: int, line: str) -> None:
        pass


# ---------------------------------------------------------------- reporting


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@contextlib.asynccontextmanager
async def client_session(*, unlimited: bool = False) -> AsyncIterator[aiohttp.ClientSession]:
    """A session without a total timeout (builds and streams run long).

    `unlimited` lifts aiohttp's default cap of 100 connections, which would
    otherwise queue the 101st follower behind the first hundred.
    """
    connector = aiohttp.TCPConnector(limit=0) if unlimited else aiohttp.TCPConnector()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


# ---------------------------------------------------------------- results for the report's headline and chart


@dataclass(frozen=True)
class Headline:
    """One row of the report's headline table."""

    scenario: str
    measured: str  # "1.03 (builder / legacy docker build)" or a key number
    target: str  # "≤ 1.05", or "—" when the issue sets none
    met: bool | None  # None: no target, or nothing to judge


@dataclass(frozen=True)
class Bar:
    """One bar of benchmarks/ratios.png: a ratio and the target it is held to."""

    label: str
    ratio: float | None
    target: float | None = None
    higher_is_better: bool = False  # True: the target is a minimum (≥), else a maximum (≤)

    @property
    def met(self) -> bool | None:
        if self.ratio is None or self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target


@dataclass
class Result:
    """What a scenario hands back: its report section, headline rows and chart bars."""

    body: str
    headlines: list[Headline] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)


def met_text(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]


# ---------------------------------------------------------------- kernel TCP counters

TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")


def tcp_memory_mib() -> float | None:
    """Memory the kernel holds in TCP buffers, all sockets of this network namespace (/proc/net/sockstat)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return None


def tcp_counters() -> dict[str, int]:
    """Some TcpExt counters of this network namespace (machine-wide, not per process)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table[name]) for name in TCP_COUNTERS if name in table}
    return {}


# ---------------------------------------------------------------- process limits


def raise_fd_limit(wanted: int = 65536) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (soft, and hard when we may); child processes such as the daemon inherit it.

    1,000 concurrent followers need ~1,000 sockets in the harness and as many in the daemon.
    Returns the (soft, hard) limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        # Not root: the soft limit can still go up to the hard one.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------- the docker CLI and the engine's API

# Debian's client, matching the engine it ships (another `docker` on PATH may be a different build).
DOCKER_CLI = "/usr/bin/docker"
DOCKER_SOCKET = "/var/run/docker.sock"
ENGINE_API = "http://docker/v1.41"


@contextlib.asynccontextmanager
async def engine_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session that talks to the engine's API directly over its unix socket."""
    connector = aiohttp.UnixConnector(path=DOCKER_SOCKET, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


async def remove_images(refs: Sequence[str | None]) -> None:
    """Remove images (tags or ids) a scenario built; tags it never got are ignored."""
    refs = [r for r in refs if r]
    if not refs:
        return
    async with aiodocker.Docker() as docker:
        for ref in refs:
            with contextlib.suppress(aiodocker.DockerError):
                await docker.images.delete(ref, force=True)


@dataclass
class CommandRun:
    seconds: float
    returncode: int
    stderr: bytes
    stdout: bytes = b""


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    capture_stdout: bool = False,
    check: bool = True,
) -> CommandRun:
    """Run a command to its exit; the time is spawn → exit (and, with capture_stdout, → EOF on its stdout).

    stdout goes to /dev/null unless captured; stderr is kept for error messages.
    """
    full_env = {**os.environ, **(env or {})}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=full_env,
    )
    stdout, stderr = await proc.communicate()
    seconds = time.perf_counter() - started
    run = CommandRun(seconds=seconds, returncode=proc.returncode or 0, stderr=stderr or b"", stdout=stdout or b"")
    if check and run.returncode != 0:
        tail = run.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {run.returncode}:\n{tail}")
    return run


# ---------------------------------------------------------------- context content

_WORDS = (
    b"the build context holds source files configuration assets and tests; a layer copies them "
    b"into the image where each step runs its command and the engine commits the result as a new "
    b"layer alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
).split()


def mixed_content(rng: random.Random, size: int) -> bytes:
    """`size` bytes: the first half random (incompressible), the second half word salad.

    gzip -6 shrinks the whole to about 60% of its size: neither trivially
    compressible (all zeros) nor incompressible (all random).
    """
    half = size // 2
    random_part = rng.randbytes(half)
    text = bytearray()
    need = size - half
    while len(text) < need:
        text += b" ".join(rng.choices(_WORDS, k=max(1, (need - len(text)) // 6 + 16))) + b"\n"
    return random_part + bytes(text[:need])


def write_files(directory: Path, *, count: int, total_bytes: int, seed: int, subdir: str = "files") -> None:
    """`count` files of mixed content adding up to `total_bytes`, under directory/subdir."""
    rng = random.Random(seed)
    target = directory / subdir
    target.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(total_bytes, count)
    for i in range(count):
        (target / f"f{i:03d}.bin").write_bytes(mixed_content(rng, base + (1 if i < extra else 0)))


def tar_gz_of_directory(directory: Path, compresslevel: int = 6) -> bytes:
    """The directory as an in-memory tar.gz, entries relative to it (Dockerfile at the top)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=compresslevel) as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buffer.getvalue()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
