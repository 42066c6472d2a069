"""The images a Dockerfile makes the engine reach, resolved as its Dockerfile frontend does (pure).

The model is the frontend of Docker 20.10.24: BuildKit v0.8's parser, shell lexer and
instruction rules (moby vendors buildkit eeb7b65), which its legacy builder shares. Both
builders run our builds and they differ in places: where they do, every reading either
could make is returned (a superset is safe to check; a miss is not). What this module cannot
resolve with certainty raises `UnresolvableImageReference` naming the line.

What the engine does, found in its source and checked against it:
- no heredocs: after `RUN <<EOF` the following lines are instructions;
- parser directives (`# escape=`, `# syntax=`) only before any other line, blank or comment;
- a continuation joins lines with nothing in between, skips comment lines and blank lines
  inside it, and keeps the leading blanks of continued lines;
- FROM is expanded with the ARGs before the first FROM (build args override declared ones
  only; BuildKit also predefines TARGETARCH & co., the legacy builder the *_PROXY build args);
  `COPY --from` and `RUN --mount=from=` are not expanded at all;
- leading `--flags` are read byte by byte, so a byte 0x85 or 0xA0 before `--mount` is a blank;
- the legacy builder resolves image IDs and ID prefixes (`FROM a48443`, `sha256:a48`),
  and runs a base image's ONBUILD triggers, `COPY --from=<image>` included;
- `# syntax=` (and the BUILDKIT_SYNTAX build arg) hand the whole Dockerfile to a frontend
  image, which may reach any image: refused, as nothing here could vouch for it.

Stages are not pruned by `--target`: every stage's images are returned (conservative).
Hostile input is bounded: at most 10,000 instructions and 1,000 global ARGs are followed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from builder.server.errors import InvalidImageReference, UnresolvableImageReference
from builder.server.imageref import (
    NormalisedReference,
    looks_like_image_id,
    normalise_reference,
)

# unicode.IsSpace: what Go's TrimSpace, TrimLeftFunc and parseWords take for blanks.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
# `\s` of Go's regexp (directives, the ONBUILD prefix): ASCII, and no \v.
_REGEXP_SPACE = "\t\n\f\r "
# The parser's reWhitespace, between an instruction's words.
_WORD_GAP = re.compile(r"[\t\v\f\r ]+")
_ASCII_LETTERS = frozenset(string.ascii_letters)
_ASCII_ALNUM = _ASCII_LETTERS | frozenset(string.digits)
_STAGE_NAME = re.compile(r"[a-z][a-z0-9\-_.]*", re.ASCII)
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
# The lexer's work is mostly runs of ordinary characters: matched at once (single character
# classes, so no backtracking), keyed by escape token and by whether `}` ends the word.
_LEXER_SPECIAL = re.compile("[$'\"\\\\`\ufeff]")
_PLAIN_RUN = {
    (escape, stop): re.compile(f"[^$'\"{re.escape(escape)}{re.escape(stop)}]+")
    for escape in ("\\", "`")
    for stop in ("", "}")
}
_QUOTED_RUN = {escape: re.compile(f'[^$"{re.escape(escape)}]+') for escape in ("\\", "`")}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+", re.ASCII)
_GO_BLANKS = re.compile(f"[{_GO_SPACE}]+")
# Blanks to extractBuilderFlags, which reads bytes as characters (0x85 and 0xA0 included).
_FLAG_BLANKS = " \t\n\v\f\r\udc85\udca0"
_FLAG_GAP = re.compile(f"[{_FLAG_BLANKS}]*")
_SIMPLE_FLAG = re.compile(r"--[!#-&(-\[\]-~]*")  # printable ASCII but quotes and backslash

_MAX_LINE_BYTES = 65535  # bufio.Scanner's limit: the engine fails on a longer line
_MAX_WORD = 4096  # a FROM word longer than this cannot expand to a valid reference
_EXPANSION_BUDGET = 8192  # characters one expansion may produce; bounds the work per word
_MAX_NESTING = 64
_MAX_TRIGGER_DEPTH = 8
_MAX_GLOBAL_ARGS = 1000  # each is expanded for both builders; Dockerfiles have a handful
_MAX_INSTRUCTIONS = 10000  # bounds the work on hostile input; real Dockerfiles have dozens

_INSTRUCTIONS = frozenset(
    {
        "add",
        "arg",
        "cmd",
        "copy",
        "entrypoint",
        "env",
        "expose",
        "from",
        "healthcheck",
        "label",
        "maintainer",
        "onbuild",
        "run",
        "shell",
        "stopsignal",
        "user",
        "volume",
        "workdir",
    }
)
# The instructions whose arguments can reach an image (ARG: through FROM).
_REACHING = frozenset({"add", "arg", "copy", "from", "onbuild", "run"})
_PLATFORM_ARGS = (
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
)
_PROXY_ARGS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
)
# With BUILDKIT_DISABLE_FILEOP, BuildKit copies with this image and chowns cache mounts with busybox.
_FILEOP_HELPERS = (
    "docker/dockerfile-copy:v0.1.9@sha256:e8f159d3f00786604b93c675ee2783f8dc194bb565e61ca5788f6a6e9d304061",
    "busybox",
)
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


@dataclass(frozen=True)
class ImageReference:
    """An image a build can reach.

    `reference` is what the engine will look up, after substitution; `normalised` is how the
    engine reads it. `line` is the 1-based line of the instruction (0: not from the text).
    `origin` says what reaches it: "FROM", "COPY --from", "RUN --mount", "ONBUILD COPY --from"...
    """

    reference: str
    normalised: NormalisedReference
    line: int
    origin: str


def image_references(dockerfile_text: str, build_args: Mapping[str, str]) -> list[ImageReference]:
    """Every image a build of this Dockerfile can reach, on either builder, in file order.

    `dockerfile_text` is the Dockerfile's bytes decoded as UTF-8 with errors="surrogateescape"
    (other decodings lose bytes the engine tells apart). Stage names and `scratch` are not
    images; references are not deduplicated across lines.
    """
    if "BUILDKIT_SYNTAX" in build_args:
        _refuse_frontend(0, "the build arg BUILDKIT_SYNTAX", build_args["BUILDKIT_SYNTAX"].partition(" ")[0])
    if (syntax := _syntax_directive(dockerfile_text)) is not None:
        _refuse_frontend(syntax[0], "its `# syntax=` directive", syntax[1])
    instructions, escape = _parse(dockerfile_text, where=None)
    found: list[ImageReference] = []
    meta: list[_Instruction] = []
    stages: list[_Stage] = []
    for inst in instructions:
        if inst.cmd == "from":
            stages.append(_stage(inst))
        elif not stages:
            if inst.cmd != "arg":
                raise _refuse(inst.line, f"{inst.cmd.upper()} before the first FROM (the engine rejects this)")
            meta.append(inst)
        else:
            stages[-1].commands.append(inst)
    environments, declared = _meta_environments(meta, build_args, escape)
    all_names = {stage.name for stage in stages if stage.name}
    earlier: set[str] = set()
    for stage in stages:
        # A previous stage's name (exactly: BuildKit compares case-sensitively) is no image.
        bases = [base for base in _expand_from(stage, environments, declared, escape) if base not in earlier]
        found.extend(_base_references(bases, stage.line))
        for inst in stage.commands:
            # The legacy builder knows only earlier stages; BuildKit any stage, later ones too.
            found.extend(_command_references(inst, copy_stages=earlier, mount_stages=all_names))
        if stage.name:
            earlier.add(stage.name)
    if build_args.get("BUILDKIT_DISABLE_FILEOP") in _GO_TRUE:
        found.extend(_reference(image, 0, "helper image (BUILDKIT_DISABLE_FILEOP)") for image in _FILEOP_HELPERS)
    return found


def onbuild_references(triggers: Iterable[str]) -> list[ImageReference]:
    """The images a base image's ONBUILD triggers reach when a build starts FROM it.

    The legacy builder runs them, `COPY --from=<image>` included: check the `Config.OnBuild`
    of each base image a Dockerfile names (not only those built through this daemon).
    """
    found: list[ImageReference] = []
    for trigger in triggers:
        found.extend(_trigger_references(trigger, line=0, depth=0))
    return found


# --- Parsing: github.com/moby/buildkit frontend/dockerfile/parser (v0.8) ---


@dataclass(slots=True)
class _Instruction:
    line: int
    cmd: str  # lowercased
    flags: list[str]  # the leading --flags, unquoted
    rest: str  # the arguments after the flags, trimmed
    original: str  # the whole logical line, as ONBUILD records it


@dataclass
class _Stage:
    line: int
    base: str  # the FROM word, unexpanded
    name: str  # lowercased `AS` name, or ""
    commands: list[_Instruction] = field(default_factory=list)


class _Directives:
    """The parser's directive state: `# escape=` and `# syntax=`, only at the very top."""

    def __init__(self) -> None:
        self.escape = "\\"
        self.done = False
        self._seen: set[str] = set()

    def observe(self, line: str, number: int, where: str | None) -> None:
        if self.done:
            return
        found = _directive(line)
        if found is None or found[0].lower() not in ("escape", "syntax"):
            self.done = True
            return
        name, value = found[0].lower(), found[1]
        if name in self._seen:
            raise _refuse(number, f"a second {name} parser directive (the engine rejects this)", where)
        self._seen.add(name)
        if name == "escape":
            if value not in ("`", "\\"):
                raise _refuse(number, f"escape token {value!r} is neither ` nor \\ (the engine rejects this)", where)
            self.escape = value


