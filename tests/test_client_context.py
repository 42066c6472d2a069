"""Client-side build contexts: .dockerignore matching and the streamed, reproducible, compressed tar."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from builder.client import context as context_module
from builder.client.context import (
    Compression,
    check_context,
    iter_context,
    stream_context,
)
from builder.client.dockerignore import DockerIgnore, read_patterns
from builder.client.errors import ContextError

pytestmark = pytest.mark.unit

# --- .dockerignore -----------------------------------------------------------


def test_read_patterns_skips_comments_and_blanks_and_cleans() -> None:
    text = "# comment\n\n   \n*.log\n/build/\n ! /docs/./a/../b \n  #not-a-comment\r\n"
    assert read_patterns(text) == ["*.log", "build", "!docs/b", "#not-a-comment"]


def test_from_file_strips_bom(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_bytes(b"\xef\xbb\xbf*.log\n")
    assert DockerIgnore.from_file(tmp_path / ".dockerignore").patterns == ["*.log"]


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["*.log"], "debug.log", True),
        (["*.log"], "sub/debug.log", False),  # `*` does not cross `/`
        (["**/*.tmp"], "a.tmp", True),  # `**` matches zero directories
        (["**/*.tmp"], "a/b/c.tmp", True),
        (["**/*.tmp"], "a/b/c.tmpx", False),
        (["build/"], "build", True),
        (["build/"], "build/sub/file.o", True),  # parent directory matched
        (["build"], "rebuild", False),
        (["docs/**"], "docs/a/b.md", True),
        (["docs/**"], "docs", False),
        (["/secret"], "secret", True),
        (["/secret"], "a/secret", False),
        (["a/**/b"], "a/b", True),
        (["a/**/b"], "a/x/y/b", True),
        (["file?.txt"], "file1.txt", True),
        (["file?.txt"], "file10.txt", False),
        (["a?c"], "a/c", False),
        (["[a-c].txt"], "b.txt", True),
        (["[a-c].txt"], "d.txt", False),
        (["[^a-c].txt"], "d.txt", True),
        (["\\*.txt"], "*.txt", True),
        (["\\*.txt"], "a.txt", False),
        (["a.b"], "axb", False),  # regex metacharacters are literal
        (["*", "!keep"], "keep", False),
        (["*", "!keep", "keep"], "keep", True),  # the last match wins
        (["!keep", "*"], "keep", True),
        (["build", "!build/keep.txt"], "build/keep.txt", False),
        (["build", "!build/keep.txt"], "build/other.txt", True),
        ([], "anything", False),
    ],
)
def test_excluded(patterns: list[str], path: str, excluded: bool) -> None:
    assert DockerIgnore(patterns).excluded(path) is excluded


@pytest.mark.parametrize(
    ("patterns", "directory", "skip"),
    [
        (["node_modules"], "node_modules", True),
        (["build", "!build/keep.txt"], "build", False),
        (["build", "!**/keep.txt"], "build", False),
        (["build", "!b*/sub/keep"], "build", False),
        (["build", "!*.md"], "build", True),  # `*.md` cannot match below build/
        (["build", "!other/keep"], "build", True),
        (["src"], "lib", False),  # not excluded at all
    ],
)
def test_can_skip_dir(patterns: list[str], directory: str, skip: bool) -> None:
    assert DockerIgnore(patterns).can_skip_dir(directory) is skip


@pytest.mark.parametrize("pattern", ["[abc", "a[]b", "!", "[z-a]"])
def test_bad_patterns_raise(pattern: str) -> None:
    with pytest.raises(ValueError):
        DockerIgnore([pattern])


# --- the archive -------------------------------------------------------------

DOCKERIGNORE = """\
# build outputs
*.log
**/*.tmp

build
!build/keep.txt
docs/**
/Dockerfile
.dockerignore
"""


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    (tmp_path / "outside").write_text("outside secret\n")
    root = tmp_path / "ctx"
    for rel, content in {
        "Dockerfile": "FROM scratch\n",
        ".dockerignore": DOCKERIGNORE,
        "app.py": "print('hi')\n",
        "run.sh": "#!/bin/sh\n",
        "debug.log": "noise",
        "src/main.py": "main",
        "src/cache.tmp": "tmp",
        "src/deep/x.tmp": "tmp",
        "src/deep/y.txt": "y",
        "build/out.bin": "bin",
        "build/keep.txt": "keep",
        "docs/index.md": "doc",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o644)
    (root / "run.sh").chmod(0o755)
    (root / "link_passwd").symlink_to("/etc/passwd")
    (root / "link_out").symlink_to("../outside")
    return root


def archive(
    context_dir: Path, dockerfile: str = "Dockerfile", chunk_size: int = 1 << 20, compression: Compression = "gzip"
) -> bytes:
    return b"".join(iter_context(context_dir, dockerfile, chunk_size, compression=compression))


def tar_of(data: bytes) -> bytes:
    """The tar inside an archive, whatever it is compressed with."""
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_archive_members_honour_dockerignore(ctx: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive(ctx)), mode="r:gz") as tar:
        names = tar.getnames()
        assert tar.extractfile("build/keep.txt").read() == b"keep"
        assert tar.extractfile("Dockerfile").read() == b"FROM scratch\n"
    # Sorted walk, each directory before its contents; the excluded `build`
    # directory has no entry of its own but its re-included file is there.
    assert names == [
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "build/keep.txt",
        "docs",
        "link_out",
        "link_passwd",
        "run.sh",
        "src",
        "src/deep",
        "src/deep/y.txt",
        "src/main.py",
    ]


def test_archive_metadata_is_normalised(ctx: Path) -> None:
    found = members(archive(ctx))
    for info in found.values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
    assert found["run.sh"].mode == 0o755
    assert found["app.py"].mode == 0o644
    assert found["src"].isdir()


def test_symlinks_are_sent_as_links_never_followed(ctx: Path) -> None:
    data = archive(ctx)
    found = members(data)
    assert found["link_passwd"].issym() and found["link_passwd"].linkname == "/etc/passwd"
    assert found["link_out"].issym() and found["link_out"].linkname == "../outside"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        raw = b"".join(tar.extractfile(m).read() for m in tar if m.isfile())
    assert b"outside secret" not in raw and b"root:" not in raw


def test_special_files_are_skipped(ctx: Path) -> None:
    os.mkfifo(ctx / "pipe")
    assert "pipe" not in members(archive(ctx))


def test_dockerfile_in_ignored_directory_is_sent(ctx: Path) -> None:
    (ctx / "build" / "Dockerfile.prod").write_text("FROM scratch\n")
    names = set(members(archive(ctx, "build/Dockerfile.prod")))
    assert {"build/Dockerfile.prod", "build/keep.txt"} <= names
    assert "build/out.bin" not in names


def test_archive_is_reproducible(ctx: Path) -> None:
    first = archive(ctx)
    assert first[4:8] == b"\0\0\0\0"  # gzip header mtime
    for path in ctx.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000), follow_symlinks=False)
    assert archive(ctx) == first
    assert archive(ctx, chunk_size=1000) == first


def test_tar_stream_is_padded_like_tarfile(ctx: Path) -> None:
    assert len(tar_of(archive(ctx))) % tarfile.RECORDSIZE == 0


def test_every_compression_carries_the_same_tar(ctx: Path) -> None:
    plain = archive(ctx, compression="none")
    zstd = archive(ctx, compression="zstd")
    assert zstd.startswith(b"\x28\xb5\x2f\xfd")  # the zstd frame magic
    assert tar_of(zstd) == tar_of(archive(ctx, compression="gzip")) == plain
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        assert tar.getnames() == list(members(archive(ctx)))
    assert archive(ctx, compression="zstd", chunk_size=1000) == zstd  # reproducible


def test_symlinked_dockerfile_is_sent_as_a_regular_file(ctx: Path) -> None:
    (ctx / "docker").mkdir()
    (ctx / "docker" / "app.Dockerfile").write_text("FROM scratch\nLABEL via=link\n")
    (ctx / "docker" / "app.Dockerfile").chmod(0o640)
    (ctx / "Dockerfile").unlink()
    (ctx / "Dockerfile").symlink_to("docker/app.Dockerfile")
    (ctx / "other.Dockerfile").symlink_to("docker/app.Dockerfile")
    data = archive(ctx)
    found = members(data)
    assert found["Dockerfile"].isfile() and found["Dockerfile"].mode == 0o640
    assert found["other.Dockerfile"].issym()  # only the Dockerfile in use is dereferenced
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.extractfile("Dockerfile").read() == b"FROM scratch\nLABEL via=link\n"
        assert tar.extractfile("docker/app.Dockerfile").read() == b"FROM scratch\nLABEL via=link\n"


def test_dockerfile_through_a_symlinked_directory_is_named_by_its_real_path(ctx: Path) -> None:
    (ctx / "src" / "Dockerfile").write_text("FROM scratch\n")
    (ctx / "linked").symlink_to("src/deep/../")
    assert check_context(ctx, "linked/Dockerfile") == "src/Dockerfile"
    found = members(archive(ctx, "linked/Dockerfile"))
    assert found["src/Dockerfile"].isfile() and found["linked"].issym()


def test_large_file_streams_in_bounded_chunks(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    size = 50 * 1024 * 1024
    with open(tmp_path / "big.bin", "wb") as fh:  # sparse: only the last byte is written
        fh.seek(size - 1)
        fh.write(b"x")
    chunk_size = 64 * 1024
    chunks = list(iter_context(tmp_path, chunk_size=chunk_size))
    assert max(map(len, chunks)) <= 2 * chunk_size
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        member = tar.getmember("big.bin")
        assert member.size == size
        fh = tar.extractfile(member)
        fh.seek(size - 1)
        assert fh.read() == b"x"


def test_unreadable_file_names_the_path(ctx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(path: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path.endswith("app.py"):
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kwargs)

    # Patch the module's `open` (root could read a chmod-000 file anyway).
    monkeypatch.setattr(context_module, "open", deny, raising=False)
    with pytest.raises(ContextError, match=re.escape("app.py")):
        archive(ctx)


def test_bad_dockerignore_is_a_context_error(ctx: Path) -> None:
    (ctx / ".dockerignore").write_text("[unterminated\n")
    with pytest.raises(ContextError, match=re.escape(".dockerignore")):
        archive(ctx)


# --- check_context -----------------------------------------------------------


def test_check_context_accepts_valid_context(ctx: Path) -> None:
    assert check_context(ctx, "Dockerfile") == "Dockerfile"
    assert check_context(ctx, "./src/../Dockerfile") == "Dockerfile"


def test_check_context_falls_back_to_lowercase_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "dockerfile").write_text("FROM scratch\n")
    assert check_context(tmp_path, "Dockerfile") == "dockerfile"


@pytest.mark.parametrize(
    ("make", "dockerfile", "message"),
    [
        (lambda root: root / "missing", "Dockerfile", "does not exist"),
        (lambda root: root / "ctx" / "app.py", "Dockerfile", "not a directory"),
        (lambda root: root / "ctx", "Missing.Dockerfile", "not found"),
        (lambda root: root / "ctx", "src", "not found"),  # a directory
        (lambda root: root / "ctx", "../outside", "outside the build context"),
        (lambda root: root / "ctx", "src/../../outside", "outside the build context"),
        (lambda root: root / "ctx", "/etc/passwd", "relative"),
        (lambda root: root / "ctx", "link_out", "outside the build context"),  # via a symlink
        (lambda root: root / "ctx", "link_dir/Dockerfile", "outside the build context"),  # via a linked directory
    ],
)
def test_check_context_errors(ctx: Path, make, dockerfile: str, message: str) -> None:
    (ctx.parent / "elsewhere").mkdir()
    (ctx.parent / "elsewhere" / "Dockerfile").symlink_to("../ctx/Dockerfile")  # back inside, by a way outside
    (ctx / "link_dir").symlink_to("../elsewhere")
    with pytest.raises(ContextError, match=message) as raised:
        check_context(make(ctx.parent), dockerfile)
    assert message in raised.value.message


# --- stream_context ----------------------------------------------------------


async def test_stream_context_reports_progress(ctx: Path) -> None:
    progress: list[int] = []
    stream = stream_context(ctx, "Dockerfile", on_progress=progress.append, chunk_size=64)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 1
    assert progress == sorted(set(progress))  # strictly increasing
    assert progress[-1] == sum(map(len, chunks))
    assert b"".join(chunks) == archive(ctx)


async def test_stream_context_awaits_async_progress_and_raises_context_errors(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    seen: list[int] = []

    async def record(sent: int) -> None:
        seen.append(sent)

    data = b"".join([c async for c in stream_context(tmp_path, "Dockerfile", on_progress=record)])
    assert seen == [len(data)]
    with pytest.raises(ContextError):
        async for _ in stream_context(tmp_path / "missing", "Dockerfile"):
            pass


async def test_stream_context_runs_ahead_of_the_consumer_by_a_bounded_amount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "big.bin").touch()
    os.truncate(tmp_path / "big.bin", 20 * 1024 * 1024)  # sparse
    produced, taken, ahead = 0, 0, []
    real = context_module.iter_context

    def counting(*args: object, **kwargs: object) -> Iterator[bytes]:
        nonlocal produced
        for chunk in real(*args, **kwargs):  # type: ignore[arg-type]
            produced += 1
            ahead.append(produced - taken)
            yield chunk

    monkeypatch.setattr(context_module, "iter_context", counting)
    chunks = []
    async for chunk in stream_context(tmp_path, compression="none", chunk_size=64 * 1024, queue_chunks=4):
        taken += 1
        chunks.append(chunk)
        await asyncio.sleep(0.001)  # a slow link: the producer would race ahead if it could
    assert len(chunks) == produced > 300
    # Four chunks queued, one in the producer's hand, one the consumer took but has not counted yet.
    assert max(ahead) <= 4 + 2
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        assert tar.getmember("big.bin").size == 20 * 1024 * 1024


async def test_consumer_leaving_early_stops_the_producer(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "big.bin").touch()
    os.truncate(tmp_path / "big.bin", 200 * 1024 * 1024)
    stream = stream_context(tmp_path, compression="none", chunk_size=64 * 1024)
    async for _ in stream:
        assert any(t.name == "builder-context" for t in threading.enumerate())
        break
    await stream.aclose()
    deadline = time.monotonic() + 30
    while any(t.name == "builder-context" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the producer thread went on after the consumer left"
        await asyncio.sleep(0.01)
