"""What a BuildKit session adds to a small build: `python -m benchmarks.session_overhead [RUNS]`.

Not a report scenario: an ad-hoc measurement. Each round runs the same small BuildKit build
(`/build?version=2`, no cache, straight on the engine) twice, once bare and once inside a
`BuildSession` whose id goes in `session=`, alternating which comes first. It prints the
median wall time of each, the median of the per-round differences, and the session's own
open (connect + HTTP/1.1 upgrade) and close times.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aiohttp

from benchmarks import harness
from builder.server.engines.session import BuildSession

DOCKERFILE = harness.dockerfile("RUN echo small")
WARMUPS = 2


async def _build(engine: aiohttp.ClientSession, context: bytes, session_id: str | None) -> str:
    """One build; its image id."""
    params = {"version": "2", "nocache": "1", "buildid": uuid.uuid4().hex}
    if session_id is not None:
        params["session"] = session_id
    image_id = ""
    async with engine.post(f"{harness.ENGINE_API}/build", params=params, data=context,
                           headers={"Content-Type": "application/x-tar"}) as response:
        async for line in response.content:
            message = json.loads(line)
            if "error" in message:
                raise RuntimeError(message["error"])
            if message.get("id") == "moby.image.id":
                image_id = message["aux"]["ID"]
    if not image_id:
        raise RuntimeError("the build named no image")
    return image_id


async def _bare(engine: aiohttp.ClientSession, context: bytes, images: list[str]) -> float:
    started = time.perf_counter()
    images.append(await _build(engine, context, None))
    return time.perf_counter() - started


async def _with_session(engine: aiohttp.ClientSession, context: bytes, images: list[str]) -> tuple[float, float, float]:
    """(whole wall time, open, close) in seconds."""
    started = time.perf_counter()
    async with BuildSession() as session:
        opened = time.perf_counter()
        images.append(await _build(engine, context, session.session_id))
        closing = time.perf_counter()
    ended = time.perf_counter()
    return ended - started, opened - started, ended - closing


async def main(runs: int) -> None:
    context = harness.make_context({"Dockerfile": DOCKERFILE})
    images: list[str] = []
    bare: list[float] = []
    with_session: list[float] = []
    opens: list[float] = []
    closes: list[float] = []
    try:
        async with harness.engine_session() as engine:
            for i in range(WARMUPS + runs):
                if i % 2:
                    b = await _bare(engine, context, images)
                    w, o, c = await _with_session(engine, context, images)
                else:
                    w, o, c = await _with_session(engine, context, images)
                    b = await _bare(engine, context, images)
                if i >= WARMUPS:
                    bare.append(b)
                    with_session.append(w)
                    opens.append(o)
                    closes.append(c)
    finally:
        await harness.remove_images(images)
    ms = 1000
    differences = [w - b for w, b in zip(with_session, bare, strict=True)]
    print(f"{runs} rounds (after {WARMUPS} warm-ups), build: {DOCKERFILE.strip()!r}")
    print(f"build without a session: median {harness.median(bare) * ms:.1f} ms")
    print(f"build with a session:    median {harness.median(with_session) * ms:.1f} ms")
    print(f"added per build:         median {harness.median(differences) * ms:+.1f} ms "
          f"(median with - median without: {(harness.median(with_session) - harness.median(bare)) * ms:+.1f} ms)")
    print(f"session open:            median {harness.median(opens) * ms:.2f} ms, max {max(opens) * ms:.2f} ms")
    print(f"session close:           median {harness.median(closes) * ms:.2f} ms, max {max(closes) * ms:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
