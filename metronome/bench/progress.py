"""A rich progress bar over the sweep's measured requests (a SweepObserver)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from metronome.bench.metrics import RequestResult
from metronome.bench.runner import Target


class SweepProgress:
    """Shows requests done of planned, the current target/concurrency/round and the error count."""

    def __init__(self, planned: int, rounds: int, console: Console, enabled: bool = True) -> None:
        self._rounds = rounds
        self._errors = 0
        self._where = ""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("starting", total=planned)

    def __enter__(self) -> SweepProgress:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._progress.stop()

    def _describe(self) -> None:
        errors = f", {self._errors} error(s)" if self._errors else ""
        self._progress.update(self._task, description=f"{self._where}{errors}")

    def measurement_started(self, target: Target, concurrency: int, round_index: int) -> None:
        self._where = f"{target.name} c={concurrency} round {round_index + 1}/{self._rounds}"
        self._describe()

    def request_done(self, target: Target, result: RequestResult) -> None:
        if not result.ok:
            self._errors += 1
        self._describe()
        self._progress.advance(self._task)
