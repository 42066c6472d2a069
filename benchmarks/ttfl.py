"""Time to first log line: through the daemon's HTTP API vs the engine's own /build API.

Daemon: POST the raw tar.gz to /builds, then at once GET its log as SSE; the
time runs from just before the POST is sent to the first `log` event parsed.
Engine: POST the same bytes to the engine's /build over its unix socket; the
time runs to the first chunk of the engine's response stream. For a 1 KiB and
a 100 MiB context, alternating daemon and engine.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import tarfile
import time

import aiohttp

from benchmarks import compare, harness
from benchmarks.harness import Bar, Daemon, Headline, Result
from builder.client.sse import SSEDecoder

PAIRS = 7
SMALL_BYTES = 1024
LARGE_BYTES = 100 * 2**20
LARGE_FILES = 100
TARGET_MS = 50.0  # small context: daemon at most this much above the engine's own
# A step without a container: the first line ("Step 1/2 : FROM …") is what is measured; the rest
# of the build only has to finish quickly so the next round starts on an idle engine.
DOCKERFILE = harness.dockerfile("LABEL bench=ttfl")


def _context(total: int, files: int, seed: int) -> bytes:
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        entries = {"Dockerfile": DOCKERFILE.encode()}
        per_file = (total - len(entries["Dockerfile"])) // files
        for i in range(files):
            entries[f"files/f{i:03d}.bin"] = harness.mixed_content(rng, per_file)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Timings:
    def __init__(self) -> None:
        self.accepted: list[float] = []  # POST sent → 202 read (daemon)
        self.image_ids: list[str] = []


async def _daemon_ttfl(
    session: aiohttp.ClientSession, daemon: Daemon, context: bytes, tag: str, timings: _Timings
) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{daemon.base_url}/builds",
        data=context,
        params={"image_name": tag, "no_cache": "true"},
        headers={"Content-Type": "application/gzip"},
    ) as response:
        body = await response.json()
        if response.status != 202:
            raise RuntimeError(f"POST /builds answered {response.status}: {body}")
    timings.accepted.append(time.perf_counter() - started)
    first: float | None = None
    terminal = None
    decoder = SSEDecoder()
    async with session.get(harness.logs_url(daemon, body["build_id"]), headers=harness.SSE_HEADERS) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                payload = json.loads(event.data)
                if payload.get("type") == "log" and first is None:
                    first = time.perf_counter() - started
                elif payload.get("type") in harness.TERMINAL_TYPES:
                    terminal = payload
    if first is None or terminal is None or terminal.get("status") != "succeeded":
        raise RuntimeError(f"daemon build {body['build_id']}: first log {first}, terminal {terminal}")
    await harness.remove_images([tag])
    return first


async def _engine_ttfl(engine: aiohttp.ClientSession, context: bytes, tag: str) -> float:
    started = time.perf_counter()
    first: float | None = None
    output = b""
    async with engine.post(
        f"{harness.ENGINE_API}/build",
        data=context,
        params={"t": tag, "nocache": "1", "rm": "1", "forcerm": "1"},
        headers={"Content-Type": "application/x-tar"},
    ) as response:
        async for chunk in response.content.iter_any():
            if first is None and chunk.strip():
                first = time.perf_counter() - started
            output += chunk
        if response.status != 200:
            raise RuntimeError(f"engine /build answered {response.status}: {output[:300]!r}")
    if first is None or b"Successfully built" not in output:
        raise RuntimeError(f"engine build ended without an image: {output[-300:]!r}")
    await harness.remove_images([tag])
    return first


async def run() -> Result:
    generating = time.perf_counter()
    contexts = {
        "1 KiB": _context(SMALL_BYTES, 1, seed=1),
        "100 MiB": await asyncio.to_thread(_context, LARGE_BYTES, LARGE_FILES, 100),
    }
    harness.progress(f"ttfl: contexts generated in {time.perf_counter() - generating:.1f}s")
    results: dict[str, tuple[compare.Comparison, _Timings]] = {}
    async with Daemon() as daemon, harness.client_session() as session, harness.engine_session() as engine:
        for size, context in contexts.items():
            timings = _Timings()
            slug = size.replace(" ", "").lower()

            async def engine_cmd(n: int, context: bytes = context, slug: str = slug) -> float:
                return 1000 * await _engine_ttfl(engine, context, f"bench-ttfl-engine-{slug}:{n}")

            async def daemon_cmd(
                n: int, context: bytes = context, slug: str = slug, timings: _Timings = timings
            ) -> float:
                return 1000 * await _daemon_ttfl(session, daemon, context, f"bench-ttfl-builder-{slug}:{n}", timings)

            comparison = await compare.alternate(
                [("engine", engine_cmd), ("daemon", daemon_cmd)],
                pairs=PAIRS,
                unit="ms",
                digits=1,
                label=f"ttfl {size}",
            )
            results[size] = (comparison, timings)
    return _report(contexts, results)


def _report(contexts: dict[str, bytes], results: dict[str, tuple[compare.Comparison, _Timings]]) -> Result:
    labels = {"engine": "engine `/build` directly", "daemon": "daemon: POST /builds + GET /logs (SSE)"}
    rows = []
    sections = []
    for size, (comparison, timings) in results.items():
        engine_ms, daemon_ms = comparison.median("engine"), comparison.median("daemon")
        diffs = [d - e for d, e in zip(comparison.samples["daemon"], comparison.samples["engine"], strict=True)]
        accepted = timings.accepted[-comparison.rounds :]
        rows.append(
            [
                size,
                f"{len(contexts[size]) / 2**20:.2f} MiB" if len(contexts[size]) > 2**20 else f"{len(contexts[size])} B",
                f"{engine_ms:.1f}",
                f"{daemon_ms:.1f}",
                f"{harness.median(diffs):+.1f}",
                f"{comparison.median_ratio('daemon'):.2f}",
                f"{harness.median(accepted) * 1000:.1f}",
            ]
        )
        sections.append(f"**{size} context**\n\n{comparison.table(labels)}\n\n- {comparison.runs_note(labels)}")
    small, _ = results["1 KiB"]
    small_diff = harness.median([d - e for d, e in zip(small.samples["daemon"], small.samples["engine"], strict=True)])
    large, _ = results["100 MiB"]
    summary = harness.markdown_table(
        [
            "context",
            "tar.gz bytes sent",
            "engine median (ms)",
            "daemon median (ms)",
            "daemon − engine, median of per-pair differences (ms)",
            "daemon / engine (median of per-pair ratios)",
            "of which POST → 202 (daemon, median ms)",
        ],
        rows,
    )
    method = f"""\
