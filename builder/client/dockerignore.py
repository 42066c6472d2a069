""".dockerignore semantics, as implemented by moby/patternmatcher and the docker CLI.

- Lines starting with `#` are comments; lines are then trimmed and blanks skipped.
- `!pattern` is an exception: it re-includes what earlier patterns excluded.
- Patterns are cleaned like Go's `filepath.Clean` and a leading `/` is dropped,
  so `/build/` and `build` are the same pattern.
- Matching is Go's `filepath.Match` (`*` and `?` never match `/`, `[a-c]`,
  `[^a]`, `\\` escapes) plus `**`, which matches any number of directories,
  zero included.
- A pattern that matches a directory also matches everything under it.
- The last pattern that matches a path decides whether it is excluded.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from pathlib import Path


class _Pattern:
    __slots__ = ("exception", "parts", "regex", "text")

    def __init__(self, text: str, exception: bool) -> None:
        self.text = text
        self.exception = exception
        self.regex = re.compile(_translate(text), re.DOTALL)
        # Per-component regexes (None = may match anything, e.g. `**`), only
        # used to decide whether an exception could reach inside a directory.
        self.parts = [None if "**" in part else _compile_part(part) for part in text.split("/")]

    def matches(self, path: str) -> bool:
        """`path` or one of its parent directories matches."""
        if self.regex.fullmatch(path):
            return True
        end = path.find("/")
        while end != -1:
            if self.regex.fullmatch(path, 0, end):
                return True
            end = path.find("/", end + 1)
        return False

    def could_match_under(self, dir_parts: list[str]) -> bool:
        """Conservative: False only if no path strictly inside the directory can match."""
        for part, name in zip(self.parts, dir_parts, strict=False):
            if part is None:
                return True
            if not part.fullmatch(name):
                return False
        # A pattern no longer than the directory path matches at most the
        # directory or an ancestor, which the directory's own verdict covers.
        return len(self.parts) > len(dir_parts)


class DockerIgnore:
    """Compiled `.dockerignore` patterns; paths are relative and `/`-separated."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self._patterns: list[_Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            exception = text.startswith("!")
            if exception:
                text = text[1:].strip()
                if not text:
                    raise ValueError('illegal exclusion pattern: "!"')
            self._patterns.append(_Pattern(_clean(text), exception))
        # Reversed once so `excluded` can stop at the first (= last written) match.
        self._reversed = self._patterns[::-1]

    @classmethod
    def from_file(cls, path: str | Path) -> DockerIgnore:
        # utf-8-sig drops a leading BOM like the docker CLI; surrogateescape keeps
        # non-UTF-8 bytes comparable with os.scandir names.
        text = Path(path).read_text(encoding="utf-8-sig", errors="surrogateescape")
        return cls(read_patterns(text))

    @property
    def patterns(self) -> list[str]:
        return [("!" if p.exception else "") + p.text for p in self._patterns]

    def excluded(self, relpath: str) -> bool:
        for pattern in self._reversed:
            if pattern.matches(relpath):
                return not pattern.exception
        return False

    def can_skip_dir(self, relpath: str) -> bool:
        """True if the directory is excluded and no exception could re-include anything in it."""
        if not self.excluded(relpath):
            return False
        parts = relpath.split("/")
        return not any(p.exception and p.could_match_under(parts) for p in self._patterns)


def read_patterns(text: str) -> list[str]:
    """The patterns of a `.dockerignore` file, normalised like the docker CLI's reader."""
    patterns = []
    for line in text.split("\n"):
        # Like the CLI, only a `#` in the very first column starts a comment.
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        if line:
            line = _clean(line)
        patterns.append(("!" if exception else "") + line)
    return patterns


def escape(path: str) -> str:
    """A pattern that matches exactly `path`."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", path)


def _clean(pattern: str) -> str:
    """Go's filepath.Clean, then drop a leading `/` (patterns are context-relative)."""
    cleaned = posixpath.normpath(pattern)
    if cleaned.startswith("//"):  # POSIX normpath keeps exactly two leading slashes; Go does not
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned[1:] if len(cleaned) > 1 and cleaned.startswith("/") else cleaned


def _compile_part(part: str) -> re.Pattern[str] | None:
    try:
        return re.compile(_translate(part), re.DOTALL)
    except ValueError:
        # e.g. a `/` inside a class split the pattern oddly: assume it could match.
        return None


def _translate(pattern: str) -> str:
    """Regex source for one cleaned pattern (to be used with fullmatch)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if i < n and pattern[i] == "*":
                start = i == 1
                i += 1
                followed_by_slash = i < n and pattern[i] == "/"
                if followed_by_slash:
                    i += 1
                if i == n or (start and not followed_by_slash):
                    out.append(".*")  # `dir/**`, `**`, `**suffix`: anything, slashes included
                else:
                    out.append("(?:.*/)?")  # `**/`: zero or more whole directories
            else:
                out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            # A trailing backslash stays a literal backslash, as in moby.
            out.append(re.escape(pattern[i] if i < n else "\\"))
            i += 1
        elif c == "[":
            cls, i = _translate_class(pattern, i)
            out.append(cls)
        else:
            out.append(re.escape(c))
    source = "".join(out)
    try:
        re.compile(source)
    except re.error as exc:  # e.g. a reversed range `[z-a]`
        raise ValueError(f"bad pattern {pattern!r}: {exc}") from None
    return source


def _translate_class(pattern: str, i: int) -> tuple[str, int]:
    """Go's `[` [`^`] { char | char-char } `]`, starting just after the `[`."""
    negate = i < len(pattern) and pattern[i] == "^"
    if negate:
        i += 1
    items: list[str] = []
    while True:
        if i >= len(pattern):
            raise ValueError(f"bad pattern {pattern!r}: unterminated character class")
        if pattern[i] == "]" and items:
            return ("[^" if negate else "[") + "".join(items) + "]", i + 1
        lo, i = _class_char(pattern, i)
        if i < len(pattern) and pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
            items.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            items.append(re.escape(lo))


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    escaped = i < len(pattern) and pattern[i] == "\\"
    if escaped:
        i += 1
    if i >= len(pattern) or (not escaped and pattern[i] in "-]"):
        raise ValueError(f"bad pattern {pattern!r}: bad character class")
    return pattern[i], i + 1
