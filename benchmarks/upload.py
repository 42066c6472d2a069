"""Context upload: 1 GiB into the daemon vs into a trivial sink, and the daemon's memory meanwhile.

The same client (curl, streaming the file from disk) POSTs the same 1 GiB tar
to a fresh daemon (until its 202, which comes once it has spooled and checked
the upload) and to a sink server that reads and discards the body.
Alternating; the daemon's peak RSS growth is its VmHWM after the upload minus
its idle RSS, from a fresh daemon per run. Each build is cancelled at once.
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

import aiohttp

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, Result

PAIRS = 5
FILES = 64
FILE_BYTES = 16 * 2**20  # 64 × 16 MiB = 1 GiB of file data
MAX_CONTEXT = 4 * 2**30
TARGET_RATIO = 0.70  # daemon throughput / sink throughput, at least
TARGET_RSS_MIB = 64.0
DOCKERFILE = harness.dockerfile("RUN true")


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
            "curl", "-sS", "--fail-with-body", "-X", "POST", "-T", str(path),
            "-H", "Content-Type: application/x-tar",
            # No 100-continue round trip: the body goes at once, to either server alike.
            "-H", "Expect:",
            "-w", "\n%{http_code} %{time_total} %{size_upload}", url,
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
        [sys.executable, "-m", "benchmarks.sink", str(port)], cwd=harness.REPO_ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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

            async def daemon(n: int) -> float:
                # Fresh per run: VmHWM is a lifetime peak, so only a fresh process isolates one upload.
                async with Daemon("--max-context-bytes", str(MAX_CONTEXT)) as d, harness.client_session() as s:
                    idle = d.rss_mib()
                    body, seconds, size = await curl_upload(context, f"{d.base_url}/builds?no_cache=true")
                    peak = d.peak_rss_mib()
                    cancel_started = time.perf_counter()
                    code, status = await harness.cancel_build(s, d, body["build_id"])
                    cancel_s = time.perf_counter() - cancel_started
                    peak_after_cancel = d.peak_rss_mib()
                    if code not in (200, 202):
                        raise RuntimeError(f"DELETE answered {code}: {status}")
                rss.append({"idle": idle, "peak": peak, "peak_after_cancel": peak_after_cancel,
                            "cancel_s": cancel_s, "cancel_code": code, "status": status.get("status")})
                sizes.add(size)
                return size / seconds / 1e6

            comparison = await compare.alternate([("sink", sink), ("daemon", daemon)], pairs=PAIRS, unit="MB/s",
                                                 digits=0, label="upload")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(comparison, rss, tar_bytes, sizes)


def _report(comparison: compare.Comparison, rss: list[dict], tar_bytes: int, sizes: set[int]) -> Result:
    labels = {"sink": "raw loopback copy to a sink", "daemon": "daemon `POST /builds` → 202"}
    ratio = comparison.median_ratio("daemon")
    measured = rss[-comparison.rounds:]
    growth = [r["peak"] - r["idle"] for r in measured]
    growth_after = [r["peak_after_cancel"] - r["idle"] for r in measured]
    rss_rows = [[
        i + 1, f"{r['idle']:.1f}", f"{r['peak']:.1f}", f"**{r['peak'] - r['idle']:.1f}**",
        f"{r['peak_after_cancel'] - r['idle']:.1f}", f"{r['cancel_s'] * 1000:.0f} ({r['cancel_code']}, {r['status']})",
    ] for i, r in enumerate(measured)]
    rss_table = harness.markdown_table(
        ["daemon run", "idle RSS (MiB)", "VmHWM after the 202 (MiB)", "peak growth during upload (MiB)",
         "peak growth incl. the DELETE (MiB)", "DELETE took (ms)"],
        rss_rows,
    )
    method = f"""\
The context: a **plain tar** (`Content-Type: application/x-tar`), {harness.mib(tar_bytes)} on disk: a Dockerfile
(`RUN true`) and {FILES} files of {FILE_BYTES // 2**20} MiB, each half `os.urandom` bytes and half repeated
text. Plain tar rather than tar.gz because this scenario measures the transfer path (socket → spool file →
tar check), not gzip: with tar.gz the client's compression would dominate the time (the daemon's tar check
would also have to inflate it), so both sides would mostly measure zlib.

The client for both: `curl -sS -X POST -T FILE -H 'Content-Type: application/x-tar' -H 'Expect:' URL`
(`-T` streams the file from disk; `--data-binary @FILE` would first read all 1 GiB into curl's memory).
Throughput = bytes uploaded / curl's `time_total` (request start → response read), in MB/s (10⁶ bytes/s).

- *raw loopback copy* (reference): a trivial aiohttp server in its own process (`python -m benchmarks.sink`)
  that reads the body in 256 KiB chunks, like the daemon, discards it, and answers 202.
- *daemon*: a fresh `builder serve --max-context-bytes {MAX_CONTEXT}` per run. Its 202 comes only once the
  whole upload is in its spool file and checked as a tar holding the Dockerfile, so spooling and checking
  count in its time. The harness then `DELETE`s the build at once so the engine never builds 1 GiB.

Alternating sink, daemon; one warm-up round, then {PAIRS} measured rounds. Peak RSS growth: the daemon's
`VmHWM` read right after curl exits (the build may have started streaming the spool to the engine in those
moments) minus its `VmRSS` once idle after start-up; also shown including the DELETE."""
    notes = [comparison.runs_note(labels)]
    cancels = [r["cancel_s"] * 1000 for r in measured]
    notes.append(
        f"`DELETE` sent right after the 202 took {harness.median(cancels):.0f} ms median ({min(cancels):.0f} – "
        f"{max(cancels):.0f}): the build has started sending the 1 GiB spool file to the engine by then; compare the "
        "`cancel` scenario, where the context is tiny."
    )
    if len(sizes) != 1:
        notes.append(f"curl reported different upload sizes: {sorted(sizes)}")
    rss_ok = max(growth) < TARGET_RSS_MIB
    return Result(
        body="\n\n".join([method, comparison.table(labels), rss_table, "\n".join(f"- {n}" for n in notes)]),
        headlines=[
            Headline("upload", f"{ratio:.2f} of raw loopback throughput ({comparison.median('daemon'):.0f} vs "
                               f"{comparison.median('sink'):.0f} MB/s)", f"≥ {TARGET_RATIO:.2f}", ratio >= TARGET_RATIO),
            Headline("upload", f"daemon peak RSS growth {harness.median(growth):.1f} MiB median, "
                               f"{max(growth):.1f} MiB max ({max(growth_after):.1f} incl. the DELETE)",
                     f"< {TARGET_RSS_MIB:.0f} MiB", rss_ok),
        ],
        bars=[
            Bar("upload: daemon / raw MB/s", ratio, TARGET_RATIO, higher_is_better=True),
            Bar("upload: peak RSS growth / 64 MiB", max(growth) / TARGET_RSS_MIB, 1.0),
        ],
    )
