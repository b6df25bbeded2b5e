"""What a run shows: its figures read from the run directory, plotted, in `report.html` (one self-contained
file: plots inline, nothing fetched, no script) and `report.md` (the same tables).

Every number comes from the run's files: the iterations' metrics and done records, `judge_eval.json`,
`policy_eval.json`, the judgments (score histograms), the responses (lengths, the share cut at max tokens:
the paper's failure mode is length growth), the pairs (chosen vs rejected lengths) and the DPO logs (loss,
rewards, margins, accuracies). Rates carry their n and a 95 % interval: Wilson's for a share of pairs,
the bootstrap's where the stage computed one.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from statistics import mean, median
from typing import Any

from selfreward.loop.iterate import iteration_metrics
from selfreward.loop.report import cell, metric_rows, seconds_rows
from selfreward.recipe import Recipe, recipe_yaml
from selfreward.run.directory import RunDir
from selfreward.run.jsonl import read_json, read_jsonl, write_atomic


def wilson(share_percent: float | None, n: int | None) -> list[float] | None:
    """95 % Wilson interval (percent) of a share measured on n items."""
    if share_percent is None or not n:
        return None
    p, z = share_percent / 100, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(100 * (centre - half), 2), round(100 * (centre + half), 2)]


def _agreement(part: dict | None) -> dict[str, Any] | None:
    """A judge_eval.json part (ranked or pairs): the judge's and the length baseline's pairwise accuracy."""
    if not part or "judge" not in part:
        return None
    judge, baseline = part["judge"], part.get("length_baseline") or {}
    n = judge.get("pairs")
    return {"n": n, "judge": judge.get("pairwise_accuracy"), "judge_ci": wilson(judge.get("pairwise_accuracy"), n),
            "length_baseline": baseline.get("pairwise_accuracy"), "length_baseline_ci": wilson(baseline.get("pairwise_accuracy"), n)}


def _read(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def _json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def figures(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    """Everything the report shows, read from the run directory (iterations not reached hold None)."""
    iterations = []
    for t in range(1, recipe.iterations + 1):
        responses, judgments, pairs = _read(run_dir.responses(t)), _read(run_dir.judgments(t)), _read(run_dir.pairs(t))
        judge_eval, policy_eval = _json(run_dir.judge_eval(t)), _json(run_dir.policy_eval(t))
        head_to_head = _json(run_dir.head_to_head(t))
        tokens = [r["tokens"] for r in responses]
        scores = [s for j in judgments for s in j["scores"] if s is not None]
        iterations.append({
            "iteration": t,
            "metrics": iteration_metrics(run_dir, t),
            "responses": len(responses),
            "response_tokens": tokens,
            "median_response_tokens": median(tokens) if tokens else None,
            "cut_at_max_tokens": sum(not r["finished"] for r in responses),
            "cut_at_max_tokens_percent": round(100 * sum(not r["finished"] for r in responses) / len(responses), 1) if responses else None,
            "score_counts": [scores.count(s) for s in range(6)],
            "mean_scores": [j["score"] for j in judgments if j["score"] is not None],
            "chosen_chars": [len(p["chosen"][-1]["content"]) for p in pairs],
            "rejected_chars": [len(p["rejected"][-1]["content"]) for p in pairs],
            "judge_agreement": {part: _agreement((judge_eval or {}).get(part)) for part in ("ranked", "pairs")},
            "policy_agreement": None if policy_eval is None else {
                key: policy_eval.get(key) for key in ("n", "accuracy", "accuracy_ci", "ties", "mean_margin")},
            "head_to_head": head_to_head and head_to_head["summary"],
            "dpo_log": _read(run_dir.dpo_log(t)),
        })
    return {"name": recipe.name, "iterations": iterations, "sft": run_dir.done_record("sft"),
            "sft_log": _read(run_dir.sft_log), "recipe": recipe_yaml(recipe)}


# --- plots ---------------------------------------------------------------------------------------------

def _png(draw) -> str:
    """A matplotlib figure drawn by `draw(figure)`, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure = plt.figure(figsize=(6.4, 3.4), dpi=100)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _errorbars(axes, xs, values, cis, label, style="o-"):
    known = [(x, v, ci) for x, v, ci in zip(xs, values, cis) if v is not None]
    if not known:
        return
    xs, values, cis = zip(*known)
    errors = [[v - (ci or [v, v])[0] for v, ci in zip(values, cis)], [(ci or [v, v])[1] - v for v, ci in zip(values, cis)]]
    axes.errorbar(xs, values, yerr=errors, fmt=style, capsize=4, label=label)


