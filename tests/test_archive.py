"""The context rewriter: hostile archives are refused while they stream, real ones come out as
the same members in one canonical tar, however the upload is cut into chunks."""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import os
import posixpath
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from builder.client.context import Compression, iter_context
from builder.server.archive import ContextRewriter, decompress
from builder.server.errors import (
    BuilderError,
    ContextTooLarge,
    DockerfileNotFound,
    DockerfileTooLarge,
    InvalidContext,
    InvalidDockerfile,
)

pytestmark = pytest.mark.unit

MIB = 1 << 20
LIMITS = {"max_entries": 1000, "max_unpacked": 64 * MIB}
DOCKERFILE_TEXT = b"FROM builder-busybox:latest\nRUN echo hi\n"


# -- archives built by hand, byte by byte ------------------------------------------------------


def header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    linkname: bytes = b"",
    *,
    mode: int = 0o644,
    size_field: bytes | None = None,
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
) -> bytes:
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:124] = b"0001750\x000001750\x00"
    block[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % 1_700_000_000
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = magic
    block[265:270] = b"alice"
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", linkname: bytes = b"", **fields: object) -> bytes:
    return header(name, typeflag, len(data), linkname, **fields) + padded(data)  # type: ignore[arg-type]


def pax(records: dict[bytes, bytes], typeflag: bytes = b"x") -> bytes:
    data = b""
    for key, value in records.items():
        payload = b" %b=%b\n" % (key, value)
        length = len(payload) + 1
        while len(b"%d" % length) + len(payload) != length:
            length = len(b"%d" % length) + len(payload)
        data += b"%d%b" % (length, payload)
    return member(b"PaxHeaders/x", data, typeflag)


def gnu_long(typeflag: bytes, value: bytes) -> bytes:
    return member(b"././@LongLink", value + b"\x00", typeflag)


DOCKERFILE = member(b"Dockerfile", DOCKERFILE_TEXT)
END = bytes(1024)


# -- feeding ---------------------------------------------------------------------------------------


def feed(rewriter: ContextRewriter, data: bytes, chunks: Iterator[int] | None = None) -> bytes:
    """Feed `data` (in chunks of the given sizes, or whole); the output so far."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        step = next(chunks) if chunks is not None else len(data)
        for piece in rewriter.feed(data[pos : pos + step]):
            out += piece
        pos += step
    return bytes(out)


def rewrite(data: bytes, chunks: Iterator[int] | None = None, **options: object) -> tuple[ContextRewriter, bytes]:
    rewriter = ContextRewriter(**{**LIMITS, **options})  # type: ignore[arg-type]
    out = feed(rewriter, data, chunks)
    return rewriter, out + rewriter.finish()


def refused_while_streaming(data: bytes, error: type[BuilderError], match: str, **options: object) -> BuilderError:
    """`data` is refused by feed() itself, before finish(), as the upload streams."""
    rewriter = ContextRewriter(**{**LIMITS, **options})  # type: ignore[arg-type]
    with pytest.raises(error, match=match) as refused:
        feed(rewriter, data, iter(lambda: 4096, None))
    return refused.value


def members(data: bytes) -> list[tuple[str, bytes, str, int, bytes | None]]:
    """What tarfile reads: (path, type, link target, permission bits, content) of each entry."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            kind = tarfile.REGTYPE if info.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else info.type
            link = posixpath.normpath(info.linkname) if info.islnk() else info.linkname
            content = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            found.append((posixpath.normpath(info.name), kind, link, info.mode & 0o7777, content))
    return found


def gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(part, mtime=0) for part in parts)


# -- hostile archives --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress",
    [
        gzip_members,
        lambda *p: b"".join(map(bz2.compress, p)),
        lambda *p: b"".join(map(lzma.compress, p)),
        lambda *p: b"".join(map(zstandard.ZstdCompressor().compress, p)),
    ],
    ids=["gzip", "bzip2", "xz", "zstd"],
)
def test_a_pax_size_read_from_later_streams_counts_against_the_limit(compress: Callable[..., bytes]) -> None:
    # The attack: the entry's size is only in its pax record; its data comes from 24 later
    # streams of zeros that a reader stopping at the first stream never sees.
    lying = DOCKERFILE + pax({b"size": b"%d" % (24 * 64 * 1024)}) + header(b"big", size=0)
    upload = compress(lying, *[bytes(64 * 1024)] * 24, END)
    error = refused_while_streaming(upload, ContextTooLarge, "unpacks to more than", max_unpacked=MIB)
    assert error.status == 413 and error.code == "context_too_large"

    # Under a limit it fits, every stream is read: the entry holds all 24 streams' zeros.
    rewriter, out = rewrite(upload)
    assert members(out)[1] == ("big", tarfile.REGTYPE, "", 0o644, bytes(24 * 64 * 1024))
    assert rewriter.unpacked == len(out)


