"""Fixtures that run real processes beside the tests: docker-registry, redis-server, nginx in front of
`builder serve` processes, and the second Docker Engine.  `scripts/test` installs and starts what they
need (`ensure_registry_tool`, `ensure_redis_tool`, `ensure_nginx_tool`, `ensure_second_engine` in
scripts/lib.sh); each fixture fails with the process's log when it does not come up."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import aiodocker
import aiohttp
import pytest
import redis

BASE_IMAGE = os.environ.get("BUILDER_BASE_IMAGE", "builder-busybox:latest")
# How long a started process gets to answer; only catches hangs.
STARTUP_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Poll `ready` until it holds; fail at once, with the log, if `proc` exits first."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up within {STARTUP_SECONDS}s:\n{_log_tail(log)}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


# ---------------------------------------------------------------- docker-registry


def _registry_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # it answers, and wants a login (an `auth:` section)
    except OSError:
        return False


@contextlib.contextmanager
def run_registry(root: Path, extra_config: str = "") -> Iterator[str]:
    """A real registry (Debian's docker-registry) on a free loopback port, storage and log under `root`;
    `extra_config` is appended to its YAML config (an `auth:` section, say).  Yields host:port."""
    port = free_port()
    config = root / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'registry'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra_config
    )
    binary = os.environ.get("BUILDER_REGISTRY_BIN", "/usr/bin/docker-registry")
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: _registry_answers(f"http://127.0.0.1:{port}/v2/"), proc, "docker-registry", log)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc, timeout=10)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A real registry without login, storage in a temp dir."""
    with run_registry(tmp_path) as address:
        yield address


# A registry login the tests use.
USER, PASSWORD = "builder", "correct horse"


@pytest.fixture
def login_registry(tmp_path: Path) -> Iterator[str]:
    """A real registry that wants USER / PASSWORD (htpasswd, so HTTP basic auth)."""
    import bcrypt  # here, not at the top: the oldest-versions unit run loads this plugin without it

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)) + b"\n")
    with run_registry(tmp_path, f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n") as address:
        yield address


@pytest.fixture
async def private_image(login_registry: str, docker: aiodocker.Docker) -> AsyncIterator[str]:
    """BASE_IMAGE pushed to `login_registry` with the right login, with no local tag left."""
    name = f"{login_registry}/busybox"
    await docker.images.tag(BASE_IMAGE, name, tag="latest")
    try:
        auth = {"username": USER, "password": PASSWORD, "serveraddress": login_registry}
        pushed = await docker.images.push(name, tag="latest", auth=auth)
        assert not any("error" in line for line in pushed), pushed
    finally:
        await docker.images.delete(f"{name}:latest")
    yield f"{name}:latest"


# ---------------------------------------------------------------- the second engine


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def engine_status(docker_host: str, path: str) -> int:
    """The HTTP status of GET `path` on the engine at `docker_host` (unix:// or tcp://)."""
    url = urlsplit(docker_host)
    connection = (
        _UnixHTTPConnection(url.path, timeout=5)
        if url.scheme == "unix"
        else http.client.HTTPConnection(url.netloc, timeout=5)
    )
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture(scope="session")
def second_engine() -> str:
    """DOCKER_HOST of a second engine, separate from the main one (own images, containers, cache),
    holding the base image.  `scripts/test` starts it and sets BUILDER_SECOND_DOCKER_HOST."""
    host = os.environ.get("BUILDER_SECOND_DOCKER_HOST")
    if not host:
        pytest.fail(
            "BUILDER_SECOND_DOCKER_HOST is not set: run the tests with scripts/test, which starts the "
            "second engine (ensure_second_engine in scripts/lib.sh)",
            pytrace=False,
        )
    try:
        ping = engine_status(host, "/_ping")
    except OSError as exc:
        pytest.fail(
            f"the second engine at {host} does not answer ({exc}): run scripts/test, or "
            "`source scripts/lib.sh && ensure_second_engine`",
            pytrace=False,
        )
    if ping != 200:
        pytest.fail(f"the second engine at {host} answers /_ping with {ping}", pytrace=False)
    if engine_status(host, f"/images/{quote(BASE_IMAGE, safe=':')}/json") != 200:
        pytest.fail(f"the second engine at {host} lacks {BASE_IMAGE}: run ensure_second_engine", pytrace=False)
    return host


@pytest.fixture
async def second_docker(second_engine: str) -> AsyncIterator[aiodocker.Docker]:
    """A client of the second engine."""
    async with aiodocker.Docker(url=second_engine) as d:
        yield d


# ---------------------------------------------------------------- redis-server


def redis_argv(binary: str, port: int, directory: Path, log: Path) -> list[str]:
    """redis-server on a loopback port, in the foreground, with AOF on (what the README shows)
    and no RDB snapshots; the benchmarks run it the same way."""
    return [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *("--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", str(log)),
    ]


class RedisServer:
    """redis-server on a loopback port with AOF on, its files in `directory`; restartable on the same
    port and files."""

    def __init__(self, binary: str, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self._log = directory / "redis.log"
        self._argv = redis_argv(binary, port, directory, self._log)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_until(self._pings, self.proc, "redis-server", self._log)

    def stop(self) -> None:
        """SIGTERM: Redis writes out its AOF and exits."""
        if self.proc is not None:
            _stop(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _pings(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:  # refused, or still loading its AOF
            return False
        finally:
            client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(os.environ.get("BUILDER_REDIS_BIN", "/usr/bin/redis-server"), free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- nginx

_NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$remote_addr "$request" $status upstream=$upstream_addr';
    access_log {dir}/access.log upstream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream replicas {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


def nginx_config(directory: Path, port: int, upstreams: Sequence[str]) -> str:
    """Round-robin over `upstreams` (URLs or host:port), streaming both ways (no buffering, no body size
    limit), keep-alive to the upstreams, SSE streams allowed to idle for an hour."""
    servers = "\n".join(f"        server {urlsplit(u if '//' in u else f'//{u}').netloc};" for u in upstreams)
    # As root, workers would run as `nobody` and could not reach files under the test's private tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    return _NGINX_CONF.format(user=user, dir=directory, port=port, servers=servers)


NginxProxy = Callable[[Sequence[str]], str]


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.fixture
def nginx_proxy(tmp_path: Path) -> Iterator[NginxProxy]:
    """A factory: `nginx_proxy([url1, url2])` starts nginx in front of them and gives its URL.  Its
    access log (`nginx-<port>/access.log`) names the upstream of every request."""
    binary = os.environ.get("BUILDER_NGINX_BIN", "/usr/sbin/nginx")
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstreams: Sequence[str]) -> str:
        assert upstreams, "nginx needs at least one upstream"
        port = free_port()
        directory = tmp_path / f"nginx-{port}"
        directory.mkdir()
        config = directory / "nginx.conf"
        config.write_text(nginx_config(directory, port, upstreams))
        log = directory / "error.log"
        proc = subprocess.Popen(
            [binary, "-p", str(directory), "-c", str(config), "-e", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        _wait_until(lambda: _accepts(port), proc, "nginx", log)
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for proc in procs:
            _stop(proc)  # SIGTERM: fast shutdown, open streams are cut


# ---------------------------------------------------------------- builder serve processes


class DaemonProcess:
    """A `builder serve` subprocess on a loopback port; restarts keep its port, data dir and flags.
    Its output goes to `log_path` (JSON lines, appended across restarts)."""

    def __init__(self, args: Sequence[str], *, port: int, data_dir: Path, log_path: Path) -> None:
        self.args = list(args)
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "not started"
        return self._proc

    def start(self) -> DaemonProcess:
        assert self._proc is None or self._proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "builder",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--log-format",
                    "json",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    async def ready(self) -> DaemonProcess:
        """Wait until GET /healthz answers 200; fails at once if the process exits."""
        deadline = time.monotonic() + STARTUP_SECONDS
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return self
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"builder serve exited with {self.proc.returncode}:\n{_log_tail(self.log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"builder serve not healthy within {STARTUP_SECONDS}s:\n{_log_tail(self.log_path)}"
                    )
                await asyncio.sleep(0.05)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (the daemon drains: running builds get its shutdown grace) and wait; the exit code."""
        return _stop(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> DaemonProcess:
        """SIGTERM if still running, then start again on the same port and data dir (await `ready()`)."""
        self.terminate()
        return self.start()


class StartDaemon(Protocol):
    def __call__(self, *args: str, data_dir: Path | None = None, port: int | None = None) -> DaemonProcess: ...


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[StartDaemon]:
    """A factory: `daemon_process("--docker-host", host, ...)` starts `builder serve` with those extra
    flags on a free port (data dir `daemon-<port>` under tmp_path unless given) and returns its handle,
    not yet ready: `await daemon_process(...).ready()`.  Whatever still runs at teardown is killed."""
    started: list[DaemonProcess] = []

    def start(*args: str, data_dir: Path | None = None, port: int | None = None) -> DaemonProcess:
        port = port or free_port()
        daemon = DaemonProcess(
            args, port=port, data_dir=data_dir or tmp_path / f"daemon-{port}", log_path=tmp_path / f"daemon-{port}.log"
        )
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in started:
            daemon.kill()


@pytest.fixture
def daemon(
    tmp_path: Path, request: pytest.FixtureRequest, daemon_process: StartDaemon
) -> tuple[str, subprocess.Popen[bytes]]:
    """A real `builder serve` process (extra flags via `@pytest.mark.daemon_args(...)`, where
    `{tmp_path}` is replaced), so it can be signalled or killed like in production."""
    marker = request.node.get_closest_marker("daemon_args")
    extra = [arg.format(tmp_path=tmp_path) for arg in marker.args] if marker else []
    if "builder" in request.fixturenames:
        extra += ["--builder", request.getfixturevalue("builder")]
    process = daemon_process(*extra, data_dir=tmp_path / "data")
    return process.url, process.proc