def plots(data: dict[str, Any]) -> dict[str, str]:
    """Titles → base64 PNGs, for the parts of the run that have data."""
    rows, found = data["iterations"], {}
    xs = [row["iteration"] for row in rows]

    for part in ("ranked", "pairs"):
        agreement = [row["judge_agreement"][part] for row in rows]
        if any(agreement):
            def draw(figure, agreement=agreement, part=part):
                axes = figure.add_subplot()
                _errorbars(axes, xs, [a and a["judge"] for a in agreement], [a and a["judge_ci"] for a in agreement], "M_t as judge")
                _errorbars(axes, xs, [a and a["length_baseline"] for a in agreement], [a and a["length_baseline_ci"] for a in agreement],
                           "longer answer wins", "s--")
                axes.axhline(50, color="grey", linewidth=0.8)
                axes.set(xlabel="iteration t", ylabel="pairwise accuracy %", title=f"Judge agreement with humans ({part})", xticks=xs)
                axes.legend()
            found[f"Judge agreement with humans ({part})"] = _png(draw)

    policy = [row["policy_agreement"] for row in rows]
    if any(policy):
        def draw_policy(figure):
            axes = figure.add_subplot()
            _errorbars(axes, xs, [p and p["accuracy"] for p in policy], [p and p["accuracy_ci"] for p in policy], "M_{t+1} vs M_t")
            axes.axhline(50, color="grey", linewidth=0.8)
            axes.set(xlabel="iteration t", ylabel="accuracy %", title="Policy agreement with humans (implicit reward)", xticks=xs)
        found["Policy agreement with humans"] = _png(draw_policy)

    duels = [row["head_to_head"] for row in rows]
    if any(duels):
        def draw_duels(figure):
            axes = figure.add_subplot()
            _errorbars(axes, xs, [d and d["win_rate"] for d in duels], [d and d["win_rate_ci"] for d in duels], "win rate")
            axes.plot([x for x, d in zip(xs, duels) if d], [d["lc_win_rate"] for d in duels if d], "s--", label="length-controlled")
            axes.axhline(50, color="grey", linewidth=0.8)
            axes.set(xlabel="iteration t", ylabel="% (ties half)", title="M_{t+1} vs M_t, fixed judge, both orders", xticks=xs)
            axes.legend()
        found["Head to head: M_{t+1} vs M_t"] = _png(draw_duels)

    if any(sum(row["score_counts"]) for row in rows):
        def draw_scores(figure):
            axes = figure.add_subplot()
            width = 0.8 / max(1, len(rows))
            for i, row in enumerate(rows):
                axes.bar([s + i * width for s in range(6)], row["score_counts"], width, label=f"iter {row['iteration']}")
            axes.set(xlabel="judge score", ylabel="judgments", title="Scores the model gave its own answers", xticks=range(6))
            axes.legend()
        found["Score histograms"] = _png(draw_scores)

    if any(row["response_tokens"] for row in rows):
        def draw_lengths(figure):
            axes = figure.add_subplot()
            present = [row for row in rows if row["response_tokens"]]
            axes.boxplot([row["response_tokens"] for row in present], tick_labels=[f"iter {row['iteration']}" for row in present])
            axes.set(ylabel="tokens", title="Response lengths (length growth is the paper's failure mode)")
        found["Response lengths"] = _png(draw_lengths)

    if any(row["chosen_chars"] for row in rows):
        def draw_pairs(figure):
            axes = figure.add_subplot()
            present = [row for row in rows if row["chosen_chars"]]
            axes.plot([r["iteration"] for r in present], [mean(r["chosen_chars"]) for r in present], "o-", label="chosen")
            axes.plot([r["iteration"] for r in present], [mean(r["rejected_chars"]) for r in present], "s--", label="rejected")
            axes.set(xlabel="iteration t", ylabel="mean characters", title="Chosen vs rejected answer length", xticks=xs)
            axes.legend()
        found["Chosen vs rejected length"] = _png(draw_pairs)

    if any(row["dpo_log"] for row in rows):
        def draw_dpo(figure):
            keys = ["loss", "rewards/margins", "rewards/accuracies"]
            for k, key in enumerate(keys, start=1):
                axes = figure.add_subplot(1, len(keys), k)
                for row in rows:
                    steps = [r for r in row["dpo_log"] if key in r]
                    if steps:
                        axes.plot([r["step"] for r in steps], [r[key] for r in steps], label=f"iter {row['iteration']}")
                axes.set(xlabel="step", title=key)
            figure.axes[0].legend(fontsize="small")
        found["DPO training curves"] = _png(draw_dpo)
    return found


