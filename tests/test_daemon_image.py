"""dockerfiles/daemon.Dockerfile starts the daemon with auth on: with no tokens it refuses to start,
never open to the network. (The image itself is not built: its base image cannot be pulled here.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.cli import main

pytestmark = pytest.mark.unit

DOCKERFILE = Path(__file__).parent.parent / "dockerfiles" / "daemon.Dockerfile"


def _instructions() -> dict[str, str]:
    """The last of each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {keyword.upper(): rest for keyword, _, rest in (line.partition(" ") for line in lines)}


def _command() -> list[str]:
    instructions = _instructions()
    return [*json.loads(instructions["ENTRYPOINT"]), *json.loads(instructions["CMD"])]


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """`builder serve` configures logging before it checks its tokens: not in this process, where
    structlog would keep the loggers it caches bound to this test's captured (then closed) stdout."""
    monkeypatch.setattr("builder.observability.configure_logging", lambda *args, **kwargs: None)


def test_the_image_listens_on_all_addresses_with_tokens_from_a_secret_and_never_insecure() -> None:
    command = _command()
    assert command[:4] == ["builder", "serve", "--host", "0.0.0.0"]
    assert "--insecure" not in command and "--insecure" not in " ".join(_instructions().values())
    assert "BUILDER_AUTH_TOKENS_FILE=/run/secrets/builder-tokens" in _instructions()["ENV"].split()


@pytest.mark.usefixtures("restore_logging")
def test_the_image_refuses_to_start_without_its_tokens_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BUILDER_AUTH_TOKENS", raising=False)
    # The image's own file name, moved where nothing can be mounted by accident.
    monkeypatch.setenv("BUILDER_AUTH_TOKENS_FILE", str(tmp_path / "run/secrets/builder-tokens"))
    assert main(_command()[1:]) == 2
    assert "cannot read the auth tokens" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_the_image_refuses_to_start_open_when_the_file_is_unset_and_no_token_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BUILDER_AUTH_TOKENS", raising=False)
    monkeypatch.setenv("BUILDER_AUTH_TOKENS_FILE", "")
    assert main(_command()[1:]) == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in capsys.readouterr().err
