"""The end-of-run summary: one column per iteration, from the run directory's completion records."""

from __future__ import annotations

from typing import Any

from rich.table import Table

ROWS = [
    ("prompts", "prompts"), ("responses", "responses"), ("judgments", "judgments"),
    ("parse failures", "parse_failures"), ("mean score", "mean_score"), ("pairs", "pairs"),
    ("ties dropped", "ties_dropped"), ("unscored dropped", "unscored_dropped"),
    ("mean response tokens", "mean_response_tokens"), ("responses cut at max tokens", "responses_cut"),
    ("judge pairwise acc. % (held out)", "judge_pairwise_accuracy"),
]
STAGES = ["prompts", "responses", "judgments", "pairs", "dpo"]


def summary_table(rows: list[dict[str, Any]], sft: dict | None) -> Table:
    """Iterations as columns, so the table fits a terminal whatever the number of metrics."""
    title = "selfreward run"
    if sft:
        title += f" (SFT: {sft.get('examples')} examples, {sft.get('seconds')} s)"
    table = Table(title=title)
    table.add_column("")
    for row in rows:
        table.add_column(f"iter {row['iteration']}", justify="right")
    for label, key in ROWS:
        table.add_row(label, *(_cell(row.get(key)) for row in rows))
    for stage in STAGES:
        table.add_row(f"{stage} seconds", *(_cell(row["seconds"].get(stage)) for row in rows))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
