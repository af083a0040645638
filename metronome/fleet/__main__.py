"""`python -m metronome.fleet MODEL --tokens-per-s X ...`: the `metronome plan` command on its own."""

import argparse
import sys

from metronome.args import parse_noting_given
from metronome.cli import reader_left
from metronome.fleet.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    def parser() -> argparse.ArgumentParser:
        built = argparse.ArgumentParser(prog="python -m metronome.fleet", description=run.__doc__)
        add_arguments(built)
        return built

    try:
        return run(parse_noting_given(parser, argv))
    except BrokenPipeError:  # `| head`: quietly, as `metronome plan` ends (it was a traceback here)
        return reader_left()


if __name__ == "__main__":
    sys.exit(main())
