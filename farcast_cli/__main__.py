"""`python -m farcast_cli` and the `farcast` command: the process around cli.main. Signals are handled
from the first instant, so that one during start-up (importing torch takes a second or more) ends
farcast with the same line as later, never with a traceback; in one process it ends without the
interpreter's teardown (`_exit_without_teardown`)."""

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable

from farcast_cli.errors import INTERRUPTS, exit_on_signal


def main() -> None:
    for signum in INTERRUPTS:
        signal.signal(signum, exit_on_signal)
    from farcast_cli.cli import main as run_cli
    from farcast_cli.distributed import launched_size

    if launched_size() > 1:
        run_cli()
    else:
        _exit_without_teardown(run_cli)


def _exit_without_teardown(command: Callable[[], object]) -> None:
    """Run the command, then end the process as Python would, less the interpreter's teardown: torch and
    the modules it loads leave about 180,000 objects that a normal exit frees one by one (0.4-0.5 s on a
    2-core machine, measured; benchmarks/RESULTS.md, issue 25). The command has closed, published and
    cleaned up everything by then; the exit handlers still run and the output is flushed. Where another
    thread still runs or a flush fails, the normal exit does it all."""
    try:
        command()
        code = 0
    except SystemExit as exiting:
        code = 0 if exiting.code is None else exiting.code
    if not isinstance(code, int) or threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
