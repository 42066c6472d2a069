"""The `builder` client commands: the SDK for people at a terminal.

Exit codes: 0 success; 1 build failed or cancelled; 2 usage error or unusable context;
3 daemon unreachable or HTTP error; 130 after Ctrl+C; 141 after a broken pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from builder.client import (
    BuildCancelled,
    BuilderClient,
    BuilderConnectionError,
    BuilderHTTPError,
    BuildFailed,
    BuildResult,
    ContextError,
    ErrorEvent,
    EventBatch,
)
from builder.plainlog import plain_text, terminal_lines

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a `docker build | head` stage would die

MIB = 1 << 20


class Session:
    """What a running command shares with its Ctrl+C handler."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.build_id: str | None = None
        self.interrupted = False


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    session = Session(args)
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_sigint() -> None:
        if session.interrupted:
            # The DELETE is already on its way; a second Ctrl+C must not abort it.
            return
        session.interrupted = True
        what = f"build {session.build_id}" if session.build_id else "upload"
        print(f"cancelling {what}…", file=sys.stderr, flush=True)
        main_task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async with BuilderClient(args.url, args.token) as client:
            return await COMMANDS[args.command](client, session)
    except asyncio.CancelledError:
        if session.interrupted:
            return EXIT_INTERRUPTED
        raise
    except BrokenPipeError:
        # Point stdout at /dev/null so interpreter shutdown's flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (BuildFailed, BuildCancelled) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except ContextError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except (BuilderHTTPError, BuilderConnectionError) as exc:
        # The notes say what the retries saw (e.g. how long a log kept failing before giving up).
        print("\n".join([f"error: {exc}", *getattr(exc, "__notes__", ())]), file=sys.stderr)
        return EXIT_UNREACHABLE


async def _build(client: BuilderClient, session: Session) -> int:
    args = session.args
    started = time.monotonic()
    try:
        secrets = _secrets(args.secret)
    except (ValueError, OSError) as exc:
        print(f"error: --secret: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.image:
        session.build_id = await client.submit_image(
            args.image, image_name=args.tag, no_cache=args.no_cache, secrets=secrets
        )
    else:
        progress = None if args.quiet else UploadProgress()
        session.build_id = await client.submit(
            args.path,
            image_name=args.tag,
            dockerfile=args.file,
            build_args=_build_args(args.build_arg),
            target=args.target,
            no_cache=args.no_cache,
            compress=args.compress,
            on_upload_progress=progress,
            secrets=secrets,
        )
        if progress is not None:
            progress.finish()
    if args.detach:
        print(session.build_id)
        return EXIT_OK
    log_stream = None if args.quiet else sys.stderr if args.json else sys.stdout
    printer = None if log_stream is None else Printer(log_stream)
    try:
        result = await client.wait(session.build_id, on_events=printer, started=started)
    finally:
        if printer is not None:
            printer.close()
    _report(result, args)
    return EXIT_OK


def _report(result: BuildResult, args: argparse.Namespace) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "build_id": result.build_id,
                    "status": result.status,
                    "image_ref": result.image_ref,
                    "image_id": result.image_id,
                    "duration": round(result.duration, 3),
                }
            )
        )
    elif args.quiet:
        print(result.image_ref)
    else:
        print(f"built {result.image_ref} in {result.duration:.1f}s (build {result.build_id})", file=sys.stderr)


class Printer:
    """Events as `docker build --progress=plain` prints them (`#5 0.154 hi`, `#5 DONE 0.2s`)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __call__(self, events: EventBatch) -> None:
        """A batch that arrived together: one write, then a flush, so a closed pipe (`| head`) is
        noticed at the next batch, as with docker, without a write and a syscall per line."""
        if text := plain_text(events.payloads):
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class UploadProgress:
    """Upload progress on stderr: one updating line on a terminal, a line a second otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_report = 0.0
        self.sent = 0

    def __call__(self, sent: int) -> None:
        self.sent = sent
        now = time.monotonic()
        if now - self.last_report >= (0.1 if self.tty else 1.0):
            self.last_report = now
            self._print(f"uploading context: {sent / MIB:.1f} MiB", end="\r" if self.tty else "\n")

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        self._print(f"uploaded context: {self.sent / MIB:.1f} MiB in {elapsed:.1f}s", end="\n")

    def _print(self, text: str, *, end: str) -> None:
        print(text + ("\x1b[K" if self.tty else ""), end=end, file=sys.stderr, flush=True)


def _build_args(pairs: list[str]) -> dict[str, str]:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            # Like docker: a bare KEY takes its value from the environment.
            value = os.environ.get(key, "")
        args[key] = value
    return args


def _secrets(specs: list[str]) -> dict[str, bytes]:
    """`--secret` values, as docker build reads them: `id=ID,src=FILE` (or `source=`), `id=ID,env=VAR`,
    `type=file|env` to say which `src` is, and `id=ID` alone for the environment variable ID."""
    secrets = {}
    for spec in specs:
        options: dict[str, str] = {}
        for option in spec.split(","):
            key, sep, value = option.partition("=")
            key = "src" if key == "source" else key
            if not sep or key not in ("id", "src", "env", "type"):
                raise ValueError(f"{spec!r}: expected id=ID[,src=FILE|,env=VAR], not {option!r}")
            options[key] = value
        secret_id, kind = options.get("id"), options.get("type")
        if not secret_id:
            raise ValueError(f"{spec!r} has no id=")
        if kind not in (None, "file", "env"):
            raise ValueError(f"{spec!r}: type must be file or env")
        variable = options.get("env") or (options.get("src") if kind == "env" else None)
        if variable is None and "src" in options:
            with open(options["src"], "rb") as file:
                secrets[secret_id] = file.read()
            continue
        variable = variable or secret_id
        if variable not in os.environ:
            raise ValueError(f"{spec!r}: environment variable {variable} is not set")
        secrets[secret_id] = os.environb[variable.encode()]
    return secrets


async def _logs(client: BuilderClient, session: Session) -> int:
    args = session.args
    session.build_id = args.build_id
    printer = Printer(sys.stdout)
    async for batch in client.log_batches(args.build_id, after=args.after, follow=args.follow):
        end = batch[-1]
        printer(batch[:-1] if end.terminal else batch)
        for line in terminal_lines(end.data):  # `--- succeeded: <image>`, `--- failed: <error>`
            print(line, file=sys.stderr)
        if isinstance(end, ErrorEvent):
            return EXIT_BUILD_FAILED
    printer.close()
    return EXIT_OK


async def _status(client: BuilderClient, session: Session) -> int:
    print(json.dumps(await client.status(session.args.build_id), indent=2))
    return EXIT_OK


async def _cancel(client: BuilderClient, session: Session) -> int:
    print(json.dumps(await client.cancel(session.args.build_id), indent=2))
    return EXIT_OK


async def _ls(client: BuilderClient, session: Session) -> int:
    builds = await client.list(status=session.args.status, limit=session.args.limit)
    rows = [("BUILD ID", "STATUS", "IMAGE", "CREATED")]
    rows += [(b["build_id"], b["status"], b["image_ref"] or b["image_name"] or "-", b["created_at"]) for b in builds]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])
    return EXIT_OK


COMMANDS: dict[str, Callable[[BuilderClient, Session], Awaitable[int]]] = {
    "build": _build,
    "logs": _logs,
    "status": _status,
    "cancel": _cancel,
    "ls": _ls,
}
