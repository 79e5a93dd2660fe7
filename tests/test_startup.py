"""What a command that reads no distributed checkpoint imports (issue 25: start-up time)."""

import subprocess
import sys

from farcast_cli import __version__


def test_the_cli_does_not_import_torchs_distributed_checkpoint_package_until_a_dcp_run_is_read() -> None:
    probe = "import sys, farcast_cli.cli; print('torch.distributed.checkpoint' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_the_cli_ends_without_teardown_yet_runs_exit_handlers_and_flushes_its_output(tmp_path) -> None:
    probe = (
        "import atexit, sys; from farcast_cli.__main__ import main; "
        "atexit.register(lambda: print('exit handler ran')); sys.argv = ['farcast', '--version']; main()"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.splitlines() == [f"farcast {__version__}", "exit handler ran"]
    failed = subprocess.run([sys.executable, "-m", "farcast_cli", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert failed.returncode == 3 and failed.stderr.startswith("farcast: error:")
