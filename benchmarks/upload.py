"""Context upload: 1 GiB into the daemon vs into a trivial sink and straight into the engine,
and the daemon's memory meanwhile.

The same client (curl, streaming the file from disk) POSTs the same 1 GiB tar to a
sink server that reads and discards the body, to the engine's own API, and to a
fresh daemon twice: once with a free build slot (the checked tar streams into the
engine) and once with it taken (the checked tar goes to the spool). Alternating;
the daemon's peak RSS growth is its VmHWM after the upload minus its idle RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, Result

PAIRS = 3
FILES = 64
FILE_BYTES = 16 * 2**20  # 64 × 16 MiB = 1 GiB of file data
MAX_CONTEXT = 4 * 2**30
TARGET_RATIO = 0.90  # daemon throughput / the same upload without the daemon, at least
TARGET_RSS_MIB = 64.0
DOCKERFILE = harness.dockerfile("RUN true")
BLOCKER = harness.dockerfile("RUN sleep 300")


def write_context(path: Path) -> int:
    """A plain tar of a Dockerfile and FILES files, each half random, half repeated text; returns its size."""
    text_block = (b"compressible build context text, the same words again and again; " * 1000)[: 2**16]
    half = FILE_BYTES // 2
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dockerfile = DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        for i in range(FILES):
            data = os.urandom(half) + (text_block * (half // len(text_block) + 1))[:half]
            info = tarfile.TarInfo(f"files/f{i:02d}.bin")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


async def curl_upload(path: Path, url: str) -> tuple[dict, float, int]:
    """POST the file with curl, streamed from disk; returns (JSON answer, seconds, bytes) from curl's own timing."""
    run = await harness.run_command(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-T",
            str(path),
            "-H",
            "Content-Type: application/x-tar",
            # No 100-continue round trip: the body goes at once, to either server alike.
            "-H",
            "Expect:",
            "-w",
            "\n%{http_code} %{time_total} %{size_upload}",
            url,
        ],
        capture_stdout=True,
    )
    body, _, stats = run.stdout.decode().rpartition("\n")
    code, seconds, size = stats.split()
    if code != "202":
        raise RuntimeError(f"upload to {url} answered {code}: {body[:300]}")
    return json.loads(body), float(seconds), int(float(size))


@contextlib.asynccontextmanager
async def sink_server():
    port = harness.free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "benchmarks.sink", str(port)],
        cwd=harness.REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + harness.STARTUP_TIMEOUT
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sink exited: {proc.stderr.read().decode(errors='replace')}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(url, data=b"x") as response:
                        if response.status == 202:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError("sink did not start")
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run() -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    context = workdir / "context.tar"
    rss: list[dict[str, float]] = []
    sizes: set[int] = set()
    try:
        started = time.perf_counter()
        tar_bytes = await asyncio.to_thread(write_context, context)
        harness.progress(f"upload: wrote {harness.mib(tar_bytes)} in {time.perf_counter() - started:.1f}s")
        async with sink_server() as sink_url:

            async def sink(n: int) -> float:
                _, seconds, size = await curl_upload(context, sink_url)
                sizes.add(size)
                return size / seconds / 1e6

            async def engine(n: int) -> float:
                # The engine's own intake: the same tar straight into BuildKit, as `docker build` sends it.
                seconds, size = await curl_engine(context, f"bench-upload-{n}-{time.time_ns()}")
                sizes.add(size)
                return size / seconds / 1e6

            async def streamed(n: int) -> float:
                return await _into_daemon(context, rss, sizes, blocked=False)

            async def spooled(n: int) -> float:
                return await _into_daemon(context, rss, sizes, blocked=True)

            comparison = await compare.alternate(
                [("sink", sink), ("engine", engine), ("streamed", streamed), ("spooled", spooled)],
                pairs=PAIRS,
                unit="MB/s",
                digits=0,
                label="upload",
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(comparison, rss, tar_bytes, sizes)


async def _into_daemon(context: Path, rss: list[dict[str, Any]], sizes: set[int], *, blocked: bool) -> float:
    """One upload into a fresh daemon (VmHWM is a lifetime peak: only a fresh process isolates one
    upload). With `blocked`, its one build slot is taken, so the context is checked onto the spool."""
    async with (
        Daemon("--max-context-bytes", str(MAX_CONTEXT), "--max-concurrent", "1") as d,
        harness.client_session() as s,
    ):
        blocker = None
        if blocked:
            blocker = await harness.submit_build(s, d, harness.make_context({"Dockerfile": BLOCKER}))
        idle = d.rss_mib()
        body, seconds, size = await curl_upload(context, f"{d.base_url}/builds?no_cache=true")
        peak = d.peak_rss_mib()
        cancel_started = time.perf_counter()
        code, status = await harness.cancel_build(s, d, body["build_id"])
        cancel_s = time.perf_counter() - cancel_started
        if blocker is not None:
            await harness.cancel_build(s, d, blocker)
        if code not in (200, 202):
            raise RuntimeError(f"DELETE answered {code}: {status}")
    rss.append(
        {
            "idle": idle,
            "peak": peak,
            "cancel_s": cancel_s,
            "cancel_code": code,
            "status": status.get("status"),
            "spooled": blocked,
        }
    )
    sizes.add(size)
    return size / seconds / 1e6


async def curl_engine(path: Path, build_id: str) -> tuple[float, int]:
    """POST the tar straight to the engine's BuildKit (`/build?version=2`); (seconds, bytes) from curl."""
    run = await harness.run_command(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "--unix-socket",
            harness.DOCKER_SOCKET,
            "-X",
            "POST",
            "-T",
            str(path),
            "-H",
            "Content-Type: application/x-tar",
            "-H",
            "Expect:",
            "-w",
            "%{time_total} %{size_upload}",
            f"http://localhost/v1.41/build?version=2&nocache=1&buildid={build_id}&t={build_id}",
        ],
        capture_stdout=True,
    )
    await harness.remove_images([build_id])
    seconds, size = run.stdout.decode().split()
    return float(seconds), int(float(size))


