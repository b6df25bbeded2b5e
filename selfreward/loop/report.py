"""The end-of-run summary: one column per iteration, from the run directory's completion records."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from selfreward.stages import ITERATION


def summary_table(rows: list[dict[str, Any]], sft: dict | None) -> Table:
    """Iterations as columns, so the table fits a terminal whatever the number of metrics; the rows are
    the metrics each stage declares, then each stage's seconds."""
    title = "selfreward run"
    if sft:
        title += f" (SFT: {sft.get('examples')} examples, {sft.get('seconds')} s)"
    table = Table(title=title)
    table.add_column("")
    for row in rows:
        table.add_column(f"iter {row['iteration']}", justify="right")
    for stage in ITERATION:
        for metric in stage.metrics:
            table.add_row(metric.label, *(cell(row.get(metric.name)) for row in rows))
    for stage in ITERATION:
        table.add_row(f"{stage.name} seconds", *(cell(row["seconds"].get(stage.name)) for row in rows))
    return table


def cell(value: Any) -> str:
    """A figure as the summary and the report show it (a [first, last] list as "first → last")."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return " → ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    return str(value)