@pytest.mark.parametrize(
    ("archive", "match"),
    [
        (pax({b"path": b"../outside"}) + member(b"innocent", b"x"), "escapes the context"),
        (pax({b"path": b"/etc/cron.d/x"}) + member(b"innocent", b"x"), "absolute path"),
        (
            pax({b"linkpath": b"../../etc/shadow"}) + member(b"hard", typeflag=b"1", linkname=b"Dockerfile"),
            "escapes the context",
        ),
        (
            pax({b"linkpath": b"../../../etc"}) + member(b"a/link", typeflag=b"2", linkname=b"ok"),
            "symlink that escapes",
        ),
        (gnu_long(b"L", b"../" * 40 + b"etc/passwd") + member(b"innocent", b"x"), "escapes the context"),
        (gnu_long(b"L", b"/" + b"x" * 150) + member(b"innocent", b"x"), "absolute path"),
        (gnu_long(b"K", b"/etc/shadow") + member(b"hard", typeflag=b"1", linkname=b"Dockerfile"), "absolute path"),
        (
            gnu_long(b"K", b"x/" + b"../" * 40 + b"etc") + member(b"link", typeflag=b"2", linkname=b"ok"),
            "symlink that escapes",
        ),
        (member(b"a/../../x", b"x"), "escapes the context"),
        (member(b"link", typeflag=b"2", linkname=b"/.." * 3 + b"/etc"), "symlink that escapes"),
    ],
    ids=[
        "pax-path-dotdot",
        "pax-path-absolute",
        "pax-linkpath-hard",
        "pax-linkpath-symlink",
        "gnu-L-dotdot",
        "gnu-L-absolute",
        "gnu-K-hard",
        "gnu-K-symlink",
        "ustar-dotdot",
        "ustar-absolute-symlink-dotdot",
    ],
)
def test_names_and_link_targets_escaping_the_context_are_refused(archive: bytes, match: str) -> None:
    error = refused_while_streaming(DOCKERFILE + archive + END, InvalidContext, match)
    assert error.status == 400 and error.code == "invalid_context"


@pytest.mark.parametrize(("typeflag", "what"), [(b"3", "character device"), (b"4", "block device"), (b"6", "FIFO")])
def test_device_and_fifo_nodes_behind_a_gnu_long_link_are_refused_by_name(typeflag: bytes, what: str) -> None:
    # A long link record desynchronised the old scan so that these reached the image.
    archive = DOCKERFILE + gnu_long(b"K", b"t" * 150) + header(b"dev/evil", typeflag) + END
    error = refused_while_streaming(archive, InvalidContext, what)
    assert "'dev/evil'" in error.message and error.status == 400


def test_pax_size_disagreeing_with_the_header_size_is_refused() -> None:
    archive = DOCKERFILE + pax({b"size": b"10"}) + header(b"file", size=5) + padded(b"0123456789") + END
    error = refused_while_streaming(archive, InvalidContext, r"pax size \(10\) that disagrees with its header \(5\)")
    assert error.status == 400


