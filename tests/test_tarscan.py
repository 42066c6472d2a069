"""The streaming tar header scanner agrees with tarfile on what an upload holds."""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from builder.server.errors import ContextTooLarge, InvalidContext
from builder.server.tarscan import TarScanner


def _archive(mode: str, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt) as tar:
        for name, data in [("Dockerfile", b"FROM x\n"), ("./src/app.py", os.urandom(3000)),
                           ("deep/" + "d" * 150 + "/file.txt", b"long name"), ("ünï/cödé", b"pax name")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "Dockerfile"
        tar.addfile(link)
        folder = tarfile.TarInfo("emptydir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buffer.getvalue()


def _scan(data: bytes, seed: int = 0) -> TarScanner:
    rng = random.Random(seed)
    scanner = TarScanner()
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 2000)
        scanner.feed(data[pos : pos + step])
        pos += step
    scanner.finish()
    return scanner


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("w", tarfile.PAX_FORMAT), ("w", tarfile.GNU_FORMAT), ("w:gz", tarfile.PAX_FORMAT),
     ("w:bz2", tarfile.PAX_FORMAT), ("w:xz", tarfile.PAX_FORMAT)],
)
def test_scanner_finds_the_same_files_as_tarfile(mode: str, fmt: int) -> None:
    data = _archive(mode, fmt)
    expected = {m.name.removeprefix("./") for m in tarfile.open(fileobj=io.BytesIO(data)) if m.isfile() or m.issym()}
    for seed in range(5):
        scanner = _scan(data, seed)
        assert scanner.files == expected
        assert scanner.members == 6 and scanner.ended


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (os.urandom(4096), "not a readable tar"),
        (b"\x1f\x8b" + os.urandom(2000), "not a readable tar"),
        (b"\0" * 1024, "empty"),
    ],
)
def test_scanner_rejects_what_is_not_a_tar(data: bytes, message: str) -> None:
    with pytest.raises(InvalidContext, match=message):
        _scan(data)


def test_scanner_rejects_a_truncated_archive() -> None:
    data = _archive("w")
    with pytest.raises(InvalidContext, match="ends in the middle"):
        _scan(data[: 512 + 700])


def _tar_with(*infos: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("Dockerfile"), io.BytesIO(b""))
        for info in infos:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (_entry("/etc/passwd"), "absolute path"),
        (_entry("../outside"), "escapes the context"),
        (_entry("a/../../outside"), "escapes the context"),
        (_entry("dev/null", tarfile.CHRTYPE), "device or FIFO"),
        (_entry("disk", tarfile.BLKTYPE), "device or FIFO"),
        (_entry("pipe", tarfile.FIFOTYPE), "device or FIFO"),
        (_entry("hard", tarfile.LNKTYPE, "../../etc/shadow"), "escapes the context"),
    ],
)
def test_hostile_entries_are_refused_by_name(info: tarfile.TarInfo, message: str) -> None:
    with pytest.raises(InvalidContext, match=message) as refused:
        _scan(_tar_with(info))
    assert repr(info.name) in refused.value.message


def test_inner_dotdot_that_stays_inside_is_fine() -> None:
    assert "a/../b" in _scan(_tar_with(_entry("a/../b"))).files


def test_gzip_bomb_stops_at_the_unpacked_limit_without_inflating_it_all() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 300 * 1024 * 1024
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = buffer.getvalue()
    assert len(bomb) < 1024 * 1024
    scanner = TarScanner(max_unpacked=20 * 1024 * 1024)
    with pytest.raises(ContextTooLarge, match="unpacks to more than"):
        scanner.feed(bomb)
    assert scanner.unpacked <= 22 * 1024 * 1024


def test_too_many_entries_is_too_large() -> None:
    with pytest.raises(ContextTooLarge, match="entries"):
        scanner = TarScanner(max_members=3)
        scanner.feed(_tar_with(*(_entry(f"f{i}") for i in range(5))))
