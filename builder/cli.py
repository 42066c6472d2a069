"""The `builder` command line: `builder serve` runs the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.server.config import Settings


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the build daemon in the foreground")
    defaults = Settings()
    serve.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    serve.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                       help="where build records, logs and spooled contexts live (default %(default)s)")
    serve.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                       help="builds run at once; the rest queue FIFO (default %(default)s)")
    serve.add_argument("--max-context-bytes", type=int, default=defaults.max_context_bytes,
                       help="largest accepted build context upload (default %(default)s)")
    serve.add_argument("--log-format", choices=["json", "console", "auto"], default=defaults.log_format,
                       help="log output; auto = json unless stdout is a terminal")
    serve.add_argument("--log-level", default=defaults.log_level, help="debug, info, warning, error")
    serve.add_argument("--docker-host", default=defaults.docker_host,
                       help="Docker engine URL (default $DOCKER_HOST or the local socket)")
    serve.add_argument("--cancel-wait", type=float, default=defaults.cancel_wait,
                       help="seconds DELETE waits for teardown before answering 202 (default %(default)s)")
    serve.add_argument("--retention", type=_duration, default=defaults.retention,
                       help="keep finished builds and their logs this long: seconds, or 90m, 12h, 7d (default 7d)")
    serve.add_argument("--max-builds", type=int, default=defaults.max_builds,
                       help="keep at most this many finished builds (default %(default)s)")
    serve.set_defaults(func=_serve)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 7d)") from None


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from builder.observability import configure_logging
    from builder.server.app import RUNNER_OPTIONS, create_app

    if args.max_concurrent < 1:
        print("builder serve: --max-concurrent must be at least 1", file=sys.stderr)
        return 2
    settings = Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        max_concurrent=args.max_concurrent,
        max_context_bytes=args.max_context_bytes,
        docker_host=args.docker_host,
        log_format=args.log_format,
        log_level=args.log_level,
        cancel_wait=args.cancel_wait,
        retention=args.retention,
        max_builds=args.max_builds,
    )
    configure_logging(settings.log_format, settings.log_level)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=lambda msg: print(msg, file=sys.stderr),
        access_log=None,
        **RUNNER_OPTIONS,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="builder", description="Remote container image builder")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
