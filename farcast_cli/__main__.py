"""`python -m farcast_cli` and the `farcast` command. Signals are handled from the first instant, so that
one during start-up (importing torch takes a second or more) ends farcast with the same line as later,
never with a traceback."""

import signal

from farcast_cli.errors import INTERRUPTS, exit_on_signal


def main() -> None:
    for signum in INTERRUPTS:
        signal.signal(signum, exit_on_signal)
    from farcast_cli.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