def _directive(line: str) -> tuple[str, str] | None:
    """(name, value) where `^#\\s*([a-zA-Z][a-zA-Z0-9]*)\\s*=\\s*(.+?)\\s*$` matches, else None.

    Written out rather than as a regex: Python's backtracking takes quadratic time on that
    pattern against a long run of blanks.
    """
    if not line.startswith("#"):
        return None
    end = len(line)
    start = 1
    while start < end and line[start] in _REGEXP_SPACE:
        start += 1
    stop = start
    if stop == end or line[stop] not in _ASCII_LETTERS:
        return None
    while stop < end and line[stop] in _ASCII_ALNUM:
        stop += 1
    equals = stop
    while equals < end and line[equals] in _REGEXP_SPACE:
        equals += 1
    if equals == end or line[equals] != "=":
        return None
    rest = line[equals + 1 :]
    value = rest.lstrip(_REGEXP_SPACE).rstrip(_REGEXP_SPACE)
    if not value:
        # `(.+?)` takes one character even when all that is left is blank.
        return (line[start:stop], rest[-1]) if rest else None
    return line[start:stop], value


def _physical_lines(text: str, where: str | None) -> list[str]:
    """bufio.ScanLines: split at \\n, drop one \\r before it; a final empty line is no line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if max(map(len, lines), default=0) * 4 > _MAX_LINE_BYTES:  # UTF-8 takes up to 4 bytes a character
        for number, line in enumerate(lines, start=1):
            if len(line.encode("utf-8", "surrogateescape")) > _MAX_LINE_BYTES:
                raise _refuse(number, f"longer than the engine's {_MAX_LINE_BYTES}-byte line limit", where)
    return [line.removesuffix("\r") for line in lines] if "\r" in text else lines


def _parse(text: str, where: str | None) -> tuple[list[_Instruction], str]:
    """The logical instructions of `text`, and the escape token in force."""
    lines = _physical_lines(text, where)
    directives = _Directives()
    instructions: list[_Instruction] = []
    heredoc = False
    number = 0
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    while number < len(lines):
        token = lines[number].lstrip(_GO_SPACE)
        number += 1
        start = number
        if not directives.done:
            directives.observe(token, number, where)
        if not token or token[0] == "#":
            continue
        first, continued = _trim_continuation(token, directives.escape)
        pieces = [first]
        while continued and number < len(lines):
            raw = lines[number]
            number += 1
            if not directives.done:
                directives.observe(raw, number, where)
            stripped = raw.lstrip(_GO_SPACE)
            if stripped.startswith("#") or not stripped:
                continue  # comment lines and blank lines do not end a continuation
            piece, continued = _trim_continuation(raw, directives.escape)
            pieces.append(piece)
        inst = _split_command("".join(pieces), start, where)
        if inst.cmd not in _INSTRUCTIONS:
            hint = " (this engine has no heredocs: the lines after `<<EOF` are instructions)" if heredoc else ""
            raise _refuse(start, f"unknown instruction {inst.cmd!r}{hint} (the engine rejects this)", where)
        heredoc = heredoc or "<<" in inst.original
        instructions.append(inst)
        if len(instructions) > _MAX_INSTRUCTIONS:
            raise _refuse(start, f"more than {_MAX_INSTRUCTIONS} instructions (not followed)", where)
    return instructions, directives.escape


def _trim_continuation(line: str, escape: str) -> tuple[str, bool]:
    """`([^E])E[ \\t]*$|^E[ \\t]*$`: an escape token ending the line, not itself escaped."""
    body = line.rstrip(" \t")
    if body.endswith(escape) and (len(body) == 1 or body[-2] != escape):
        return body[:-1], True
    return line, False


def _split_command(line: str, number: int, where: str | None) -> _Instruction:
    words = _WORD_GAP.split(line.strip(_GO_SPACE), maxsplit=1)
    if not words[0].isascii():
        # Go lowercases İ to i and the Kelvin sign to k: refuse rather than model it.
        raise _refuse(number, f"instruction {words[0]!r} is not ASCII", where)
    cmd = words[0].lower()
    if cmd not in _REACHING or len(words) == 1:
        return _Instruction(number, cmd, [], "", line)  # its arguments reach no image
    flags, rest = _extract_flags(words[1], number, where)
    return _Instruction(number, cmd, flags, rest.strip(_GO_SPACE), line)


def _extract_flags(text: str, number: int, where: str | None) -> tuple[list[str], str]:
    """extractBuilderFlags: the leading `--flag` words (quotes and \\ handled), and the rest.

    The engine walks bytes as if each were a character, so a byte 0x85 or 0xA0 is a blank to
    it; an undecodable one (surrogateescape) is taken as that byte. Other non-ASCII inside a
    flag would be mangled by the engine: refused.
    """
    flags: list[str] = []
    pos, end = 0, len(text)
    while True:
        gap = _FLAG_GAP.match(text, pos)
        pos = gap.end() if gap else pos
        if pos == end:
            return flags, ""
        if text[pos] == "\ufffd":
            raise _refuse(number, "a replacement character where the engine reads bytes", where)
        if not text.startswith("--", pos):
            return flags, text[pos:]
        simple = _SIMPLE_FLAG.match(text, pos)
        if simple and (simple.end() == end or text[simple.end()] in _FLAG_BLANKS):
            flag, pos = simple.group(), simple.end()
        else:
            flag, pos = _quoted_flag(text, pos, number, where)
        if flag == "--":
            return flags, text[pos:]
        flags.append(flag)


def _quoted_flag(text: str, pos: int, number: int, where: str | None) -> tuple[str, int]:
    """One flag word with quotes or backslashes, up to the blank after it."""
    word: list[str] = []
    quote = ""
    end = len(text)
    while pos < end:
        ch = text[pos]
        if not quote and ch in _FLAG_BLANKS:
            break
        if not ch.isascii():
            raise _refuse(number, f"non-ASCII character in the flag {''.join(word)}... (the engine mangles it)", where)
        if quote and (ch == quote or (ch == "\\" and pos + 1 == end)):
            quote = ""
        elif not quote and ch in "'\"":
            quote = ch
        elif ch == "\\":
            if pos + 1 < end:
                pos += 1
                if not text[pos].isascii():
                    raise _refuse(number, "non-ASCII character in a flag (the engine mangles it)", where)
                word.append(text[pos])
        else:
            word.append(ch)
        pos += 1
    return "".join(word), pos


def _parse_words(rest: str, escape: str) -> list[str]:
    """parseWords: blank-separated words; quotes and escapes are kept, but bind blanks."""
    if not any(ch in rest for ch in ("'", '"', escape)):
        return [word for word in _GO_BLANKS.split(rest) if word]
    words: list[str] = []
    word: list[str] = []
    in_word = blank_ok = False
    quote = ""
    pos, end = 0, len(rest)
    while pos < end:
        ch = rest[pos]
        if not in_word:
            if ch in _GO_SPACE:
                pos += 1
                continue
            in_word = True
        if quote:
            if ch == quote:
                quote = ""
            if ch == escape and quote != "'":
                if pos + 1 == end:
                    quote = ""
                    pos += 1
                    continue
                word.append(ch)
                pos += 1
                ch = rest[pos]
            word.append(ch)
            pos += 1
            continue
        if ch in _GO_SPACE:
            if blank_ok or word:
                words.append("".join(word))
            word, in_word, blank_ok = [], False, False
            pos += 1
            continue
        if ch in "'\"":
            quote, blank_ok = ch, True
        if ch == escape:
            if pos + 1 == end:
                pos += 1
                continue
            word.append(ch)
            pos += 1
            ch = rest[pos]
        word.append(ch)
        pos += 1
    if in_word and (blank_ok or word):
        words.append("".join(word))
    return words


def _syntax_directive(text: str) -> tuple[int, str] | None:
    """BuildKit's DetectSyntax: leading `# name=value` lines (any name), the last `syntax` wins.

    Unlike the parser it neither strips a BOM or blanks nor stops at an unknown directive.
    """
    found = None
    for number, line in enumerate(_physical_lines(text, None), start=1):
        directive = _directive(line)
        if directive is None:
            break
        if directive[0].lower() == "syntax":
            found = (number, directive[1].partition(" ")[0])
    return found


def _stage(inst: _Instruction) -> _Stage:
    if not inst.original.isascii():
        raise _refuse(inst.line, "non-ASCII character in a FROM line")
    _parse_flags(inst, {"platform"})
    args = _WORD_GAP.split(inst.rest) if inst.rest else []
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise _refuse(inst.line, f"invalid stage name {args[2]!r} (the engine rejects this)")
        return _Stage(inst.line, args[0], name)
    if len(args) != 1:
        raise _refuse(inst.line, "FROM takes one or three arguments (the engine rejects this)")
    return _Stage(inst.line, args[0], "")


def _parse_flags(inst: _Instruction, known: set[str], where: str | None = None) -> dict[str, str]:
    """BFlags.Parse for string flags: unknown, repeated or valueless flags fail the build."""
    values: dict[str, str] = {}
    for flag in inst.flags:
        name, equals, value = flag[2:].partition("=")
        if name not in known:
            raise _refuse(inst.line, f"{inst.cmd.upper()} has no flag --{name} (the engine rejects this)", where)
        if name in values or not equals:
            raise _refuse(inst.line, f"flag --{name} repeated or without a value (the engine rejects this)", where)
        values[name] = value
    return values


# --- Commands that reach images ---


def _command_references(
    inst: _Instruction, *, copy_stages: set[str], mount_stages: set[str], where: str | None = None, depth: int = 0
) -> list[ImageReference]:
    """Images a command inside a stage reaches; names in the given sets are stages, not images."""
    prefix = "ONBUILD " * depth
    found = []
    if inst.cmd == "copy":
        source = _parse_flags(inst, {"chown", "from", "chmod"}, where).get("from", "")
        # A number is a stage index for both builders; `scratch` is empty (BuildKit) or refused (legacy).
        if source and not _is_int64(source) and source != "scratch" and source.lower() not in copy_stages:
            found.append(_reference(source, inst.line, f"{prefix}COPY --from", where=where))
    elif inst.cmd == "add":
        _parse_flags(inst, {"chown", "chmod"}, where)
    elif inst.cmd == "run":
        for source in _mount_sources(inst, where):
            if source != "scratch" and source.lower() not in mount_stages:
                found.append(_reference(source, inst.line, f"{prefix}RUN --mount", where=where))
    elif inst.cmd == "onbuild":
        found.extend(_trigger_references(_onbuild_expression(inst, where), inst.line, depth + 1))
    return found


def _mount_sources(inst: _Instruction, where: str | None) -> list[str]:
    """The `from=` of each `--mount` (BuildKit; the legacy builder fails on RUN flags)."""
    sources = []
    for flag in inst.flags:
        name, equals, value = flag[2:].partition("=")
        if name != "mount":
            continue  # other RUN flags reach no image
        if not equals:
            raise _refuse(inst.line, "--mount without a value (the engine rejects this)", where)
        if '"' in value:
            raise _refuse(inst.line, f"quoted CSV in --mount={value} (not modelled here)", where)
        kind, source = "bind", ""
        for item in value.split(","):
            key, equals, item_value = item.partition("=")
            key = key.lower() if key.isascii() else key
            if equals and key == "type":
                kind = item_value.lower() if item_value.isascii() else item_value
            elif equals and key == "from":
                source = item_value
        if source and kind != "tmpfs":
            sources.append(source)
    return sources


def _onbuild_expression(inst: _Instruction, where: str | None) -> str:
    """The trigger ONBUILD records: its line without `(?i)^\\s*ONBUILD\\s*`."""
    if not inst.rest:
        raise _refuse(inst.line, "ONBUILD without an instruction (the engine rejects this)", where)
    trigger = _WORD_GAP.split(inst.rest, maxsplit=1)[0].lower()
    if trigger in ("onbuild", "from", "maintainer"):
        raise _refuse(inst.line, f"{trigger.upper()} as an ONBUILD trigger (the engine rejects this)", where)
    original = inst.original
    start = len(original) - len(original.lstrip(_REGEXP_SPACE))
    keyword = original[start : start + 7]
    if not (keyword.isascii() and keyword.lower() == "onbuild"):
        return original
    return original[start + 7 :].lstrip(_REGEXP_SPACE)


def _trigger_references(trigger: str, line: int, depth: int) -> list[ImageReference]:
    """A trigger runs in a later build whose stages are unknown here: its names are images."""
    where = f"ONBUILD trigger {trigger[:80]!r}" + (f" (line {line})" if line else "")
    if depth > _MAX_TRIGGER_DEPTH:
        raise _refuse(line, "ONBUILD triggers nested too deeply", where)
    instructions, _ = _parse(trigger, where)
    if len(instructions) != 1:
        raise _refuse(line, "an ONBUILD trigger must be one instruction (the engine rejects this)", where)
    (inst,) = instructions
    inst.line = line
    if inst.cmd in ("from", "maintainer"):
        raise _refuse(line, f"{inst.cmd.upper()} as an ONBUILD trigger (the engine rejects this)", where)
    return _command_references(inst, copy_stages=set(), mount_stages=set(), where=where, depth=max(depth, 1))


def _is_int64(text: str) -> bool:
    return _INT.fullmatch(text) is not None and -(2**63) <= int(text) < 2**63


# --- Substitution in FROM: frontend/dockerfile/shell (Lex.ProcessWordWithMap) ---


@dataclass(frozen=True)
class _Unknown:
    """A variable whose value we cannot know; expanding it makes a FROM unresolvable."""

    reason: str


_Environment = dict[str, "str | _Unknown"]


class _Unresolvable(Exception):
    """Expansion failed: the engine rejects the word, or its value is unknown to us."""


class _TooLong(_Unresolvable):
    """More than the expansion budget: longer than any reference, so not followed."""


def _meta_environments(
    meta: Sequence[_Instruction], build_args: Mapping[str, str], escape: str
) -> tuple[list[_Environment], set[str]]:
    """The variables FROM sees, BuildKit's then the legacy builder's, and the ARG names.

    BuildKit: TARGETARCH & co. are predefined (their values depend on the engine's platform),
    each ARG is expanded with those before it, a build arg replaces a declared ARG's value, and
    an ARG without a value is set, to "". Legacy: *_PROXY build args are predefined, an ARG
    line is expanded as a whole with the variables before that line, an ARG without a value
    is unset.
    """
    buildkit: _Environment = {
        name: build_args[name] if name in build_args else _Unknown(f"depends on the engine's platform (${name})")
        for name in _PLATFORM_ARGS
    }
    legacy: _Environment = {name: build_args[name] for name in _PROXY_ARGS if name in build_args}
    declared: set[str] = set()
    count = 0
    for inst in meta:
        pairs = _arg_pairs(inst, escape)
        count += len(pairs)
        if count > _MAX_GLOBAL_ARGS:
            raise _refuse(inst.line, f"more than {_MAX_GLOBAL_ARGS} ARGs before the first FROM (not followed)")
        declared.update(key for key, _ in pairs)
        for key, value in pairs:
            buildkit[key] = build_args[key] if key in build_args else _meta_value(key, value, buildkit, escape, inst)
        # The legacy builder expands a whole ARG line with the variables from before it.
        line_values: list[str | _Unknown | None] = [
            build_args[key] if key in build_args else _meta_value(key, value, legacy, escape, inst) if value else value
            for key, value in pairs
        ]
        for (key, _), line_value in zip(pairs, line_values, strict=True):
            if line_value is None:
                legacy.pop(key, None)
            else:
                legacy[key] = line_value
    return [buildkit, legacy], declared


def _arg_pairs(inst: _Instruction, escape: str) -> list[tuple[str, str | None]]:
    words = _parse_words(inst.rest, escape)
    if not words:
        raise _refuse(inst.line, "ARG without a name (the engine rejects this)")
    pairs: list[tuple[str, str | None]] = []
    for word in words:
        key, equals, value = word.partition("=")
        if not key:
            raise _refuse(inst.line, "ARG with a blank name (the engine rejects this)")
        if any(ch in "$'\"" or ch == escape for ch in key) or key.startswith("\ufeff"):
            # The legacy builder expands ARG names, BuildKit does not.
            raise _refuse(inst.line, f"ARG name {key!r} has quotes, $ or escapes (the builders differ)")
        pairs.append((key, value if equals else None))
    return pairs


def _meta_value(key: str, value: str | None, env: _Environment, escape: str, inst: _Instruction) -> str | _Unknown:
    """An ARG's value; one we cannot expand only matters if a FROM uses it."""
    if value is None:
        return ""
    try:
        return _expand(value, env, escape)
    except _Unresolvable as exc:
        if isinstance(exc.args[0], _Unknown):
            return exc.args[0]
        return _Unknown(f"uses ARG {key} (line {inst.line}), whose value this check cannot expand: {exc.args[0]}")


def _expand_from(stage: _Stage, environments: list[_Environment], declared: set[str], escape: str) -> list[str]:
    """FROM's word as each builder expands it; a variable no global ARG declares is refused
    (the engine would take it for empty, or for a value only one builder predefines)."""
    if len(stage.base) > _MAX_WORD:
        raise _refuse(stage.line, "FROM word longer than any image reference")
    names = []
    for env in environments:
        try:
            name = _expand(stage.base, env, escape, declared)
        except _TooLong:
            raise _refuse(stage.line, f"FROM {stage.base[:64]} expands to more than any image reference") from None
        except _Unresolvable as exc:
            cause = exc.args[0]
            reason = cause.reason if isinstance(cause, _Unknown) else f"the engine rejects it: {cause}"
            raise _refuse(stage.line, f"FROM {stage.base}: {reason}") from None
        if not name:
            raise _refuse(stage.line, f"FROM {stage.base} expands to nothing (the engine rejects this)")
        names.append(name)
    return names


def _expand(word: str, env: _Environment, escape: str, declared: set[str] | None = None) -> str:
    if not _LEXER_SPECIAL.search(word):
        return word  # nothing to substitute: the common case, without the lexer
    return _Lexer(word, env, escape, declared).expand()


class _Lexer:
    """shell.Lex with a map: quotes, escapes, $x ${x} ${x:-w} ${x:+w} ${x?w} ${x:?w}.

    No `${x-w}` or `${x+w}`: this engine rejects them (missing ':' in substitution).
    """

    def __init__(self, word: str, env: _Environment, escape: str, declared: set[str] | None) -> None:
        # text/scanner skips a byte order mark at the start.
        self._text = word.removeprefix("\ufeff")
        self._pos = 0
        self._env = env
        self._declared = declared
        self._escape = escape
        self._budget = _EXPANSION_BUDGET
        self._plain = {stop: _PLAIN_RUN[escape, stop] for stop in ("", "}")}
        self._quoted = _QUOTED_RUN[escape]

    def expand(self) -> str:
        return self._until("", 0)

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _take(self, piece: str, out: list[str]) -> None:
        self._budget -= len(piece)
        if self._budget < 0:
            raise _TooLong("expands to too much")
        out.append(piece)

    def _until(self, stop: str, depth: int) -> str:
        out: list[str] = []
        plain = self._plain[stop]
        while ch := self._peek():
            if run := plain.match(self._text, self._pos):
                self._take(run.group(), out)
                self._pos = run.end()
                continue
            if stop and ch == stop:
                self._pos += 1
                return "".join(out)
            if ch == "'":
                self._take(self._single_quoted(), out)
            elif ch == '"':
                self._take(self._double_quoted(depth), out)
            elif ch == "$":
                self._take(self._dollar(depth), out)
            else:
                self._pos += 1
                if ch == self._escape:
                    ch = self._peek()
                    if not ch:
                        break
                    self._pos += 1
                self._take(ch, out)
        if stop:
            raise _Unresolvable(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out)

    def _single_quoted(self) -> str:
        end = self._text.find("'", self._pos + 1)
        if end < 0:
            raise _Unresolvable("unexpected end of statement while looking for matching single-quote")
        piece = self._text[self._pos + 1 : end]
        self._pos = end + 1
        return piece

    def _double_quoted(self, depth: int) -> str:
        self._pos += 1
        out: list[str] = []
        while True:
            ch = self._peek()
            if not ch:
                raise _Unresolvable("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self._pos += 1
                return "".join(out)
            if ch == "$":
                self._take(self._dollar(depth), out)
                continue
            if run := self._quoted.match(self._text, self._pos):
                self._take(run.group(), out)
                self._pos = run.end()
                continue
            self._pos += 1
            if ch == self._escape:
                following = self._peek()
                if not following:
                    continue
                if following in ('"', "$", self._escape):
                    ch = following
                    self._pos += 1
            self._take(ch, out)

    def _dollar(self, depth: int) -> str:
        self._pos += 1
        if self._peek() != "{":
            name = self._name()
            return self._value(name) if name else "$"
        self._pos += 1
        ch = self._peek()
        if not ch:
            raise _Unresolvable("syntax error: missing '}'")
        if ch in "{}:":
            raise _Unresolvable("syntax error: bad substitution")
        name = self._name()
        ch = self._peek()
        self._pos += 1 if ch else 0
        if ch == "}":
            return self._value(name)
        if ch == "?":
            word = self._nested(depth)
            if name not in self._env:
                raise _Unresolvable(f"{name}: {word or 'is not allowed to be unset'}")
            return self._value(name)
        if ch == ":":
            modifier = self._peek()
            self._pos += 1 if modifier else 0
            word = self._nested(depth)
            value = self._value(name)
            if modifier == "+":
                return word if value else value
            if modifier == "-":
                return value if value else word
            if modifier == "?":
                if name not in self._env or not value:
                    raise _Unresolvable(f"{name}: {word or 'is not allowed to be unset or empty'}")
                return value
            raise _Unresolvable(f"unsupported modifier ({modifier}) in substitution")
        raise _Unresolvable("missing ':' in substitution")

    def _nested(self, depth: int) -> str:
        if depth >= _MAX_NESTING:
            raise _Unresolvable("substitutions nested too deeply for this check")
        try:
            return self._until("}", depth + 1)
        except _TooLong:
            raise
        except _Unresolvable as exc:
            if not self._peek() and not isinstance(exc.args[0], _Unknown):
                raise _Unresolvable("syntax error: missing '}'") from None
            raise

    def _name(self) -> str:
        """Digits, a special parameter, or a letter or _ then letters, digits and _ (Unicode to
        the engine: a non-ASCII character in or next to a name is refused, not modelled)."""
        ch = self._peek()
        if ch and ch in "@*#?-$!":
            self._pos += 1
            return ch
        match = _NAME.match(self._text, self._pos)
        end = match.end() if match else self._pos
        if end < len(self._text) and not self._text[end].isascii():
            raise _Unresolvable(f"non-ASCII character {self._text[end]!r} in or after a variable name")
        self._pos = end
        return match.group() if match else ""

    def _value(self, name: str) -> str:
        if self._declared is not None and name not in self._declared:
            raise _Unresolvable(_Unknown(f"${name} is not declared by an ARG before the first FROM"))
        value = self._env.get(name, "")
        if isinstance(value, _Unknown):
            raise _Unresolvable(value)
        return value


# --- Results and refusals ---


def _base_references(bases: Sequence[str], line: int) -> list[ImageReference]:
    """The builders' readings of one FROM: one the engine cannot parse reaches nothing, but
    if no reading is valid the build is refused (it fails on BuildKit anyway)."""
    found, rejected = [], []
    for base in dict.fromkeys(bases):
        if base == "scratch":
            continue
        _refuse_image_id(base, "FROM", f"line {line}")
        try:
            found.append(ImageReference(base, _normalised(base, "FROM", f"line {line}", expanded=True), line, "FROM"))
        except UnresolvableImageReference as exc:
            rejected.append(exc)
    if rejected and not found:
        raise rejected[0]
    return found


def _reference(ref: str, line: int, origin: str, *, where: str | None = None) -> ImageReference:
    place = where or f"line {line}"
    _refuse_image_id(ref, origin, place)
    return ImageReference(ref, _normalised(ref, origin, place, expanded=False), line, origin)


def _refuse_image_id(ref: str, origin: str, place: str) -> None:
    if looks_like_image_id(ref):
        raise UnresolvableImageReference(
            f"{place}: {origin} {ref!r} could be an image ID or ID prefix, which the legacy builder "
            "resolves to any local image; name the image by repository instead"
        )


def _normalised(ref: str, origin: str, place: str, *, expanded: bool) -> NormalisedReference:
    if "$" in ref:
        why = "an unset or escaped variable?" if expanded else "the engine does not substitute variables here"
        raise UnresolvableImageReference(f"{place}: {origin} {ref!r} still has a '$' after substitution ({why})")
    try:
        return normalise_reference(ref)
    except InvalidImageReference as exc:
        raise UnresolvableImageReference(f"{place}: {origin} {exc.message} (the engine rejects it)") from None


def _refuse(line: int, why: str, where: str | None = None) -> UnresolvableImageReference:
    return UnresolvableImageReference(f"{where or f'line {line}'}: {why}")


def _refuse_frontend(line: int, what: str, frontend: str) -> None:
    place = f"line {line}: " if line else ""
    raise UnresolvableImageReference(
        f"{place}{what} hands the build to the frontend image {frontend!r}, which parses the Dockerfile "
        "its own way and can reach any image; only the engine's built-in frontend can be checked"
    )
