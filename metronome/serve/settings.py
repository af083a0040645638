"""The server's own settings (`metronome serve`'s flags beside the engine's): a record with no imports, so
that the command line can name their defaults without loading the web framework."""

from __future__ import annotations

from dataclasses import dataclass

from metronome.config import check_fields, is_integer, is_number, is_text


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
        # kinds first, then ranges: a max_choices of 0 refused every request as the client's fault ("n"), and a
        # max_body_bytes of 0 answered every one 413
        check_fields(
            self,
            [
                ("api_key", is_text(self.api_key, optional=True), "must be a non-empty key (or None: no key)"),
                ("max_body_bytes", is_integer(self.max_body_bytes), "must be an integer"),
                ("retry_after_s", is_integer(self.retry_after_s), "must be an integer number of seconds"),
                ("model_alias", is_text(self.model_alias), "must name the model (a non-empty string)"),
                ("max_choices", is_integer(self.max_choices), "must be an integer"),
                (
                    "allowed_hosts",
                    self.allowed_hosts is None
                    or (isinstance(self.allowed_hosts, frozenset) and all(is_text(h) for h in self.allowed_hosts)),
                    "must be a frozenset of host names (or None: any)",
                ),
                ("stalled_after_s", is_number(self.stalled_after_s), "must be a finite number of seconds"),
            ],
        )
        check_fields(
            self,
            [
                ("max_body_bytes", self.max_body_bytes >= 1, "must be a positive number of bytes"),
                ("retry_after_s", self.retry_after_s >= 0, "must be 0 or more seconds"),
                ("max_choices", self.max_choices >= 1, "must let a request start at least 1 generation"),
                ("stalled_after_s", self.stalled_after_s > 0, "must be a positive number of seconds"),
            ],
        )
