"""`python -m align_diffusion …` (and `accelerate launch -m align_diffusion …`) runs the console script, which
starts here: a Ctrl-C while torch and diffusers are still being imported ends with a line, not a traceback (the
command itself handles one once it runs)."""

import signal
import sys


def main() -> None:
    try:
        from align_diffusion.cli import main as run_command

        run_command(sys.argv[1:])
    except KeyboardInterrupt:  # a running command turns its own into SystemExit
        print("align-diffusion: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
