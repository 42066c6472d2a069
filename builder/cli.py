"""The `builder` command line: `builder serve` runs the daemon; the other commands use the SDK.

Start-up time counts for the client commands, so this module imports only what parsing needs:
the daemon's modules load for `serve` alone, the SDK for the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    from builder.server.config import Settings

    defaults = Settings()
    serve.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        help="where build records, logs and spooled contexts live (default %(default)s)",
    )
    serve.add_argument(
        "--max-concurrent",
        type=int,
        default=defaults.max_concurrent,
        help="builds run at once; the rest queue FIFO (default %(default)s)",
    )
    serve.add_argument(
        "--builder",
        choices=["auto", "buildkit", "legacy"],
        default=defaults.builder,
        help="builder for builds that do not ask for one; auto = BuildKit when the engine "
        "supports it, else legacy (default %(default)s)",
    )
    serve.add_argument(
        "--max-context-bytes",
        type=int,
        default=defaults.max_context_bytes,
        help="largest accepted build context upload (default %(default)s)",
    )
    serve.add_argument(
        "--max-context-unpacked-bytes",
        type=int,
        default=defaults.max_context_unpacked_bytes,
        help="largest size a context may unpack to (default %(default)s)",
    )
    serve.add_argument(
        "--max-context-entries",
        type=int,
        default=defaults.max_context_entries,
        help="most entries a context tar may hold (default %(default)s)",
    )
    serve.add_argument(
        "--upload-idle-timeout",
        type=float,
        default=defaults.upload_idle_timeout,
        help="drop an upload that sends nothing for this many seconds (default %(default)s)",
    )
    serve.add_argument(
        "--upload-timeout",
        type=_duration,
        default=defaults.upload_timeout,
        help="drop an upload that takes longer than this in all (default 1h)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        help="drop a connection that has not sent a whole request head within this many seconds (default %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections in all; beyond, a fast 503 (default: the descriptor limit)",
    )
    serve.add_argument(
        "--max-connections-per-client",
        type=int,
        default=defaults.max_connections_per_client,
        help="open connections per client address, 0 for no cap (default %(default)s)",
    )
    serve.add_argument(
        "--build-memory",
        type=int,
        default=defaults.build_memory,
        metavar="BYTES",
        help="memory limit of every build step container (default: none)",
    )
    serve.add_argument(
        "--build-cpus",
        type=float,
        default=defaults.build_cpus,
        help="CPU limit of every build step container (default: none)",
    )
    serve.add_argument(
        "--build-network",
        default=defaults.build_network,
        help="network mode of build step containers: bridge (default), none, host",
    )
    serve.add_argument(
        "--auth-tokens-file",
        type=Path,
        default=defaults.auth_tokens_file,
        help="'token namespace' per line (# comments); reloaded on SIGHUP (env BUILDER_AUTH_TOKENS_FILE). "
        "Also env BUILDER_AUTH_TOKENS",
    )
    serve.add_argument(
        "--metrics-token",
        default=defaults.metrics_token,
        help="a token that may read /metrics only (env BUILDER_METRICS_TOKEN)",
    )
    serve.add_argument(
        "--allow-base-image",
        action="append",
        default=[],
        metavar="PATTERN",
        help="an image every tenant may build from (fnmatch glob, repeatable); by default any "
        "image under no tenant's namespace",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow listening on a non-loopback address without any auth token"
    )
    serve.add_argument(
        "--log-format",
        choices=["json", "console", "auto"],
        default=defaults.log_format,
        help="log output; auto = json unless stdout is a terminal",
    )
    serve.add_argument("--log-level", default=defaults.log_level, help="debug, info, warning, error")
    serve.add_argument(
        "--docker-host",
        default=defaults.docker_host,
        help="Docker engine URL (default $DOCKER_HOST or the local socket)",
    )
    serve.add_argument(
        "--redis-url",
        default=defaults.redis_url,
        help="cluster mode: share builds, logs and cancels with the daemons on this Redis "
        "(redis://HOST:PORT/DB; default $BUILDER_REDIS_URL; without it, the embedded SQLite store)",
    )
    serve.add_argument(
        "--replica-id",
        default=defaults.replica_id,
        help="this daemon's stable name among the replicas (default: the host name)",
    )
    serve.add_argument(
        "--lease-ttl",
        type=float,
        default=defaults.lease_ttl,
        help="seconds without a heartbeat after which a replica counts as lost and its builds fail",
    )
    serve.add_argument(
        "--tenant-engine",
        action="append",
        default=[],
        type=_tenant_engine,
        metavar="TENANT=DOCKER_HOST",
        help="run this tenant's builds on an engine of its own (repeatable)",
    )
    serve.add_argument(
        "--cancel-wait",
        type=float,
        default=defaults.cancel_wait,
        help="seconds DELETE waits for teardown before answering 202 (default %(default)s)",
    )
    serve.add_argument(
        "--build-timeout",
        type=_duration,
        default=defaults.build_timeout,
        help="a build running longer is torn down and fails; requests may ask for less (default 1h)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="builds allowed to wait; beyond, POST answers 429 (default %(default)s)",
    )
    serve.add_argument(
        "--max-queue-per-tenant",
        type=int,
        default=defaults.max_queue_per_tenant,
        help="builds of one tenant allowed to wait (default %(default)s)",
    )
    serve.add_argument(
        "--max-spool-bytes-per-tenant",
        type=int,
        default=defaults.max_spool_bytes_per_tenant,
        help="bytes of one tenant's contexts waiting on disk (default %(default)s)",
    )
    serve.add_argument(
        "--max-uploads-per-tenant",
        type=int,
        default=defaults.max_uploads_per_tenant,
        help="uploads of one tenant arriving at once (default %(default)s)",
    )
    serve.add_argument(
        "--max-followers-per-tenant",
        type=int,
        default=defaults.max_followers_per_tenant,
        help="log streams one tenant may hold open (default %(default)s)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace,
        help="on SIGTERM, seconds running builds get to finish before teardown (default %(default)s)",
    )
    serve.add_argument(
        "--registry",
        default=defaults.registry,
        metavar="HOST[:PORT]",
        help="push every built image there (password: env BUILDER_REGISTRY_PASSWORD)",
    )
    serve.add_argument("--registry-username", default=defaults.registry_username)
    serve.add_argument(
        "--registry-config",
        type=Path,
        default=defaults.registry_config,
        metavar="PATH",
        help="Docker config.json whose `auths` log builds in to the registries they pull "
        "from (FROM); reloaded on SIGHUP",
    )
    serve.add_argument(
        "--tenant-registry-config",
        action="append",
        default=[],
        type=_tenant_registry_config,
        metavar="TENANT=PATH",
        help="a tenant's own config.json, over --registry-config for its builds (repeatable)",
    )
    serve.add_argument(
        "--keep-local",
        action=argparse.BooleanOptionalAction,
        default=defaults.keep_local,
        help="keep the local image after pushing it (default: keep)",
    )
    serve.add_argument(
        "--nydusify",
        default=defaults.nydusify,
        help="nydus conversion tool, used when found (default: nydusify on PATH)",
    )
    serve.add_argument(
        "--max-log-line",
        type=int,
        default=defaults.max_log_line,
        help="longest output line kept whole; longer ones come in pieces (default %(default)s)",
    )
    serve.add_argument(
        "--max-log-bytes",
        type=int,
        default=defaults.max_log_bytes,
        help="most output a build's log keeps; past it the build goes on (default %(default)s)",
    )
    serve.add_argument(
        "--retention",
        type=_duration,
        default=defaults.retention,
        help="keep finished builds and their logs this long: seconds, or 90m, 12h, 7d (default 7d)",
    )
    serve.add_argument(
        "--max-builds",
        type=int,
        default=defaults.max_builds,
        help="keep at most this many finished builds per tenant (default %(default)s)",
    )


def _tenant_engine(text: str) -> tuple[str, str]:
    tenant, sep, host = text.partition("=")
    if not sep or not tenant or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not TENANT=DOCKER_HOST")
    return tenant, host


def _tenant_registry_config(text: str) -> tuple[str, Path]:
    tenant, sep, path = text.partition("=")
    if not sep or not tenant or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not TENANT=PATH")
    return tenant, Path(path)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 7d)") from None


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import gc

    from builder.observability import configure_logging
    from builder.server.app import open_access_refusal, registry_logins, serve
    from builder.server.config import Settings

    if args.max_concurrent < 1:
        print("builder serve: --max-concurrent must be at least 1", file=sys.stderr)
        return 2
    if args.builder == "buildkit" and (args.build_memory or args.build_cpus):
        print(
            "builder serve: BuildKit through the Engine API cannot enforce --build-memory/--build-cpus; "
            "use --builder legacy (or auto, which picks it)",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        max_concurrent=args.max_concurrent,
        builder=args.builder,
        max_context_bytes=args.max_context_bytes,
        max_context_unpacked_bytes=args.max_context_unpacked_bytes,
        max_context_entries=args.max_context_entries,
        upload_idle_timeout=args.upload_idle_timeout,
        upload_timeout=args.upload_timeout,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        build_memory=args.build_memory,
        build_cpus=args.build_cpus,
        build_network=args.build_network,
        docker_host=args.docker_host,
        tenant_engines=tuple(args.tenant_engine),
        redis_url=args.redis_url,
        replica_id=args.replica_id,
        lease_ttl=args.lease_ttl,
        log_format=args.log_format,
        auth_tokens_file=args.auth_tokens_file,
        insecure=args.insecure,
        allow_base_images=tuple(args.allow_base_image),
        metrics_token=args.metrics_token,
        log_level=args.log_level,
        cancel_wait=args.cancel_wait,
        shutdown_grace=args.shutdown_grace,
        build_timeout=args.build_timeout,
        max_queue=args.max_queue,
        max_queue_per_tenant=args.max_queue_per_tenant,
        max_spool_bytes_per_tenant=args.max_spool_bytes_per_tenant,
        max_uploads_per_tenant=args.max_uploads_per_tenant,
        max_followers_per_tenant=args.max_followers_per_tenant,
        registry=args.registry,
        registry_username=args.registry_username,
        registry_config=args.registry_config,
        tenant_registry_configs=tuple(args.tenant_registry_config),
        keep_local=args.keep_local,
        nydusify=args.nydusify,
        retention=args.retention,
        max_log_line=args.max_log_line,
        max_log_bytes=args.max_log_bytes,
        max_builds=args.max_builds,
    )
    configure_logging(settings.log_format, settings.log_level)
    try:
        refusal = open_access_refusal(settings)
    except (OSError, ValueError) as exc:
        print(f"builder serve: cannot read the auth tokens: {exc}", file=sys.stderr)
        return 2
    if refusal:
        print(f"builder serve: {refusal}", file=sys.stderr)
        return 2
    try:
        registry_logins(settings)
    except (OSError, ValueError) as exc:
        print(f"builder serve: cannot read the registry logins: {exc}", file=sys.stderr)
        return 2
    # A chatty build allocates objects by the million; collecting the young generation
    # every 700 allocations cost a third of the daemon's CPU (py-spy), so collect less often.
    # But not the middle one: 20 young collections of 50,000 made one of a million objects,
    # a 180-240 ms pause of the event loop with thousands of followers.
    gc.set_threshold(20_000, 5, 20)
    # What start-up made lives as long as the daemon: full collections need not walk it.
    gc.freeze()
    asyncio.run(serve(settings))
    return 0


def _client_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    build = sub.add_parser("build", help="build a context directory (or an existing image) on the daemon")
    build.add_argument("path", nargs="?", default=".", help="context directory (default: .)")
    build.add_argument("-t", "--tag", help="image name, NAME[:TAG]")
    build.add_argument("-f", "--file", default="Dockerfile", help="Dockerfile path inside the context")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="build argument")
    build.add_argument("--target", help="build stage to stop at")
    build.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="id=ID[,src=FILE|,env=VAR]",
        help="a build secret (RUN --mount=type=secret,id=ID), from a file or an environment "
        "variable, as with docker build (repeatable)",
    )
    build.add_argument("--no-cache", action="store_true", help="do not use the build cache")
    build.add_argument(
        "--compress",
        choices=["auto", "zstd", "gzip", "none"],
        default="auto",
        help="context compression; auto = zstd if the daemon takes it, else gzip (default auto)",
    )
    build.add_argument("--image", metavar="REF", help="build `FROM REF` instead of a context")
    build.add_argument("--detach", action="store_true", help="print the build id once accepted and exit")
    build.add_argument("-q", "--quiet", action="store_true", help="print only the image reference")
    build.add_argument("--json", action="store_true", help="print the result as JSON (log goes to stderr)")

    logs = sub.add_parser("logs", help="print a build's log")
    logs.add_argument("build_id")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the build ends")
    logs.add_argument("--after", type=int, default=0, metavar="N", help="start after event N")

    for name, text in (("status", "show a build's status"), ("cancel", "cancel a build")):
        sub.add_parser(name, help=text).add_argument("build_id")

    ls = sub.add_parser("ls", help="list builds, newest first")
    ls.add_argument("--status", help="only builds with this status")
    ls.add_argument("--limit", type=int, default=50)


def _global_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("BUILDER_URL"),
        help="daemon URL (env BUILDER_URL, default http://127.0.0.1:8080)",
    )
    parser.add_argument("--token", default=os.environ.get("BUILDER_TOKEN"), help="bearer token (env BUILDER_TOKEN)")


def _named_command(argv: list[str]) -> str | None:
    """The command argv names, found without the full parser (which would act on --help)."""
    words = argparse.ArgumentParser(add_help=False)
    _global_arguments(words)
    words.add_argument("command", nargs="?")
    command: str | None = words.parse_known_args(argv)[0].command
    return command


def _without_tls(url: str | None) -> None:
    """Make `ssl` unimportable when the daemon is reached over plain HTTP.

    aiohttp builds two TLS contexts when imported, reading the system's CA bundle twice:
    about 40 ms, a fifth of a `builder build`'s start-up, for a connection that has no TLS.
    asyncio and aiohttp both run without the module.
    """
    if not (url or "").lower().startswith("https:") and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _named_command(argv)
    parser = argparse.ArgumentParser(prog="builder", description="Remote container image builder")
    _global_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the build daemon in the foreground")
    if command == "serve":  # its defaults come from the daemon's Settings: only load those when needed
        _serve_arguments(serve)
    _client_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    _without_tls(args.url)
    from builder.terminal import run

    return run(args)
