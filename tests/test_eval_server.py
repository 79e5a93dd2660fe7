"""--eval-server end to end: a real server script as a subprocess, and one that dies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from farcast_cli.errors import UsageError
from farcast_cli.evaluate.evaluator import EvalServer

SERVER = "import sys\nfor line in sys.stdin:\n    print(f'loss {len(line.strip())}.5', flush=True)\n"
DYING = "import sys\nsys.stdin.readline()\nsys.exit('broken model')\n"


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "server.py"
    path.write_text(text)
    return f"{sys.executable} {path}"


def test_server_answers_each_path_from_one_process(tmp_path: Path) -> None:
    server = EvalServer(_script(tmp_path, SERVER))
    try:
        assert server(Path("abc")) == 3.5
        assert server(Path("abcdef")) == 6.5
        assert len(server.running) == 1
    finally:
        server.stop()
    assert all(s.process.poll() is not None for s in [*server.idle])


def test_a_server_that_dies_names_the_command_and_checkpoint(tmp_path: Path) -> None:
    command = _script(tmp_path, DYING)
    server = EvalServer(command)
    with pytest.raises(UsageError, match="broken model") as failure:
        server(Path("checkpoint-7"))
    assert command in str(failure.value) and "checkpoint-7" in str(failure.value)
    server.stop()