@pytest.mark.parametrize(
    "sparse",
    [
        header(b"sparse", b"S", 512) + padded(b"x"),
        pax(
            {
                b"GNU.sparse.size": b"2147483648",
                b"GNU.sparse.numblocks": b"1",
                b"GNU.sparse.offset": b"0",
                b"GNU.sparse.numbytes": b"1",
            }
        )
        + member(b"sparse", b"x"),
        pax({b"GNU.sparse.size": b"2147483648", b"GNU.sparse.numblocks": b"1", b"GNU.sparse.map": b"0,1"})
        + member(b"sparse", b"x"),
        pax(
            {
                b"GNU.sparse.major": b"1",
                b"GNU.sparse.minor": b"0",
                b"GNU.sparse.name": b"sparse",
                b"GNU.sparse.realsize": b"2147483648",
            }
        )
        + member(b"GNUSparseFile.0/sparse", b"1\n0\n1\n" + bytes(506) + b"x"),
    ],
    ids=["old-gnu-S", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_gnu_sparse_files_are_refused_in_every_dialect(sparse: bytes) -> None:
    error = refused_while_streaming(DOCKERFILE + sparse + END, InvalidContext, "sparse file")
    assert error.status == 400


@pytest.mark.parametrize("sparse_format", ["gnu", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_gnu_tar_sparse_archives_are_refused(tmp_path: Path, sparse_format: str) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    (tmp_path / "Dockerfile").write_bytes(DOCKERFILE_TEXT)
    with open(tmp_path / "holes", "wb") as fh:
        fh.truncate(64 * MIB)
        fh.write(b"data at the start")
    fmt, _, version = sparse_format.partition("-")
    args = [tar, "--sparse", f"--format={'posix' if fmt == 'pax' else fmt}", "-cf", "-", "-C", str(tmp_path), "."]
    if version:
        args[2:2] = [f"--sparse-version={version}"]
    upload = subprocess.run(args, capture_output=True, check=True).stdout
    if len(upload) > MIB:
        pytest.skip("this file system does not report holes, so tar made no sparse entry")
    refused_while_streaming(upload, InvalidContext, "sparse file")


def base256(value: int) -> bytes:
    return bytes([0x80]) + value.to_bytes(11, "big")


def test_a_base256_size_is_read() -> None:
    archive = DOCKERFILE + header(b"blob", size_field=base256(1000)) + padded(b"b" * 1000) + END
    _, out = rewrite(archive)
    assert members(out)[1][4] == b"b" * 1000


def test_a_huge_base256_size_is_too_large_at_its_header() -> None:
    archive = DOCKERFILE + header(b"blob", size_field=base256(1 << 80)) + b"tiny"
    error = refused_while_streaming(archive, ContextTooLarge, "unpacks to more than")
    assert error.status == 413


def test_a_negative_base256_size_is_refused() -> None:
    archive = DOCKERFILE + header(b"blob", size_field=b"\xff" * 12) + END
    refused_while_streaming(archive, InvalidContext, "negative size")


def test_a_pax_record_over_1_mib_is_refused_at_its_header_without_reading_it() -> None:
    # 64 MiB announced: refused as soon as its header is read, after a few KiB of the upload.
    fed = 0

    def upload() -> Iterator[bytes]:
        yield DOCKERFILE + header(b"PaxHeaders/x", b"x", 64 * MIB)
        for _ in range(64):
            yield b"99999999 path=" + b"a" * (MIB - 14)

    rewriter = ContextRewriter(**LIMITS)  # type: ignore[arg-type]
    with pytest.raises(InvalidContext, match=r"pax header of 67108864 bytes .* over the limit of 1048576") as refused:
        for chunk in upload():
            fed += len(chunk)
            list(rewriter.feed(chunk))
    assert fed < 4096 and refused.value.status == 400


def test_a_pax_record_just_under_the_limit_is_read() -> None:
    comment = b"c" * (MIB - 64)
    archive = DOCKERFILE + pax({b"comment": comment}) + member(b"file", b"data") + END
    _, out = rewrite(archive, iter(lambda: 65_537, None))
    assert [m[0] for m in members(out)] == ["Dockerfile", "file"]
    assert comment not in out


@pytest.mark.parametrize("kind", [b"L", b"K", b"x", b"g"])
def test_gnu_and_pax_records_are_capped(kind: bytes) -> None:
    archive = DOCKERFILE + header(b"././@LongLink", kind, MIB + 1) + bytes(MIB + 512) + END
    refused_while_streaming(archive, InvalidContext, "over the limit of 1048576 bytes")


def test_a_pax_header_of_too_many_records_is_refused() -> None:
    records = {b"SCHILY.xattr.user.%d" % i: b"v" for i in range(1025)}
    refused_while_streaming(
        DOCKERFILE + pax(records) + member(b"file", b"x") + END, InvalidContext, "more than 1024 records"
    )


def test_an_upload_of_too_many_compressed_streams_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decompress, "_MAX_STREAMS", 10)
    upload = gzip_members(DOCKERFILE, *[b""] * 10, END)
    refused_while_streaming(upload, InvalidContext, "more than 10 gzip streams")


def test_a_header_checksum_mismatch_is_refused() -> None:
    broken = bytearray(member(b"file", b"data"))
    broken[10] ^= 0x01
    error = refused_while_streaming(DOCKERFILE + bytes(broken) + END, InvalidContext, "checksum mismatch at byte 1024")
    assert error.status == 400


def test_a_truncated_entry_is_refused_at_the_end() -> None:
    archive = DOCKERFILE + member(b"file", b"x" * 5000)
    for cut in (len(DOCKERFILE) + 300, len(DOCKERFILE) + 512 + 2000, len(archive) - 100):
        rewriter = ContextRewriter(**LIMITS)  # type: ignore[arg-type]
        feed(rewriter, archive[:cut])
        with pytest.raises(InvalidContext, match="ends in the middle"):
            rewriter.finish()


@pytest.mark.parametrize(
    "compressed",
    [b"", END, gzip.compress(b""), gzip.compress(END)],
    ids=["nothing", "end-blocks", "gzip-nothing", "gzip-end-blocks"],
)
def test_an_empty_archive_is_refused(compressed: bytes) -> None:
    with pytest.raises(InvalidContext, match="it is empty"):
        rewrite(compressed)


@pytest.mark.parametrize(
    "upload",
    [
        b"FROM busybox\nRUN true\n" * 40,
        os.urandom(4096),
        b"\x1f\x8b\x08" + os.urandom(2000),
        b"BZh9" + os.urandom(500),
        b"tiny",
    ],
    ids=["dockerfile-text", "random", "broken-gzip", "broken-bzip2", "tiny"],
)
def test_what_is_not_a_tar_is_refused(upload: bytes) -> None:
    rewriter = ContextRewriter(**LIMITS)  # type: ignore[arg-type]
    with pytest.raises(InvalidContext, match="not a readable"):
        feed(rewriter, upload)
        rewriter.finish()


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (b"nowhere", InvalidDockerfile, "must be a regular file, not a symlink"),
        (b"/etc/passwd", InvalidDockerfile, "must be a regular file, not a symlink"),
        (b"../../etc/passwd", InvalidContext, "symlink that escapes"),
    ],
    ids=["dangling", "absolute", "escaping"],
)
def test_a_symlinked_dockerfile_is_refused(target: bytes, error: type[BuilderError], match: str) -> None:
    archive = member(b"Dockerfile", typeflag=b"2", linkname=target) + END
    assert refused_while_streaming(archive, error, match).status == 400


def test_a_dockerfile_over_its_limit_is_refused_at_its_header() -> None:
    archive = member(b"Dockerfile", b"FROM x\n" + b"#" * (MIB + 1)) + END
    error = refused_while_streaming(archive[:1024], DockerfileTooLarge, "over the limit of 1048576 bytes")
    assert (error.status, error.code) == (413, "dockerfile_too_large")


def test_a_dockerfile_line_over_64_kib_is_refused() -> None:
    dockerfile = b"FROM x\nLABEL big=" + b"x" * (64 * 1024) + b"\nRUN true\n"
    error = refused_while_streaming(member(b"Dockerfile", dockerfile) + END, InvalidDockerfile, "a line of 65546 bytes")
    assert (error.status, error.code) == (400, "invalid_dockerfile")


def test_a_missing_dockerfile_is_reported_at_the_end() -> None:
    rewriter = ContextRewriter(**LIMITS, dockerfile="build/Dockerfile.prod")
    feed(rewriter, DOCKERFILE + END)
    with pytest.raises(DockerfileNotFound, match=re.escape("build/Dockerfile.prod")):
        rewriter.finish()


@pytest.mark.parametrize(
    ("archive", "match"),
    [
        (
            member(b"link", typeflag=b"2", linkname=b"src") + member(b"link/Dockerfile", b"x"),
            "inside 'link', which is not a directory",
        ),
        (member(b"sub/file", b"x") + member(b"sub", b"now a file"), "would replace a directory"),
        (member(b"twice", b"a") + member(b"twice", b"b"), "appears twice"),
        (
            member(b"hard", typeflag=b"1", linkname=b"later") + member(b"later", b"x"),
            "hard link to 'later', not to a file before it",
        ),
        (member(b"hard", typeflag=b"1", linkname=b"hard"), "hard link to 'hard'"),
        (member(b"odd", typeflag=b"V"), "unsupported type b'V'"),
        (member(b".", b"x"), "has no name"),
        (pax({b"path": b"a\x00b"}) + member(b"file", b"x"), "NUL byte"),
        (
            gnu_long(b"L", b"long-" * 30) + pax({b"path": b"other"}) + member(b"file", b"x"),
            "both a GNU and a pax long name",
        ),
        (pax({b"comment": b"1"}) + pax({b"comment": b"2"}) + member(b"file", b"x"), "a second pax header"),
        (pax({b"path": b"x"}) + pax({b"comment": b"2"}, b"g") + member(b"file", b"x"), "global pax header between"),
        (pax({b"path": b"everything"}, b"g") + member(b"file", b"x"), "global pax header setting 'path'"),
        (pax({b"path": b"x"}) + END, "without its entry"),
        (member(b"PaxHeaders/x", b"6 a=b\nXYZ", b"x") + member(b"file", b"x"), "malformed pax record"),
        (bytes(512) + member(b"file", b"x"), "lone zero block"),
        (END + member(b"file", b"x"), "data after its end"),
        (pax({b"path": b"x" * 4097}) + member(b"file", b"x"), "over 4096 bytes"),
    ],
    ids=[
        "under-a-symlink",
        "file-over-directory",
        "duplicate",
        "hard-link-forward",
        "hard-link-self",
        "unknown-type",
        "dot-file",
        "pax-path-nul",
        "gnu-and-pax-name",
        "two-pax-headers",
        "global-between",
        "global-path",
        "pax-without-entry",
        "malformed-pax",
        "lone-zero-block",
        "after-the-end",
        "path-max",
    ],
)
def test_ambiguous_or_odd_archives_are_refused(archive: bytes, match: str) -> None:
    refused_while_streaming(DOCKERFILE + archive + END, InvalidContext, match)


def test_garbage_after_a_compressed_stream_is_refused_but_zero_padding_is_not() -> None:
    archive = DOCKERFILE + END
    refused_while_streaming(
        gzip.compress(archive) + b"trailing garbage", InvalidContext, "data after the end of its gzip stream"
    )
    refused_while_streaming(
        bz2.compress(archive) + b"\x00\x00junk", InvalidContext, "data after the end of its bzip2 stream"
    )
    _, out = rewrite(gzip.compress(archive) + bytes(10_000))
    assert [m[0] for m in members(out)] == ["Dockerfile"]


def test_a_truncated_compressed_stream_is_refused() -> None:
    upload = gzip.compress(DOCKERFILE + member(b"file", os.urandom(5000)) + END)
    rewriter = ContextRewriter(**LIMITS)  # type: ignore[arg-type]
    feed(rewriter, upload[:-20])
    with pytest.raises(InvalidContext, match="truncated"):
        rewriter.finish()


def test_too_many_entries_is_too_large() -> None:
    archive = DOCKERFILE + b"".join(member(b"f%d" % i, b"x") for i in range(5)) + END
    error = refused_while_streaming(archive, ContextTooLarge, "more than the limit of 3 entries", max_entries=3)
    assert error.status == 413


def test_the_unpacked_limit_counts_the_tar_written() -> None:
    archive = DOCKERFILE + member(b"blob", bytes(600_000)) + END
    rewriter, out = rewrite(archive, max_unpacked=len(DOCKERFILE) + 512 + 600_064 + 1024)
    assert rewriter.unpacked == len(out) == len(DOCKERFILE) + 512 + 600_064 + 1024
    refused_while_streaming(archive, ContextTooLarge, "unpacks to more than", max_unpacked=len(out) - 1)


def test_a_gzip_bomb_is_refused_before_it_inflates() -> None:
    bomb = gzip.compress(member(b"zeros", bytes(300 * MIB))[:512] + bytes(300 * MIB), compresslevel=9)
    assert len(bomb) < MIB
    rewriter = ContextRewriter(max_entries=10, max_unpacked=20 * MIB)
    with pytest.raises(ContextTooLarge):
        for piece in rewriter.feed(bomb):
            assert len(piece) <= 2 * MIB


# -- real archives -----------------------------------------------------------------------------


def _tree(root: Path, *, long_names: bool = True) -> None:
    (root / "Dockerfile").write_bytes(DOCKERFILE_TEXT)
    deep = root / ("d" * 60) / ("e" * 60) if long_names else root / "src"
    deep.mkdir(parents=True)
    (deep / ("f" * 120 if long_names else "app.py")).write_bytes(os.urandom(3000))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "ünïcödé.txt").write_text("pax name\n")
    (root / "empty").mkdir()
    target = os.path.relpath(next(deep.iterdir()), root)
    os.symlink(target, root / "link-to-deep")
    os.symlink("/usr/bin/env", root / "absolute-link")
    os.link(root / "run.sh", root / "hard-link")
    if long_names:
        assert len(target) > 100


