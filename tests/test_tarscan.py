"""The streaming tar header scanner agrees with tarfile on what an upload holds."""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from builder.server.errors import InvalidContext
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