def _report(comparison: compare.Comparison, rss: list[dict[str, Any]], tar_bytes: int, sizes: set[int]) -> Result:
    labels = {
        "sink": "raw loopback copy to a sink",
        "engine": "straight into the engine (BuildKit)",
        "streamed": "daemon `POST /builds` → 202, streamed into the engine",
        "spooled": "daemon `POST /builds` → 202, checked onto the spool (slot taken)",
    }
    spooled_ratio = comparison.median_ratio("spooled")
    streamed_ratio = comparison.median_ratio_to("streamed", "engine")
    measured = [r for r in rss if r in rss[-2 * comparison.rounds :]]
    growth = [r["peak"] - r["idle"] for r in measured]
    rss_rows = [
        [
            "spooled" if r["spooled"] else "streamed",
            f"{r['idle']:.1f}",
            f"{r['peak']:.1f}",
            f"**{r['peak'] - r['idle']:.1f}**",
            f"{r['cancel_s'] * 1000:.0f} ({r['cancel_code']}, {r['status']})",
        ]
        for r in measured
    ]
    rss_table = harness.markdown_table(
        [
            "daemon run",
            "idle RSS (MiB)",
            "VmHWM after the 202 (MiB)",
            "peak growth during upload (MiB)",
            "DELETE took (ms)",
        ],
        rss_rows,
    )
    method = f"""\
The context: a **plain tar** (`Content-Type: application/x-tar`), {harness.mib(tar_bytes)} on disk: a Dockerfile
(`RUN true`) and {FILES} files of {FILE_BYTES // 2**20} MiB, each half `os.urandom` bytes and half repeated
text. Plain tar rather than tar.gz because this scenario measures the transfer path (socket → rewriter →
engine or spool), not the client's compression.

The client for all: `curl -sS -X POST -T FILE -H 'Content-Type: application/x-tar' -H 'Expect:' URL`
(`-T` streams the file from disk). Throughput = bytes uploaded / curl's `time_total` (request start →
response read), in MB/s (10⁶ bytes/s).

- *raw loopback copy* (reference): a trivial aiohttp server in its own process (`python -m benchmarks.sink`)
  that reads the body in 256 KiB chunks, discards it, and answers 202.
- *straight into the engine*: curl posts the tar to the engine's own API (`/build?version=2`, what
  `DOCKER_BUILDKIT=1 docker build` does), so its time includes the `RUN true` build after the upload.
- *daemon, streamed*: a fresh `builder serve --max-context-bytes {MAX_CONTEXT} --max-concurrent 1` per run with
  its build slot free: the rewritten tar flows into the engine while curl sends, and the 202 comes once the
  engine has the whole context, checked. The harness then `DELETE`s the build.
- *daemon, spooled*: the same, with its one slot taken by a `RUN sleep` build: the context is checked onto
  the spool (canonical plain tar) and the 202 comes once all of it is there. Both builds are then deleted.

Alternating in that order; one warm-up round, then {PAIRS} measured rounds. Peak RSS growth: the daemon's
`VmHWM` read right after curl exits minus its `VmRSS` once idle after start-up."""
    notes = [comparison.runs_note(labels)]
    if len(sizes) != 1:
        notes.append(f"curl reported different upload sizes: {sorted(sizes)}")
    rss_ok = max(growth) < TARGET_RSS_MIB
    return Result(
        body="\n\n".join([method, comparison.table(labels), rss_table, "\n".join(f"- {n}" for n in notes)]),
        headlines=[
            Headline(
                "upload (spooled)",
                f"{spooled_ratio:.2f} of raw loopback throughput "
                f"({comparison.median('spooled'):.0f} vs {comparison.median('sink'):.0f} MB/s)",
                f"≥ {TARGET_RATIO:.2f}",
                spooled_ratio >= TARGET_RATIO,
            ),
            Headline(
                "upload (streamed)",
                f"{streamed_ratio:.2f} of the engine's own intake "
                f"({comparison.median('streamed'):.0f} vs {comparison.median('engine'):.0f} MB/s)",
                f"≥ {TARGET_RATIO:.2f}",
                streamed_ratio >= TARGET_RATIO,
            ),
            Headline(
                "upload",
                f"daemon peak RSS growth {harness.median(growth):.1f} MiB median, {max(growth):.1f} MiB max",
                f"< {TARGET_RSS_MIB:.0f} MiB",
                rss_ok,
            ),
        ],
        bars=[
            Bar("upload: spooled / raw MB/s", spooled_ratio, TARGET_RATIO, higher_is_better=True),
            Bar("upload: streamed / engine MB/s", streamed_ratio, TARGET_RATIO, higher_is_better=True),
            Bar("upload: peak RSS growth / 64 MiB", max(growth) / TARGET_RSS_MIB, 1.0),
        ],
    )
