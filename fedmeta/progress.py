"""Console output: status lines, one record per round, and a live progress bar with ETA (rich).

Everything goes to stderr (stdout keeps the command's result). Lines never wrap
(``soft_wrap``): piped into a file, each round is one line that ``grep`` finds
whole. On a terminal a rich progress bar with the ETA stays below the round
lines; elsewhere (a pipe, a CI log) every round line carries the ETA itself.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def console() -> Console:
    """The stderr console every fedmeta command prints through: no wrapping, no guessed highlighting."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def status(message: str, out: Console | None = None) -> None:
    """One line saying what the command is doing now (``fedmeta: building the population ...``)."""
    (out or console()).print(f"[dim]fedmeta:[/dim] {message}")


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _acc_or_loss(r: dict[str, Any], prefix: str) -> str:
    acc = r.get(f"{prefix}acc_after")
    return "acc" if acc is not None and isinstance(acc, float) and math.isfinite(acc) else "loss"


def format_round(r: dict[str, Any], total_rounds: int, chance: float | None = None) -> str:
    """One round's record as one console line (rich markup)."""
    if r.get("stopped"):
        line = f"[bold yellow]stopped early after round {r.get('stopped_at_round', r['round'] - 1)}/{total_rounds}[/bold yellow]: {r['stopped']}"
        if "heldout_acc_after" in r or "heldout_loss_after" in r:
            key = _acc_or_loss(r, "heldout_")
            line += f" | final held-out {key} {_f(r.get(f'heldout_{key}_before'))} -> [green]{_f(r.get(f'heldout_{key}_after'))}[/green]"
        return line
    parts = [f"[bold]round {r['round']:>4}/{total_rounds}[/bold]"]
    private = "epsilon" in r and "clients" not in r  # a private run writes no statistic of its training cohort
    if not private:
        parts.append(f"replies {r.get('replies', 0)}/{r.get('clients', 0)}")
    if r.get("failures") or r.get("rejected"):
        parts.append(f"[red]failed {r.get('failures', 0)} rejected {r.get('rejected', 0)}[/red]")
    if not private:
        parts.append(f"loss {_f(r.get('train_loss'))}")
    if "acc_after" in r or "loss_after" in r:
        key = _acc_or_loss(r, "")
        parts.append(f"{key} {_f(r.get(f'{key}_before'))} -> {_f(r.get(f'{key}_after'))}")
    if "heldout_acc_after" in r or "heldout_loss_after" in r:
        key = _acc_or_loss(r, "heldout_")
        parts.append(f"held-out {key} {_f(r.get(f'heldout_{key}_before'))} -> [green]{_f(r.get(f'heldout_{key}_after'))}[/green]")
        if key == "acc" and chance:
            parts.append(f"chance {chance:.3f}")
    if "epsilon" in r:
        parts.append(f"ε {_f(r['epsilon'], '.2f')} (δ={r.get('delta')})")
    if "noise" in r:  # privacy.reproducible_noise = true
        parts.append("[red]NOT private against anyone holding config.json[/red]")
    if r.get("skipped"):
        parts.append("[yellow]skipped[/yellow]")
    return " | ".join(parts)


class RoundProgress:
    """The ``progress`` callback of :func:`fedmeta.federation.run_federation`: a line per round, a bar with ETA.

    ``close()`` removes the live bar (the round lines stay); callers call it when the run ends, however it ends.
    """

    def __init__(self, total_rounds: int, out: Console | None = None, chance: float | None = None) -> None:
        self.total = total_rounds
        self.console = out or console()
        self.chance = chance
        self.started = time.monotonic()
        self.first_round: int | None = None
        self.bar: Progress | None = None
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.task = self.bar.add_task("rounds", total=total_rounds)

    def eta(self, done_round: int) -> float | None:
        if self.first_round is None or done_round < self.first_round:
            return None
        per_round = (time.monotonic() - self.started) / (done_round - self.first_round + 1)
        return per_round * (self.total - done_round)

    def __call__(self, r: dict[str, Any]) -> None:
        if self.first_round is None:
            self.first_round = r["round"]
            if self.bar is not None:
                self.bar.update(self.task, completed=r["round"] - 1)
                self.bar.start()
        line = format_round(r, self.total, self.chance)
        if r.get("stopped"):
            self.close()
        elif self.bar is None:
            eta = self.eta(r["round"])
            if eta is not None and r["round"] < self.total:
                line += f" | eta {_duration(eta)}"
        self.console.print(line)
        if self.bar is not None and not r.get("stopped"):
            self.bar.update(self.task, completed=r["round"])
            if r["round"] >= self.total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def round_printer(total_rounds: int, out: Console | None = None, chance: float | None = None) -> Callable[[dict[str, Any]], None]:
    """A :class:`RoundProgress` (kept under this name: engines call it)."""
    return RoundProgress(total_rounds, out, chance)
