"""The engine's legacy builder (`POST /build`): its output parser lives here and nowhere else.

The legacy builder mixes control and output in one text stream: ` ---> Running in <id>`
and ` ---> <id>` lines announce step containers and layers, and a `RUN` step can print
those lines itself. So a line only nominates an id; the engine confirms it before this
module acts on it (see `LegacyRun._confirm_container` and `_confirm_layer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp
import structlog

from builder.server.engines.base import (
    MAX_LINE,
    BuildJob,
    EngineEvent,
    EngineFailure,
    ImageBuilt,
    Output,
    bring_forward,
)
from builder.server.engines.docker import (
    CALL_SECONDS,
    DockerEngine,
    build_params,
    docker_message,
    error_message,
    json_batches,
)

log = structlog.get_logger(__name__)

# After a stop, keep reading the build stream this long, so that a step container started in
# the meantime is seen and removed; then drop the connection.
STOP_GRACE = 5.0

_STEP_RE = re.compile(r"Step \d+/\d+ : ((\w+).*)")
_RUNNING_IN_RE = re.compile(r" ---> Running in ([0-9a-f]{12,64})")
_USING_CACHE = " ---> Using cache"
_LAYER_RE = re.compile(r" ---> ([0-9a-f]{12,64})")
_NANOSECONDS = re.compile(r"(\.\d+)")


@dataclasses.dataclass(frozen=True)
class StepContainer:
    """A line naming a step container (to be confirmed with the engine), with the
    instruction of the step it was named in (`RUN echo hi`)."""

    container_id: str
    instruction: str


@dataclasses.dataclass(frozen=True)
class StepLayer:
    """A line naming a step's resulting layer; `new` is false for cache hits and FROM images."""

    image_id: str
    new: bool


@dataclasses.dataclass(frozen=True)
class LinePiece:
    """A piece of a line over the length limit; `continued` when it continues the one before."""

    text: str
    continued: bool


LegacyEvent = str | LinePiece | StepContainer | StepLayer | ImageBuilt | EngineFailure


class BuildOutputParser:
    """The legacy builder's JSON messages -> lines and the ids they nominate (pure).

    The engine's `stream` chunks are not line-aligned, so text is buffered until a
    newline, and a trailing partial line is flushed at the end.
    """

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        # A line not finished yet, in pieces: joined once when its end comes, not once a chunk.
        self._partial: list[str] = []
        self._partial_size = 0
        self._continuing = False  # the line has gone out in part already
        self._max_line = max_line
        self._step_reuses_image = False
        self._instruction = ""

    def feed(self, chunk: dict[str, Any]) -> list[LegacyEvent]:
        events: list[LegacyEvent] = []
        if (message := error_message(chunk, "the engine reported an unknown build error")) is not None:
            events.extend(self.finish())
            events.append(EngineFailure(message))
            return events
        aux = chunk.get("aux")
        # In-band JSON from the engine itself: a build's output cannot forge it.
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            events.append(ImageBuilt(aux["ID"]))
        stream = chunk.get("stream")
        if isinstance(stream, str) and stream:
            self._stream(stream, events)
        status = chunk.get("status")
        if isinstance(status, str):
            # Pull progress (with `pull=true`): one line per status update.
            ident = chunk.get("id")
            self._line(f"{ident}: {status}" if ident else status, events)
        return events

    def finish(self) -> list[LegacyEvent]:
        events: list[LegacyEvent] = []
        if self._partial:
            line = "".join(self._partial)
            self._partial, self._partial_size = [], 0
            self._line(line, events)
        return events

    def _stream(self, text: str, events: list[LegacyEvent]) -> None:
        cut = text.rfind("\n")
        if cut < 0:
            self._partial.append(text)
            self._partial_size += len(text)
            if self._partial_size >= self._max_line:
                # Over the limit without an end in sight: out it goes in pieces of the limit.
                line = "".join(self._partial)
                start = 0
                while len(line) - start >= self._max_line:
                    events.append(LinePiece(line[start : start + self._max_line], self._continuing))
                    self._continuing = True
                    start += self._max_line
                self._partial = [line[start:]] if start < len(line) else []
                self._partial_size = len(line) - start
            return
        lines = ("".join(self._partial) + text[:cut] if self._partial else text[:cut]).split("\n")
        rest = text[cut + 1 :]
        self._partial, self._partial_size = ([rest], len(rest)) if rest else ([], 0)
        for line in lines:
            self._line(line, events)

    def _line(self, line: str, events: list[LegacyEvent]) -> None:
        line = line.removesuffix("\r")
        if len(line) > self._max_line or self._continuing:
            # A long line (or the end of one that went out in part): pieces, never a control line.
            for start in range(0, max(len(line), 1), self._max_line):
                events.append(LinePiece(line[start : start + self._max_line], self._continuing))
                self._continuing = True
            self._continuing = False
            return
        events.append(line)
        if not line.startswith(("Step ", " ---> ")):
            return  # the build's own output: most lines of a chatty build
        if m := _STEP_RE.fullmatch(line):
            self._instruction = m.group(1)
            self._step_reuses_image = m.group(2).upper() == "FROM"
        elif line == _USING_CACHE:
            self._step_reuses_image = True
        elif m := _RUNNING_IN_RE.fullmatch(line):
            events.append(StepContainer(m.group(1), self._instruction))
        elif m := _LAYER_RE.fullmatch(line):
            events.append(StepLayer(m.group(1), new=not self._step_reuses_image))
            self._step_reuses_image = False