@pytest.mark.parametrize(
    ("args", "long_names"),
    [
        (["czf"], True),
        (["--format=pax", "-czf"], True),
        (["--format=gnu", "-cjf"], True),
        (["--format=ustar", "-cJf"], False),
        (["--format=posix", "--zstd", "-cf"], True),
    ],
    ids=["tar-czf", "pax", "gnu-bzip2", "ustar-xz", "posix-zstd"],
)
def test_gnu_tar_archives_come_out_as_the_same_members(tmp_path: Path, args: list[str], long_names: bool) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    context = tmp_path / "context"
    context.mkdir()
    _tree(context, long_names=long_names)
    archive = tmp_path / "context.tar"
    subprocess.run([tar, *args, str(archive), "-C", str(context), "."], check=True, capture_output=True)
    upload = archive.read_bytes()
    rewriter, out = _same_output_however_chunked(upload)
    if upload.startswith(b"\x28\xb5\x2f\xfd"):
        upload = zstandard.ZstdDecompressor().stream_reader(upload).read()  # tarfile reads no zstd
    assert members(out) == members(upload)
    assert "link-to-deep" in rewriter.files and "hard-link" in rewriter.files and "empty" not in rewriter.files
    assert rewriter.dockerfile_path == "Dockerfile" and rewriter.dockerfile_text == DOCKERFILE_TEXT.decode()


