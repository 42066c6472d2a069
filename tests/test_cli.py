"""The `builder` CLI as a real subprocess against the real daemon: Ctrl+C, `| head`, output modes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient

from builder.terminal import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from tests.conftest import dockerfile, plain_output, wait_for
from tests.steps import processes_running, unique_sleep, wait_for_process

CLI = [sys.executable, "-m", "builder"]


def context(tmp_path: Path, *steps: str) -> Path:
    """A context directory beside (not around) the daemon's data dir."""
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile(*steps))
    return root


async def run_cli(client: TestClient, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "--url",
        str(client.make_url("/")),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def _only_build(client: TestClient) -> dict:
    [build] = (await (await client.get("/builds")).json())["builds"]
    return build


async def _interrupt_after_start(client: TestClient, tmp_path: Path, signals: int) -> tuple[int, str]:
    """Ctrl+C (`signals` times) once the build's step runs; the CLI's exit code and stderr, after
    checking the step's process is gone."""
    sleep = unique_sleep()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "--url",
        str(client.make_url("/")),
        "build",
        "--no-cache",
        str(context(tmp_path, f"RUN echo started && {sleep}")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    async with asyncio.timeout(30):
        # `#5 0.152 started`: BuildKit's plain style.
        while not (await proc.stdout.readline()).decode().rstrip().endswith(" started"):
            pass
    await wait_for_process(sleep)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
    stderr = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
    code = await proc.wait()
    assert processes_running(sleep) == []
    return code, stderr


async def test_ctrl_c_cancels_the_remote_build(client: TestClient, tmp_path: Path) -> None:
    code, stderr = await _interrupt_after_start(client, tmp_path, signals=1)
    build = await _only_build(client)
    assert code == EXIT_INTERRUPTED
    assert f"cancelling build {build['build_id']}…" in stderr
    assert build["status"] == "cancelled"


async def test_second_ctrl_c_does_not_abort_the_cancel(client: TestClient, tmp_path: Path) -> None:
    code, _ = await _interrupt_after_start(client, tmp_path, signals=2)
    assert code == EXIT_INTERRUPTED
    assert (await _only_build(client))["status"] == "cancelled"


async def test_broken_pipe_exits_141_and_cancels(client: TestClient, tmp_path: Path) -> None:
    sleep = unique_sleep()
    ctx = context(tmp_path, f"RUN seq 1 100000 && {sleep}")
    url = str(client.make_url("/"))
    cli = " ".join(CLI)
    shell = f'{cli} --url {url} build --no-cache {ctx} | head -n 3; echo "status=${{PIPESTATUS[0]}}" >&2'
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", shell, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert len(out.decode().splitlines()) == 3
    assert f"status={EXIT_BROKEN_PIPE}" in err.decode()
    assert "Traceback" not in err.decode()
    build = await _only_build(client)
    assert build["status"] == "cancelled"
    assert processes_running(sleep) == []


async def test_quiet_prints_only_the_reference(client: TestClient, tmp_path: Path) -> None:
    code, out, _ = await run_cli(client, "build", "-q", "-t", "cli-test/quiet:v1", str(context(tmp_path, "RUN true")))
    assert (code, out) == (0, "cli-test/quiet:v1\n")


async def test_build_prints_log_and_upload_progress_when_not_a_tty(client: TestClient, tmp_path: Path) -> None:
    code, out, err = await run_cli(
        client,
        "build",
        "--no-cache",
        "-t",
        "cli-test/loud",
        "--build-arg",
        "WHO=cli",
        str(context(tmp_path, "ARG WHO", "RUN echo hello-$WHO")),
    )
    assert code == 0, err
    assert "hello-cli" in plain_output(out)
    assert any(line.startswith("uploaded context: ") for line in err.splitlines())
    assert "built cli-test/loud:latest" in err


async def test_compress_option_reaches_the_upload(client: TestClient, tmp_path: Path) -> None:
    code, out, err = await run_cli(
        client, "build", "-q", "--compress", "none", "-t", "cli-test/plain:v1", str(context(tmp_path, "RUN true"))
    )
    assert (code, out) == (0, "cli-test/plain:v1\n"), err
    code, _, err = await run_cli(client, "build", "--compress", "brotli", str(tmp_path / "ctx"))
    assert code == 2 and "--compress" in err


async def test_failed_build_exits_1_with_message(client: TestClient, tmp_path: Path) -> None:
    code, _, err = await run_cli(client, "build", "--no-cache", str(context(tmp_path, "RUN exit 5")))
    assert code == 1
    assert "exit code: 5" in err


async def test_detach_json_status_logs_and_ls(client: TestClient, tmp_path: Path, base_image: str) -> None:
    code, out, _ = await run_cli(client, "build", "--detach", "--image", base_image, "-t", "cli-test/detached")
    build_id = out.strip()
    assert code == 0 and len(build_id) >= 22
    await wait_for(client, build_id, {"succeeded"})
    code, out, _ = await run_cli(client, "status", build_id)
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, out, err = await run_cli(client, "logs", build_id)
    # BuildKit's plain style: `#1 [internal] load remote build context`, … `#N [1/1] FROM …`, `#N DONE 0.0s`.
    assert code == 0 and out.startswith("#1 ") and "--- succeeded" in err
    assert re.search(rf"^#\d+ \[1/1\] FROM .*{re.escape(base_image)}$", out, re.M), out
    code, out, _ = await run_cli(client, "ls")
    assert code == 0 and build_id in out and "succeeded" in out
    code, out, _ = await run_cli(client, "build", "--json", "--image", base_image, "-t", "cli-test/json")
    assert code == 0 and json.loads(out)["image_ref"] == "cli-test/json:latest"


async def test_errors_map_to_exit_codes(client: TestClient, tmp_path: Path) -> None:
    code, _, err = await run_cli(client, "build", str(tmp_path / "data"))  # no Dockerfile
    assert code == 2 and "Dockerfile" in err
    code, _, err = await run_cli(client, "status", "no-such-build")
    assert code == 3 and "404" in err
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--url", "http://127.0.0.1:9", "ls", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err_bytes = await proc.communicate()
    assert proc.returncode == 3 and b"cannot reach" in err_bytes
    proc = await asyncio.create_subprocess_exec(
        *CLI, "build", "--bogus-flag", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    assert proc.returncode == 2


async def test_client_commands_load_neither_the_daemon_nor_tls_over_http() -> None:
    probe = (
        "import sys; from builder.cli import main; code = main(['--url', 'http://127.0.0.1:9', 'ls']); "
        "print(code, sorted(m for m in sys.modules if m.startswith('builder.server')), sys.modules['ssl'])"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out.decode().split() == ["3", "[]", "None"]
