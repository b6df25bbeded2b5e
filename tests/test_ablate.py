"""`selfreward ablate` on a tiny model: every variant from the same M1, its switch and nothing else, a
head-to-head against plain, and one side-by-side report; a rerun resumes without loading a model."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from selfreward.backends import open_backend
from selfreward.cli import app
from selfreward.loop.ablate import VARIANTS
from selfreward.recipe import load_recipe
from selfreward.run.directory import RunDir
from tests.test_meta_judge import MetaScripted
from tests.test_pipeline import tiny_recipe


def test_ablate_runs_every_variant_from_one_m1_and_reports_them_side_by_side(tiny_model, tmp_path):
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A careful answer to question {i}.",
                                         "rejected": "No."}) + "\n" for i in range(6)))
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": f"Explain idea {i} briefly."} for i in range(4)]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, judge={"samples": 3}, meta_judge={"share": 0.45}, evaluation={
        "pairs": str(human), "policy": True, "limit": 6,
        "head_to_head": {"instructions": str(instructions), "judge": tiny_model, "answer_tokens": 8, "verdict_tokens": 8, "limit": 4}})))
    loads = []

    def opener(*args):
        loads.append(args[0])
        return MetaScripted(open_backend(*args))

    out = tmp_path / "ablation"
    result = CliRunner().invoke(app, ["ablate", "-r", str(recipe), "-o", str(out)], obj={"open_backend": opener})
    assert result.exit_code == 0, result.output
    plain = RunDir(out / "plain")
    for name, switch in VARIANTS.items():
        run = RunDir(out / name)
        used = load_recipe(run.recipe_path)
        assert (run.model(2) / "model.safetensors").is_file()
        if name != "plain":
            # From plain's M1, no second SFT; the switch set, everything else as plain's recipe has it.
            assert not used.sft.enabled and used.model.base == str(plain.sft_model) and not run.sft_model.exists()
            for section, values in switch.items():
                for key, value in values.items():
                    assert getattr(getattr(used, section), key) == value
            # Same M1 and seeds: iteration 1's prompts and candidates are plain's, byte for byte.
            for file in ("prompts", "responses"):
                assert getattr(run, file)(1).read_bytes() == getattr(plain, file)(1).read_bytes()
    assert not (out / "plain" / "iter1" / "head_to_head.json").exists()  # compared once, at the end
    assert RunDir(out / "anchor").anchor_responses(2).stat().st_size > 0 and (out / "meta" / "iter1" / "judge_pairs.jsonl").exists()
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["variants"]] == list(VARIANTS)
    for row in table["variants"]:
        assert row["judge"]["n"] == 6 and row["policy"]["n"] == 6 and len(row["mean_response_tokens"]) == 2 and row["seconds"] > 0
        if row["variant"] != "plain":
            duel = row["head_to_head"]
            assert duel["n"] + duel["unparsed"] == 4 and set(duel) >= {"win_rate", "win_rate_ci", "lc_win_rate"}
    assert table["detectable_difference"]["judge_agreement_between_variants"] == round(100 * 2.801585 * (0.25 / 6 * 2) ** 0.5, 1)
    report = (out / "ablation.md").read_text()
    assert all(f"| {name}" in report for name in VARIANTS) and "Smallest difference these n can detect" in report
    # A rerun reads every finished variant and comparison: nothing is loaded again.
    loads.clear()
    again = CliRunner().invoke(app, ["ablate", "-r", str(recipe), "-o", str(out)], obj={"open_backend": opener})
    assert again.exit_code == 0 and loads == []
    assert json.loads((out / "ablation.json").read_text())["variants"][1]["seconds"] == table["variants"][1]["seconds"]


def test_ablate_refuses_unknown_variants_and_a_missing_baseline_in_one_line(tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model)))
    for variants, message in (("plain,lenght", "unknown variant(s) lenght"), ("length,nll", "include 'plain'")):
        result = CliRunner().invoke(app, ["ablate", "-r", str(recipe), "-o", str(tmp_path / "out"), "--variants", variants])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    meta_on_expected = tmp_path / "expected.yaml"
    meta_on_expected.write_text(yaml.safe_dump(tiny_recipe(tiny_model, judge={"mode": "expected"})))
    result = CliRunner().invoke(app, ["ablate", "-r", str(meta_on_expected), "-o", str(tmp_path / "out2"), "--variants", "plain,meta"])
    assert result.exit_code == 2 and "variant meta" in result.output and "judge.mode: sampled" in result.output


def test_the_final_comparison_can_ask_an_endpoint_judge(tmp_path):
    """evaluation.head_to_head.endpoint: the ablation's comparison goes to an OpenAI-compatible server (here a
    fake that prefers the longer answer in either order); answers already written are read, not regenerated."""
    from http.server import BaseHTTPRequestHandler

    from selfreward.judge.compare import write_answers
    from selfreward.loop.ablate import compare_final
    from selfreward.recipe import parse_recipe
    from tests.conftest import send_json, serving

    class LongerWins(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            a = text.split("<response_a>")[1].split("</response_a>")[0]
            b = text.split("<response_b>")[1].split("</response_b>")[0]
            verdict = "Winner: A" if len(a) > len(b) else "Winner: B"
            send_json(self, {"choices": [{"message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}] * body.get("n", 1)})

        def log_message(self, *args):
            pass

    instructions = [f"Explain idea {i}." for i in range(5)]
    (tmp_path / "instructions.json").write_text(json.dumps([{"instruction": i} for i in instructions]))
    for name, answer in (("long", "A long and careful answer."), ("plain", "Short.")):
        (tmp_path / name).mkdir()
        write_answers(tmp_path / name / "ablation_answers.iter1.json", instructions, [answer] * 5, name)
    with serving(LongerWins) as url:
        recipe = parse_recipe({"iterations": 1, "evaluation": {"head_to_head": {
            "instructions": str(tmp_path / "instructions.json"), "judge": "served-judge", "endpoint": url}}}, "r")
        summary = compare_final(recipe, RunDir(tmp_path / "long"), RunDir(tmp_path / "plain"), "long", opener=None)
    assert summary["n"] == 5 and summary["win_rate"] == 100.0 and summary["position_consistency"] == 100.0
