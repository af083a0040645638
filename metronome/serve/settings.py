"""The server's own settings (`metronome serve`'s flags beside the engine's): a record with no imports, so
that the command line can name their defaults without loading the web framework."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # when set, every endpoint but /health and the page needs "Bearer <key>"
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    retry_after_s: int = 1  # Retry-After of a 429 (queue full) or 503 (loading)
    model_alias: str = "metronome"  # accepted as the model name besides the served model's own id
    max_choices: int = 64  # prompts x n engine requests one API request may start
    # Host header names a request may carry (a bound loopback address: its own names), None: any. A web page
    # that rebinds its name to 127.0.0.1 sends its own name, and would read the answers
    allowed_hosts: frozenset[str] | None = None
    # /health answers 503 "engine_stalled" while one engine step has run this long. A step runs a bounded prompt
    # chunk (milliseconds to about a second); a tensor-parallel rank that stopped answering held every step
    # for the group's 30-s timeout while /health said ok, and a load balancer kept sending requests
    stalled_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.stalled_after_s > 0:
            raise ValueError(f"stalled_after_s={self.stalled_after_s}: must be a positive number of seconds")