class LegacyBuilder:
    name = "legacy"
    takes_secrets = False  # no BuildKit session

    def __init__(self, engine: DockerEngine) -> None:
        self._engine = engine

    def start(self, job: BuildJob) -> LegacyRun:
        return LegacyRun(self._engine, job)

    async def aclose(self) -> None:
        return None


class LegacyRun:
    def __init__(self, engine: DockerEngine, job: BuildJob) -> None:
        self._engine = engine
        self._job = job
        self._stopped = False
        self._context_sent = False
        self._deadline: asyncio.Timeout | None = None
        self._current_container: str | None = None
        # The engine's clock when the build started: step containers and layers of this
        # build were created after it.
        self._started: datetime | None = None
        # The layer the next step runs on, as confirmed by the engine.
        self._layer: str | None = None
        self._containers: list[str] = []
        self._images: list[str] = []

    async def events(self) -> AsyncGenerator[list[EngineEvent], None]:
        parser = BuildOutputParser(max_line=self._job.max_line)
        failure: EngineFailure | None = None
        built = False
        try:
            self._started = await self._engine_time()
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                if self._stopped:
                    bring_forward(deadline)
                async with self._engine.request(
                    "build",
                    "POST",
                    params=build_params(self._job.spec, self._job.cache_from) | self._engine.limits.params(),
                    headers={"Content-Type": "application/x-tar"},
                    data=self._send_context(),
                ) as response:
                    async for chunks in json_batches(response.content):
                        batch = await self._batch([e for chunk in chunks for e in parser.feed(chunk)])
                        yield batch
                        if batch and isinstance(batch[-1], EngineFailure):
                            return
                        built = built or any(isinstance(e, ImageBuilt) for e in batch)
            if not built:
                failure = EngineFailure("the Docker engine ended the build stream without naming an image")
        except TimeoutError:
            failure = EngineFailure("build stream closed after the stop grace period")
        except aiodocker.DockerError as exc:
            failure = EngineFailure(docker_message(exc))
        except (aiohttp.ClientError, OSError) as exc:
            failure = EngineFailure(f"lost the connection to the Docker engine: {exc}")
        finally:
            self._deadline = None
            self._current_container = None
        tail = await self._batch(parser.finish())
        yield tail + ([failure] if failure is not None else [])

    async def _send_context(self) -> AsyncIterator[bytes | memoryview]:
        async for chunk in self._job.context:
            yield chunk
        self._context_sent = True
        if self._job.on_context_sent is not None:
            await self._job.on_context_sent()

    async def _batch(self, events: list[LegacyEvent]) -> list[EngineEvent]:
        """Lines grouped into Output, nominated ids confirmed with the engine (and dropped)."""
        batch: list[EngineEvent] = []
        lines: list[str] = []
        for event in events:
            if isinstance(event, str):
                lines.append(event)
                continue
            if lines:
                batch.append(Output(lines))  # keep the log in engine order
                lines = []
            if isinstance(event, LinePiece):
                batch.append(Output([event.text], continued=event.continued))
            elif isinstance(event, StepContainer):
                await self._step_container(event)
            elif isinstance(event, StepLayer):
                await self._step_layer(event)
            else:
                batch.append(event)
                if isinstance(event, EngineFailure):
                    break
        if lines:
            batch.append(Output(lines))
        return batch

    async def _step_container(self, nominated: StepContainer) -> None:
        command = _run_command(nominated.instruction)
        if command is None:
            return  # no step runs for other instructions: the engine removes their containers at once
        info = await self._engine.container_info(nominated.container_id)
        if info is None or not self._is_step_container(info, command):
            log.warning("unconfirmed_step_container_ignored", container_id=nominated.container_id)
            return
        container_id = info["Id"]
        self._containers.append(container_id)
        if self._job.remember is not None:
            await self._job.remember("container", container_id)
        self._current_container = container_id
        if self._stopped:
            # A step that started after the stop: force-remove works even before it runs.
            await self._engine.remove_container(container_id)

    def _is_step_container(self, info: dict[str, Any], command: list[str] | str) -> bool:
        """Created after the build started, from this build's previous layer, running the step's command."""
        cmd = (info.get("Config") or {}).get("Cmd") or []
        return (
            self._layer is not None
            and info.get("Image") == self._layer
            and self._created_since_start(info.get("Created"))
            and (cmd == command if isinstance(command, list) else bool(cmd) and cmd[-1] == command)
        )

    async def _step_layer(self, layer: StepLayer) -> None:
        info = await self._engine.image_info(layer.image_id)
        if info is None:
            log.warning("unconfirmed_layer_ignored", image_id=layer.image_id)
            return
        image_id = info["Id"]
        if not layer.new or self._layer is None:
            # A FROM image or a cache hit: the build goes on from it, but did not create it.
            self._layer = image_id
            return
        if info.get("Parent") != self._layer or not self._created_since_start(info.get("Created")):
            log.warning("unconfirmed_layer_ignored", image_id=image_id)
            return
        self._layer = image_id
        self._images.append(image_id)
        if self._job.remember is not None:
            await self._job.remember("image", image_id)

    def _created_since_start(self, created: Any) -> bool:
        if self._started is None or not isinstance(created, str):
            return False
        try:
            when = _parse_engine_time(created)
        except ValueError:
            return False
        return when >= self._started

    async def _engine_time(self) -> datetime:
        """The engine's clock to the nanosecond, not ours: they may differ, and a thing created
        a moment before the build must not pass for one of its own."""
        async with asyncio.timeout(CALL_SECONDS):
            info = await self._engine.docker.system.info()
        return _parse_engine_time(info["SystemTime"])

    async def stop(self) -> None:
        self._stopped = True
        if self._deadline is not None:
            # Read on to catch late step containers; but no step starts before the engine
            # has the whole context.
            grace = STOP_GRACE if self._context_sent else 0
            bring_forward(self._deadline, grace)
        if self._current_container is not None:
            # Shielded: a client hanging up on its DELETE must not stop the teardown.
            await asyncio.shield(self._engine.remove_container(self._current_container))

    async def clean_up(self, *, images: bool) -> None:
        for container_id in self._containers:
            await self._engine.remove_container(container_id)
        if images:
            for image_id in reversed(self._images):
                await self._engine.remove_image(image_id)


def _run_command(instruction: str) -> list[str] | str | None:
    """What a RUN step's container runs: the exec-form list, or the shell-form text (the last
    argument after the shell); None for other instructions."""
    keyword, _, rest = instruction.partition(" ")
    if keyword.upper() != "RUN":
        return None
    rest = rest.strip()
    if rest.startswith("["):
        try:
            command = json.loads(rest)
        except ValueError:
            return rest
        if isinstance(command, list) and all(isinstance(arg, str) for arg in command):
            return command
    return rest


def _parse_engine_time(value: str) -> datetime:
    """RFC 3339 with nanoseconds, as the engine writes it ("2026-11-23T19:24:33.123456789Z", or with
    a UTC offset), cut to the microseconds Python keeps."""
    return datetime.fromisoformat(_NANOSECONDS.sub(lambda m: m[1][:7], value))
