"""What a BuildKit session adds to a small build, through the daemon and straight on the engine.

Daemon: the same small build (multipart, `no_cache=true`), once with a secret part (the daemon then
opens a BuildKit session for the build) and once without (no session), alternating which goes first;
each timed from just before the POST to the terminal frame of its SSE log. Engine: the same build on
`/build?version=2`, bare and inside a `BuildSession`, to show the session's own share: its open
(connect + HTTP/1.1 upgrade to h2c) and close.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp

from benchmarks import harness
from benchmarks.harness import Bar, Daemon, Headline, Result
from builder.server.engines.session import BuildSession

PAIRS = 20
WARMUPS = 2
TARGET_MS = 30.0  # median added per build, through the daemon
DOCKERFILE = harness.dockerfile("RUN echo small")
SECRET = b"bench-secret"


async def _daemon_build(
    session: aiohttp.ClientSession, daemon: Daemon, context: bytes, *, secret: bool, images: list[str]
) -> float:
    """One build through the daemon, with or without a secret; seconds from POST to terminal frame."""
    form = aiohttp.FormData()
    form.add_field("no_cache", "true")
    if secret:
        form.add_field("secret.tok", SECRET, filename="tok", content_type="application/octet-stream")
    form.add_field("context", context, filename="context.tar.gz", content_type="application/gzip")
    started = time.perf_counter()
    async with session.post(f"{daemon.base_url}/builds", data=form) as response:
        body = await response.json()
        if response.status != 202:
            raise RuntimeError(f"POST /builds answered {response.status}: {body}")
    follower = harness.LogFollower()
    await follower.run(session, harness.logs_url(daemon, body["build_id"]))
    elapsed = time.perf_counter() - started
    if not follower.ok or follower.terminal is None or follower.terminal.get("status") != "succeeded":
        raise RuntimeError(f"build {body['build_id']}: {follower.error or follower.terminal}")
    images.append(follower.terminal["image_id"])
    return elapsed


async def _engine_build(
    engine: aiohttp.ClientSession, context: bytes, session_id: str | None, images: list[str]
) -> None:
    params = {"version": "2", "nocache": "1", "buildid": uuid.uuid4().hex}
    if session_id is not None:
        params["session"] = session_id
    image_id = ""
    async with engine.post(
        f"{harness.ENGINE_API}/build", params=params, data=context, headers={"Content-Type": "application/x-tar"}
    ) as response:
        async for line in response.content:
            message = json.loads(line)
            if "error" in message:
                raise RuntimeError(message["error"])
            if message.get("id") == "moby.image.id":
                image_id = message["aux"]["ID"]
    if not image_id:
        raise RuntimeError("the engine named no image")
    images.append(image_id)


async def _alternate(
    first: Callable[[], Awaitable[float]], second: Callable[[], Awaitable[float]], rounds: int
) -> tuple[list[float], list[float]]:
    """`rounds` pairs after WARMUPS, which of the two goes first alternating; each one's seconds."""
    a: list[float] = []
    b: list[float] = []
    for i in range(WARMUPS + rounds):
        if i % 2:
            y, x = await second(), await first()
        else:
            x, y = await first(), await second()
        if i >= WARMUPS:
            a.append(x)
            b.append(y)
    return a, b


async def run() -> Result:
    images: list[str] = []
    context = harness.make_context({"Dockerfile": DOCKERFILE})
    opens: list[float] = []
    closes: list[float] = []
    try:
        async with Daemon() as daemon, harness.client_session() as session:
            bare, secret = await _alternate(
                lambda: _daemon_build(session, daemon, context, secret=False, images=images),
                lambda: _daemon_build(session, daemon, context, secret=True, images=images),
                PAIRS,
            )
        harness.progress(f"session: through the daemon, {PAIRS} pairs done")

        async with harness.engine_session() as engine:

            async def engine_bare() -> float:
                started = time.perf_counter()
                await _engine_build(engine, context, None, images)
                return time.perf_counter() - started

            async def engine_session() -> float:
                started = time.perf_counter()
                async with BuildSession() as build_session:
                    opened = time.perf_counter()
                    await _engine_build(engine, context, build_session.session_id, images)
                    closing = time.perf_counter()
                ended = time.perf_counter()
                opens.append(opened - started)
                closes.append(ended - closing)
                return ended - started

            engine_plain, engine_with = await _alternate(engine_bare, engine_session, PAIRS)
        harness.progress(f"session: straight on the engine, {PAIRS} pairs done")
    finally:
        await harness.remove_images(images)

    ms = 1000.0
    added = harness.median([s - b for s, b in zip(secret, bare, strict=True)]) * ms
    engine_added = harness.median([w - b for w, b in zip(engine_with, engine_plain, strict=True)]) * ms
    opens, closes = opens[WARMUPS:], closes[WARMUPS:]

    def row(what: str, values: list[float]) -> list[str]:
        return [what, f"{harness.median(values) * ms:.1f}", f"{min(values) * ms:.1f}", f"{max(values) * ms:.1f}"]

    table = harness.markdown_table(
        ["build", "median (ms)", "min (ms)", "max (ms)"],
        [
            row("daemon, no secret (no session)", bare),
            row("daemon, one secret (a session)", secret),
            row("engine, bare", engine_plain),
            row("engine, in a BuildSession", engine_with),
            row("BuildSession open (connect + upgrade)", opens),
            row("BuildSession close", closes),
        ],
    )
    method = f"""\
```Dockerfile
{DOCKERFILE.rstrip()}
```

Through the daemon: {PAIRS} pairs after {WARMUPS} warm-ups, each pair the same build posted as multipart with
`no_cache=true`, once with a `secret.tok` part (the daemon opens a BuildKit session for it; the step does not
mount the secret, so what is measured is the session alone) and once without, the order alternating; each timed
from just before the POST to the terminal frame of its SSE log. Then the same on the engine's own API, bare and
inside a `BuildSession`.

Added per build (median of the per-pair differences): **{added:+.1f} ms** through the daemon,
{engine_added:+.1f} ms on the engine."""
    met = added < TARGET_MS
    return Result(
        body="\n\n".join([method, table]),
        headlines=[
            Headline(
                "session",
                f"a BuildKit session adds median {added:+.1f} ms to a small build through the daemon "
                f"({engine_added:+.1f} ms on the engine; {PAIRS} pairs)",
                f"< {TARGET_MS:.0f} ms",
                met,
            )
        ],
        bars=[Bar("session: added ÷ 30 ms", max(added, 0.0) / TARGET_MS, 1.0)],
    )
