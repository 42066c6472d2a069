"""The cost of reading BuildKit's trace: decoding its batches, then tracking steps.

    python -m benchmarks.trace_decode [--trace ENGINE_OUTPUT.jsonl] [--rounds N]

With `--trace`, the engine's raw output of a build (the JSON lines of
`POST /build?version=2`, e.g. `RUN seq 1 200000` captured with curl). Without it, two
generated traces shaped like what the engine sends: "chatty", 200,000 lines of `seq` in
5.5 KiB chunks, one a batch (a real trace's average); and "drip", one line a batch, as
a step that prints slowly gets. The base64 of each aux is decoded before timing: that is the
engine module's work. Prints the best of N rounds, in µs per 10,000 output lines.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

from builder.server.engines.base import Output
from builder.server.engines.protowire import field_bytes, field_varint
from builder.server.engines.trace import StepTracker, decode_status

SECOND = 1_000_000_000
T0 = 1_800_000_000 * SECOND
DIGEST = b"sha256:" + b"ab" * 32
CHUNK = 5632


def _timestamp(ns: int) -> bytes:
    return field_varint(1, ns // SECOND) + field_varint(2, ns % SECOND)


def _vertex(*, completed: bool) -> bytes:
    vertex = field_bytes(1, DIGEST) + field_bytes(3, b"[2/2] RUN seq 1 200000") + field_bytes(5, _timestamp(T0))
    if completed:
        vertex += field_bytes(6, _timestamp(T0 + 2 * SECOND))
    return field_bytes(1, vertex)


def _log(data: bytes, at: int) -> bytes:
    log = field_bytes(1, DIGEST) + field_bytes(2, _timestamp(at)) + field_varint(3, 1) + field_bytes(4, data)
    return field_bytes(3, log)


def chatty(lines: int = 200_000) -> list[bytes]:
    output = "".join(f"{n}\n" for n in range(1, lines + 1)).encode()
    batches = [_log(output[i : i + CHUNK], T0 + i * 1000) for i in range(0, len(output), CHUNK)]
    return [_vertex(completed=False), *batches, _vertex(completed=True)]


def drip(lines: int = 20_000) -> list[bytes]:
    batches = [_log(f"line {n}\n".encode(), T0 + n * SECOND // 1000) for n in range(lines)]
    return [_vertex(completed=False), *batches, _vertex(completed=True)]


def from_engine_output(path: Path) -> list[bytes]:
    batches = []
    for line in path.read_text().splitlines():
        message = json.loads(line)
        if message.get("id") == "moby.buildkit.trace":
            batches.append(base64.b64decode(message["aux"]))
    return batches


def decode_only(batches: list[bytes]) -> int:
    for batch in batches:
        decode_status(batch)
    return 0


def decode_and_track(batches: list[bytes]) -> int:
    tracker = StepTracker()
    lines = 0
    for batch in batches:
        for event in tracker.feed(decode_status(batch)):
            if type(event) is Output:
                lines += len(event.lines)
    for event in tracker.finish():
        if type(event) is Output:
            lines += len(event.lines)
    return lines


def best_seconds(run: Callable[[list[bytes]], int], batches: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run(batches)
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, batches: list[bytes], rounds: int) -> None:
    lines = decode_and_track(batches)
    size = sum(map(len, batches))
    print(f"{name}: {lines:,} lines in {len(batches):,} batches, {size / 2**20:.1f} MiB of protobuf")
    for label, run in (("decode", decode_only), ("decode + track", decode_and_track)):
        seconds = best_seconds(run, batches, rounds)
        print(
            f"  {label:15} {seconds * 1e6 / lines * 10_000:9.0f} µs per 10,000 lines"
            f"  ({seconds * 1e6 / len(batches):.2f} µs per batch, {seconds * 1e3:.1f} ms in all)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, help="the engine's JSON-lines output of a BuildKit build")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.trace:
        report(str(args.trace), from_engine_output(args.trace), args.rounds)
    else:
        report("chatty (generated)", chatty(), args.rounds)
        report("drip (generated)", drip(), args.rounds)


if __name__ == "__main__":
    main()