def _python_archive(fmt: int, mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt) as tar:  # type: ignore[call-overload]

        def add(name: str, data: bytes | None = None, **fields: object) -> None:
            info = tarfile.TarInfo(name)
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("Dockerfile", DOCKERFILE_TEXT, mtime=1_700_000_000)
        add("./src/app.py", random.Random(0).randbytes(3000), mode=0o600)
        add("deep/" + "d" * 150 + "/file.txt", b"long name")
        add("emptydir", type=tarfile.DIRTYPE, mode=0o750)
        add("link", type=tarfile.SYMTYPE, linkname="Dockerfile")
        add("hard", type=tarfile.LNKTYPE, linkname="src/app.py")
        add("bin/tool", b"#!/bin/sh\n", mode=0o4755)
        if fmt != tarfile.USTAR_FORMAT:
            add("ünï/cödé", b"pax name")
            add("long-link", type=tarfile.SYMTYPE, linkname="deep/" + "d" * 150 + "/file.txt")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"]
)
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_python_tarfile_archives_come_out_as_the_same_members(fmt: int, mode: str) -> None:
    upload = _python_archive(fmt, mode)
    _, out = _same_output_however_chunked(upload)
    assert members(out) == members(upload)


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize(
    "compress",
    [
        lambda p: gzip.compress(p, mtime=0),
        bz2.compress,
        lzma.compress,
        zstandard.ZstdCompressor(write_checksum=True).compress,
    ],
    ids=["gzip", "bzip2", "xz", "zstd"],
)
def test_every_stream_of_a_multi_stream_upload_is_read(compress: Callable[[bytes], bytes], split: int) -> None:
    plain = _python_archive(tarfile.PAX_FORMAT)
    cuts = [len(plain) * i // split for i in range(split + 1)]
    upload = b"".join(compress(plain[a:b]) for a, b in itertools.pairwise(cuts))
    _, out = _same_output_however_chunked(upload)
    assert members(out) == members(plain)


def test_skippable_zstd_frames_are_dropped() -> None:
    skippable = (0x184D2A5F).to_bytes(4, "little") + (7).to_bytes(4, "little") + b"ignored"
    plain = _python_archive(tarfile.PAX_FORMAT)
    upload = (
        skippable
        + zstandard.ZstdCompressor().compress(plain[:5000])
        + skippable
        + zstandard.ZstdCompressor().compress(plain[5000:])
    )
    _, out = _same_output_however_chunked(upload)
    assert members(out) == members(plain)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_an_sdk_context_comes_out_as_the_same_members(tmp_path: Path, compression: Compression) -> None:
    _tree(tmp_path)
    upload = b"".join(iter_context(tmp_path, compression=compression))
    rewriter, out = _same_output_however_chunked(upload)
    plain = b"".join(iter_context(tmp_path, compression="none"))
    assert members(out) == members(plain)
    assert rewriter.members == len(members(plain))


def test_the_same_members_give_the_same_bytes_whatever_the_writer() -> None:
    # Canonical: uid, gid, user and group names, pax comments and atimes are not passed on.
    outputs = {
        rewrite(_python_archive(fmt, mode))[1]
        for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)
        for mode in ("w", "w:gz")
    }
    assert len(outputs) == 1
    with tarfile.open(fileobj=io.BytesIO(outputs.pop())) as tar:
        for info in tar:
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
            assert set(info.pax_headers) <= {"path", "linkpath", "size"}


