"""`python -m metronome.fleet MODEL --tokens-per-s X ...`: the `metronome plan` command on its own."""

import argparse
import sys

from metronome.fleet.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metronome.fleet", description=run.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
