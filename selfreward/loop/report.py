"""The end-of-run summary: one column per iteration, from the run directory's completion records."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from selfreward.stages import ITERATION, Stage


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
    for label, values in metric_rows(rows) + seconds_rows(rows):
        table.add_row(label, *map(cell, values))
    return table


def metric_rows(rows: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(label, one value per iteration) of every metric the stages declare, from the iterations' metrics;
    a switch's figure (`optional`) only where some iteration has it."""
    found = []
    for stage in ITERATION:
        for metric in stage.metrics:
            values = [row.get(metric.name) for row in rows]
            if not (metric.optional and all(value is None for value in values)):
                found.append((metric.label, values))
    return found


def seconds_rows(rows: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(f"{stage} seconds", one value per iteration); a stage some recipes leave off only where it ran."""
    found = []
    for stage in ITERATION:
        values = [row["seconds"].get(stage.name) for row in rows]
        if stage.enabled is Stage.enabled or any(value is not None for value in values):
            found.append((f"{stage.name} seconds", values))
    return found


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