def test_a_default_dockerfile_falls_back_to_lowercase() -> None:
    archive = member(b"dockerfile", b"FROM lower\n") + member(b"src/x", b"x") + END
    rewriter, _ = rewrite(archive)
    assert (rewriter.dockerfile_path, rewriter.dockerfile_text) == ("dockerfile", "FROM lower\n")
    rewriter, _ = rewrite(member(b"dockerfile", b"FROM lower\n") + DOCKERFILE + END)
    assert rewriter.dockerfile_path == "Dockerfile"


def test_a_broken_fallback_dockerfile_does_not_matter_when_the_wanted_one_is_there() -> None:
    archive = member(b"dockerfile", typeflag=b"2", linkname=b"/nowhere") + DOCKERFILE + END
    rewriter, _ = rewrite(archive)
    assert rewriter.dockerfile_text == DOCKERFILE_TEXT.decode()
    with pytest.raises(InvalidDockerfile, match="must be a regular file"):
        rewrite(member(b"dockerfile", typeflag=b"2", linkname=b"/nowhere") + END)


def test_a_dockerfile_in_a_subdirectory_is_captured() -> None:
    archive = member(b"./build/", typeflag=b"5") + member(b"build/Dockerfile.prod", b"FROM prod\n") + END
    rewriter, _ = rewrite(archive, dockerfile="build/Dockerfile.prod")
    assert (rewriter.dockerfile_path, rewriter.dockerfile_text) == ("build/Dockerfile.prod", "FROM prod\n")


