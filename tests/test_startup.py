"""What a command that reads no distributed checkpoint imports (issue 25: start-up time)."""

import subprocess
import sys


def test_the_cli_does_not_import_torchs_distributed_checkpoint_package_until_a_dcp_run_is_read() -> None:
    probe = "import sys, farcast_cli.cli; print('torch.distributed.checkpoint' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
