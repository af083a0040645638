"""`python -m metronome.fleet MODEL --tokens-per-s X ...`: the `metronome plan` command on its own."""

import argparse
import sys

from metronome.cli import reader_left
from metronome.fleet.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metronome.fleet", description=run.__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except BrokenPipeError:  # `| head`: quietly, as `metronome plan` ends (it was a traceback here)
        return reader_left()


if __name__ == "__main__":
    sys.exit(main())