def test_header_dialects_are_read() -> None:
    archive = (
        DOCKERFILE
        + member(b"file.txt", b"prefixed", prefix=b"a/b")  # ustar prefix field
        + member(b"v7dir/", typeflag=b"\x00", magic=bytes(8))  # v7: a directory is a name ending in '/'
        + member(b"v7file", b"old", typeflag=b"\x00", magic=bytes(8))
        + member(b"gnufile", b"gnu", magic=b"ustar  \x00", prefix=b"\x01ignored-atime")  # GNU: no prefix there
        + pax({b"comment": b"git archive id"}, b"g")
        + pax({b"mtime": b"1234567890.25", b"uname": b"bob", b"SCHILY.xattr.user.x": b"y"})
        + member(b"timed", b"t")
        + END
        + bytes(9 * 1024)  # tar's record padding
    )
    _, out = rewrite(archive)
    assert [(m[0], m[1], m[4]) for m in members(out)] == [
        ("Dockerfile", tarfile.REGTYPE, DOCKERFILE_TEXT),
        ("a/b/file.txt", tarfile.REGTYPE, b"prefixed"),
        ("v7dir", tarfile.DIRTYPE, None),
        ("v7file", tarfile.REGTYPE, b"old"),
        ("gnufile", tarfile.REGTYPE, b"gnu"),
        ("timed", tarfile.REGTYPE, b"t"),
    ]
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert tar.getmember("timed").mtime == 1234567890


def _same_output_however_chunked(upload: bytes) -> tuple[ContextRewriter, bytes]:
    """Rewrite `upload` whole, one byte at a time, and in random chunks: the output must not differ."""
    rewriter, whole = rewrite(upload)
    rng = random.Random(len(upload))
    for chunks in (iter(lambda: 1, None), iter(lambda: rng.randint(1, 3000), None)):
        assert rewrite(upload, chunks)[1] == whole
    return rewriter, whole
