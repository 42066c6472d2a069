"""`python -m benchmarks.rewrite`: throughput of the context rewriter alone (no I/O), in MB/s of upload.

(a) a plain tar of one 1 GiB file, (b) a plain tar of 10,000 small files (0-8 KiB),
(c) (a) compressed with gzip -1. Archives are generated piecewise as they are fed; only the
time spent in `feed()`/`finish()` and in copying their output once (as a socket or file write
would) is counted. The floor each is compared with: that one copy of the input alone (a, b),
or zlib inflating the input and that one copy of its output (c). The 1 GiB file's data cycles through 64 distinct MiB,
more than the CPU caches hold, so that copies cost what they cost in a real upload.
"""

from __future__ import annotations

import os
import statistics
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator

from builder.server.archive import ContextRewriter

GIB = 1 << 30
CHUNK = 1 << 20  # what contexts.py hands over per worker-thread hop
RUNS = 5
_TEXT = (b"compressible build context text, the same words again and again; " * 20000)[: CHUNK // 2]
# Half random, half repeated text, like benchmarks/upload.py.
_POOL = [os.urandom(CHUNK // 2) + _TEXT for _ in range(64)]
_SINK = bytearray(16 * CHUNK)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


_DOCKERFILE = _header("Dockerfile", 10) + b"FROM x\nRUN" + bytes(502)


def one_big_file() -> Iterator[bytes]:
    yield _DOCKERFILE + _header("big.bin", GIB)
    for i in range(GIB // CHUNK):
        yield _POOL[i % len(_POOL)]
    yield bytes(1024)


def small_files() -> Iterator[bytes]:
    blob = os.urandom(8192)
    out = bytearray(_DOCKERFILE)
    for i in range(10_000):
        size = (i * 7919) % 8193
        out += _header(f"src/pkg{i // 100:03d}/module_{i:05d}.py", size) + blob[:size] + bytes(-size % 512)
        if len(out) >= CHUNK:
            yield bytes(out)
            out.clear()
    yield bytes(out) + bytes(1024)


def gzipped(source: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    for piece in source():
        if out := compressor.compress(piece):
            yield out
    yield compressor.flush()


def _write(data: bytes | memoryview) -> None:
    _SINK[: len(data)] = data


def rewrite(pieces: Iterable[bytes]) -> tuple[int, float]:
    rewriter = ContextRewriter(max_entries=1_000_000, max_unpacked=4 * GIB)
    size, spent = 0, 0.0
    for piece in pieces:
        size += len(piece)
        start = time.perf_counter()
        for out in rewriter.feed(piece):
            _write(out)
        spent += time.perf_counter() - start
    start = time.perf_counter()
    _write(rewriter.finish())
    return size, spent + time.perf_counter() - start


def copy_once(pieces: Iterable[bytes]) -> tuple[int, float]:
    size, spent = 0, 0.0
    for piece in pieces:
        size += len(piece)
        start = time.perf_counter()
        _write(piece)
        spent += time.perf_counter() - start
    return size, spent


def inflate(pieces: Iterable[bytes]) -> tuple[int, float]:
    size, spent = 0, 0.0
    inflater = zlib.decompressobj(31)
    for piece in pieces:
        size += len(piece)
        start = time.perf_counter()
        _write(inflater.decompress(piece))
        spent += time.perf_counter() - start
    return size, spent


def measure(
    name: str,
    source: Callable[[], Iterator[bytes]],
    floor: Callable[[Iterable[bytes]], tuple[int, float]],
    floor_name: str,
) -> None:
    """Rewriter and floor alternate (the machine is shared): medians, and the median of per-pair ratios."""
    pieces: Iterable[bytes] | None = None if source is one_big_file else list(source())  # generated outside the timing
    speeds: dict[str, list[float]] = {"rewriter": [], floor_name: []}
    for _ in range(RUNS):
        for label, run in (("rewriter", rewrite), (floor_name, floor)):
            size, spent = run(source() if pieces is None else pieces)
            speeds[label].append(size / spent / 1e6)
    for label, runs in speeds.items():
        each = ", ".join(f"{s:.0f}" for s in runs)
        print(f"{name:36} {label:10} {statistics.median(runs):7.0f} MB/s  (runs {each}; {size / 1e6:.0f} MB in)")
    ratios = [ours / theirs for ours, theirs in zip(speeds["rewriter"], speeds[floor_name], strict=True)]
    print(f"{name:36} ratio      {statistics.median(ratios):7.2f}  (per pair {', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    measure("(a) plain tar, one 1 GiB file", one_big_file, copy_once, "one copy")
    measure("(b) plain tar, 10,000 small files", small_files, copy_once, "one copy")
    measure("(c) gzip -1 of (a)", lambda: gzipped(one_big_file), inflate, "zlib alone")
    _, spent = rewrite(small_files())
    print(f"(b) {10_001 / spent:,.0f} entries/s")


if __name__ == "__main__":
    main()