Contexts: a Dockerfile plus files of mixed content (half random, half word salad) adding up to 1 KiB and to
{LARGE_BYTES / 2**20:.0f} MiB ({LARGE_FILES} files), each sent as the same tar.gz bytes to both. The Dockerfile:

```Dockerfile
{DOCKERFILE.rstrip()}
```

- *daemon*: the clock starts just before `POST /builds?no_cache=true&image_name=…` (raw body,
  `Content-Type: application/gzip`) is sent; on the 202 the harness at once opens
  `GET /builds/{{id}}/logs` with `Accept: text/event-stream`; the clock stops when the first `log` event
  (`Step 1/2 : FROM …`) is parsed. The daemon answers 202 only once the upload is spooled to disk and
  checked as a tar holding the Dockerfile; then it uploads the context to the engine, so for the large
  context the bytes cross loopback twice.
- *engine*: the same bytes POSTed to the engine's `/v1.41/build?nocache=1&rm=1&forcerm=1` over
  `/var/run/docker.sock` (aiohttp `UnixConnector`); the clock stops at the first non-empty chunk of the
  response stream (the engine's `Step 1/2 : FROM …`).

Both builds are read to the end and their images removed before the next run; engine and daemon
alternate, one warm-up round and {PAIRS} measured rounds per context size; one daemon for the scenario,
one keep-alive session each."""
    target_ratio = (small.median("engine") + TARGET_MS) / small.median("engine")
    return Result(
        body="\n\n".join([method, summary, *sections]),
        headlines=[
            Headline(
                "ttfl",
                f"1 KiB: daemon {small.median('daemon'):.1f} ms vs engine {small.median('engine'):.1f} ms "
                f"({small_diff:+.1f} ms); 100 MiB: {large.median('daemon'):.0f} vs {large.median('engine'):.0f} ms",
                f"1 KiB: < {TARGET_MS:.0f} ms above the engine",
                small_diff < TARGET_MS,
            ),
        ],
        bars=[
            Bar("ttfl 1 KiB: daemon / engine", small.median_ratio("daemon"), target_ratio),
            Bar("ttfl 100 MiB: daemon / engine", large.median_ratio("daemon")),
        ],
    )