# --- tables and pages ----------------------------------------------------------------------------------

def _interval(ci: list[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"


def tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table the report holds."""
    rows = data["iterations"]
    header = [""] + [f"iter {row['iteration']}" for row in rows]
    metrics = [[label, *map(cell, values)] for label, values in metric_rows([row["metrics"] for row in rows])]
    lengths = [
        ["responses", *(cell(row["responses"]) for row in rows)],
        ["median response tokens", *(cell(row["median_response_tokens"]) for row in rows)],
        ["cut at max tokens", *(f"{row['cut_at_max_tokens']} ({cell(row['cut_at_max_tokens_percent'])} %)" for row in rows)],
        ["mean chosen / rejected chars", *(f"{cell(float(mean(row['chosen_chars'])) if row['chosen_chars'] else None)} / "
                                           f"{cell(float(mean(row['rejected_chars'])) if row['rejected_chars'] else None)}" for row in rows)],
    ]
    agreement = []
    for part in ("ranked", "pairs"):
        values = [row["judge_agreement"][part] for row in rows]
        if any(values):
            agreement.append([f"judge ({part}) % [95 % CI], n"] + [
                f"{cell(v['judge'])} {_interval(v['judge_ci'])}, n={v['n']}" if v else "-" for v in values])
            agreement.append([f"longer answer wins ({part}) %"] + [cell(v["length_baseline"]) if v else "-" for v in values])
    policy = [row["policy_agreement"] for row in rows]
    if any(policy):
        agreement.append(["policy, M_{t+1} vs M_t % [95 % CI], n"] + [
            f"{cell(p['accuracy'])} {_interval(p['accuracy_ci'])}, n={p['n']}" if p else "-" for p in policy])
    duels = [row["head_to_head"] for row in rows]
    if any(duels):
        agreement.append(["M_{t+1} vs M_t win rate % [95 % CI], n"] + [
            f"{cell(d['win_rate'])} {_interval(d['win_rate_ci'])}, n={d['n']}" if d else "-" for d in duels])
        agreement.append(["  length-controlled %, position consistency %"] + [
            f"{cell(d['lc_win_rate'])}, {cell(d['position_consistency'])}" if d else "-" for d in duels])
    seconds = [[label, *map(cell, values)] for label, values in seconds_rows([row["metrics"] for row in rows])]
    found = [("Per iteration", header, metrics), ("Lengths", header, lengths)]
    if agreement:
        found.append(("Held-out evidence: agreement with humans, head to head", header, agreement))
    found.append(("Time per stage", header, seconds))
    return found


def markdown(data: dict[str, Any]) -> str:
    sft = data["sft"] or {}
    lines = [f"# selfreward run: {data['name']}", "",
             f"SFT: {cell(sft.get('examples'))} examples, loss {cell(sft.get('first_loss'))} → {cell(sft.get('last_loss'))}, "
             f"{cell(sft.get('seconds'))} s. Plots: report.html.", ""]
    for title, header, rows in tables(data):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += ["## Recipe", "", "```yaml", data["recipe"].rstrip(), "```", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}img{max-width:100%}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto}")


def page(data: dict[str, Any], images: dict[str, str]) -> str:
    sft = data["sft"] or {}
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>selfreward run: {html.escape(data['name'])}</title>",
             f"<style>{STYLE}</style></head><body><h1>selfreward run: {html.escape(data['name'])}</h1>",
             f"<p>SFT: {cell(sft.get('examples'))} examples, loss {cell(sft.get('first_loss'))} → {cell(sft.get('last_loss'))}, "
             f"{cell(sft.get('seconds'))} s.</p>"]
    for title, header, rows in tables(data):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    for title, image in images.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{image}\">")
    parts.append(f"<h2>Recipe</h2><pre>{html.escape(data['recipe'])}</pre></body></html>")
    return "\n".join(parts)


def write_report(recipe: Recipe, run_dir: RunDir) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/report.md from the run directory; return their paths."""
    data = figures(recipe, run_dir)
    html_path, md_path = run_dir.root / "report.html", run_dir.root / "report.md"
    write_atomic(md_path, markdown(data))
    write_atomic(html_path, page(data, plots(data)))
    return html_path, md_path
