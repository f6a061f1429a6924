"""Live progress: one line per round (rich), with the numbers a user watches."""

from __future__ import annotations

import math
from typing import Any, Callable

from rich.console import Console


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def round_printer(total_rounds: int, console: Console | None = None) -> Callable[[dict[str, Any]], None]:
    console = console or Console(stderr=True, highlight=False)

    def show(r: dict[str, Any]) -> None:
        parts = [f"[bold]round {r['round']:>4}/{total_rounds}[/bold]"]
        private = "epsilon" in r and "clients" not in r  # a private run writes no statistic of its training cohort
        if not private:
            parts.append(f"replies {r.get('replies', 0)}/{r.get('clients', 0)}")
        if r.get("failures") or r.get("rejected"):
            parts.append(f"[red]failed {r.get('failures', 0)} rejected {r.get('rejected', 0)}[/red]")
        if not private:
            parts.append(f"loss {_f(r.get('train_loss'))}")
        if "acc_after" in r or "loss_after" in r:
            key = "acc" if r.get("acc_after") is not None and math.isfinite(r.get("acc_after", float("nan"))) else "loss"
            parts.append(f"{key} {_f(r.get(f'{key}_before'))} -> {_f(r.get(f'{key}_after'))}")
        if f"heldout_acc_after" in r or "heldout_loss_after" in r:
            key = "acc" if r.get("heldout_acc_after") is not None and math.isfinite(r.get("heldout_acc_after", float("nan"))) else "loss"
            parts.append(f"held-out {key} {_f(r.get(f'heldout_{key}_before'))} -> [green]{_f(r.get(f'heldout_{key}_after'))}[/green]")
        if "epsilon" in r:
            parts.append(f"ε {_f(r['epsilon'], '.2f')} (δ={r.get('delta')})")
        if "noise" in r:  # privacy.reproducible_noise = true
            parts.append("[red]NOT private against anyone holding config.json[/red]")
        if r.get("skipped"):
            parts.append("[yellow]skipped[/yellow]")
        console.print(" | ".join(parts))

    return show
