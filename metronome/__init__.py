"""metronome: compiler-first, deterministic LLM inference in Python."""

__version__ = "0.1.0"
