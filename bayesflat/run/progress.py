"""Progress of a run: one bar for all chains, or a line every 10% when stderr is not a terminal.

Every executor reports through the same :class:`Progress`: chains running in other processes
send their updates to the coordinating process, which renders them.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Steps, draws and the running potential of every chain of a run.

    On a terminal, one tqdm bar over the steps of all chains, with the draws kept (fewest and
    most over the chains) and the mean running potential as postfix. Elsewhere (a log file, a
    pipe, CI), one line each time another 10% of the steps is done, so logs stay short.

    Parameters
    ----------
    chains : sequence of int
        The chains this run will advance.
    planned : int
        Steps each chain takes.
    draws : int
        Draws each chain keeps.
    start : mapping of int to (steps, kept), optional
        Where resumed chains begin.
    enabled : bool
        False draws nothing.
    stream : text stream, default sys.stderr
    """

    def __init__(
        self,
        chains: list[int],
        planned: int,
        draws: int,
        *,
        start: dict[int, tuple[int, int]] | None = None,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.planned, self.draws = planned, draws
        start = start or {}
        self.steps = {c: min(start.get(c, (0, 0))[0], planned) for c in chains}
        self.kept = {c: start.get(c, (0, 0))[1] for c in chains}
        self.potential: dict[int, float] = {}
        self.total = planned * len(chains)
        self._t0 = time.monotonic()
        self._done0 = sum(self.steps.values())
        self._next_line = 0.1
        self._bar: Any = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and self._tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total, initial=self._done0, unit="step", file=self.stream,
                desc=f"{len(chains)} chain{'s' if len(chains) != 1 else ''}", leave=True,
            )  # fmt: skip

    def update(self, chain: int, step: int, planned: int, kept: int, potential: float) -> None:
        """Record where ``chain`` is (called by the chains, about every 1% of their steps)."""
        if not self.enabled or chain not in self.steps:
            return
        self.steps[chain] = min(step, self.planned)
        self.kept[chain] = kept
        if math.isfinite(potential):
            self.potential[chain] = potential
        done = sum(self.steps.values())
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(done - self._bar.n)
        elif self.total and done / self.total >= self._next_line - 1e-12:
            while done / self.total >= self._next_line - 1e-12:
                self._next_line += 0.1
            self._line(done)

    def _postfix(self) -> str:
        kept = list(self.kept.values())
        draws = f"{min(kept)}" if min(kept) == max(kept) else f"{min(kept)}-{max(kept)}"
        text = f"draws {draws}/{self.draws}"
        if self.potential:
            mean = sum(self.potential.values()) / len(self.potential)
            text += f", potential {mean:.4g}"
        return text

    def _line(self, done: int) -> None:
        elapsed = time.monotonic() - self._t0
        rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else math.nan
        eta = f", ~{left:.0f} s left" if math.isfinite(left) and done < self.total else ""
        percent = 100.0 * done / self.total
        print(
            f"bayesflat: {percent:3.0f}% ({done}/{self.total} steps), {self._postfix()}, "
            f"{elapsed:.0f} s{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Finish the bar (terminal) or nothing more (log)."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(sum(self.steps.values()) - self._bar.n)
            self._bar.close()
            self._bar = None
