"""The end-of-run summary: one row per iteration, from the run directory's completion records."""

from __future__ import annotations

from typing import Any

from rich.table import Table

COLUMNS = [
    ("iter", "iteration"), ("prompts", "prompts"), ("responses", "responses"), ("judgments", "judgments"),
    ("parse fail", "parse_failures"), ("mean score", "mean_score"), ("pairs", "pairs"),
    ("ties", "ties_dropped"), ("resp. tokens", "mean_response_tokens"),
]
STAGE_COLUMNS = ["prompts", "responses", "judgments", "pairs", "dpo"]


def summary_table(rows: list[dict[str, Any]], sft: dict | None) -> Table:
    title = "selfreward run"
    if sft:
        title += f" — SFT: {sft.get('examples')} examples, {sft.get('seconds')} s"
    table = Table(title=title)
    for header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for stage in STAGE_COLUMNS:
        table.add_column(f"{stage} s", justify="right")
    for row in rows:
        cells = [_cell(row.get(key)) for _, key in COLUMNS]
        cells += [_cell(row["seconds"].get(stage)) for stage in STAGE_COLUMNS]
        table.add_row(*cells)
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
