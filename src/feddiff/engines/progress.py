"""Progress display: a live rich bar on a terminal, one plain line per round elsewhere (CI, logs)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RoundProgress:
    def __init__(self, mode: str, num_rounds: int, start_round: int = 0):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.console = Console(highlight=False, soft_wrap=True)  # a log line stays one line
        self.num_rounds = num_rounds
        self._bar: Progress | None = None
        self._status: dict[str, str] = {}  # loss, last metric, bytes sent so far (kept between rounds)
        self._round = start_round
        if mode == "bar":
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._bar.start()
            self._rounds = self._bar.add_task("rounds", total=num_rounds, completed=start_round)
            self._steps = self._bar.add_task("steps", total=1, visible=False)

    def start_round(self, rnd: int, clients: list[int], total_steps: int) -> None:
        if self._bar:
            self._round = rnd
            self._bar.update(self._rounds, description=self._describe(rnd))
            self._bar.reset(self._steps, total=total_steps, visible=True,
                            description=f"  {len(clients)} clients, local steps")

    def start_client(self, client: int, index: int, count: int) -> None:
        if self._bar:
            self._bar.update(self._steps, description=f"  client {client} ({index + 1}/{count}), local steps")

    def client_done(self, client: int, loss: float) -> None:
        if self._bar:
            self._bar.update(self._rounds, description=self._describe(self._round, f"client {client} loss {loss:.4f}"))

    def step(self) -> None:
        if self._bar:
            self._bar.advance(self._steps)

    def message(self, text: str) -> None:
        if self.mode != "none":
            self.console.print(text)

    def end_round(self, rnd: int, line: str, status: dict[str, str] | None = None) -> None:
        """Print the round's line; the bar keeps the newest loss, metric (until the next evaluation) and bytes."""
        self._status.update(status or {})
        if self._bar:
            self._bar.advance(self._rounds)
            self._bar.update(self._rounds, description=self._describe(rnd))
            self._bar.console.print(line)
        elif self.mode == "lines":
            self.console.print(line)

    def _describe(self, rnd: int, current: str = "") -> str:
        """``round r/N``, then the last round's loss, the newest metric and the bytes sent so far."""
        parts = [f"round {rnd + 1}/{self.num_rounds}", current]
        parts += [self._status[k] for k in ("loss", "metric", "sent") if k in self._status]
        return "  ".join(p for p in parts if p)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
