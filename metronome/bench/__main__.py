"""`python -m metronome.bench ...`: the same as `metronome bench ...`."""

from metronome.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
