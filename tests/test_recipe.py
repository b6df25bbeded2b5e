from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli import app
from selfreward.errors import UserError
from selfreward.recipe import load_recipe, parse_recipe
from selfreward.run.directory import RunDir
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"responses": {"n": 1}}, "responses.n: Input should be greater than or equal to 2"),
        ({"judge": {"samples": 0}}, "judge.samples"),
        ({"dpo": {"beta": 0}}, "dpo.beta"),
        ({"responses": {"temperature": -0.1}}, "responses.temperature"),
        ({"dpo": {"betta": 0.1}}, "dpo.betta: unknown key"),
        ({"iterations": "two"}, "iterations"),
        ({"backend": {"kind": "tpu"}}, "backend.kind"),
        ({"limits": {"max_response_chars": 0}}, "limits.max_response_chars"),
        ({"backend": {"vllm": {"max_num_seqs": 64, "max_num_batched_tokens": 32}}},
         "backend.vllm.max_num_batched_tokens must be at least backend.vllm.max_num_seqs"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        parse_recipe(raw, "r.yaml")


@pytest.mark.parametrize("text", ["", "\n  \n", "# a recipe, to be written\n# iterations: 2\n"],
                         ids=["empty", "whitespace", "comments-only"])
def test_empty_recipe_is_refused_not_taken_as_all_defaults(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_recipe(path)
    assert str(raised.value) == f"{path}: the recipe is empty (copy one from recipes/)"
    with pytest.raises(UserError, match=r"^r\.yaml: the recipe is empty \(copy one from recipes/\)$"):
        parse_recipe(None, "r.yaml")


def test_explicit_empty_mapping_still_means_all_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("{}\n")
    assert load_recipe(path) == parse_recipe({}, "defaults")


def test_demo_recipe_is_valid_and_small():
    recipe = load_recipe("recipes/demo-cpu.yaml")
    assert recipe.iterations == 2 and recipe.responses.n == 4 and recipe.judge.samples == 3


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("responses:\n  n: 1\n")
    result = CliRunner().invoke(app, ["iterate", "--recipe", str(bad), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "responses.n" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # no work started


def test_cli_missing_recipe_is_named(tmp_path):
    result = CliRunner().invoke(app, ["iterate", "-r", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "nope.yaml: recipe file not found" in result.output


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seed: 1\njudge: [\n")
    with pytest.raises(UserError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_changed_recipe_is_refused_for_an_existing_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.bind_recipe(parse_recipe({"seed": 1}, "a"))
    run.bind_recipe(parse_recipe({"seed": 1}, "a"))  # the same recipe resumes
    with pytest.raises(UserError, match=r"'judge\.samples' differs: 3 in this run, 5 in the recipe\); set it as the run"):
        run.bind_recipe(parse_recipe({"seed": 1, "judge": {"samples": 5}}, "b"))
    with pytest.raises(UserError, match="'backend.vllm.max_num_seqs' differs: null in this run, 8 in the recipe"):
        run.bind_recipe(parse_recipe({"seed": 1, "backend": {"vllm": {"max_num_seqs": 8}}}, "c"))
    assert yaml.safe_load(run.recipe_path.read_text())["judge"]["samples"] == 3


def test_missing_model_directory_is_named():
    from selfreward.models import resolve_model

    with pytest.raises(UserError, match="model './no/such/model': directory not found"):
        resolve_model("./no/such/model")
    assert resolve_model("org/model") == "org/model"  # hub ids pass through


def test_cli_error_line_prints_brackets_in_paths_literally(tmp_path):
    folder = tmp_path / "run[/x][bold]"  # a closing tag rich would choke on, a style it would swallow
    result = CliRunner().invoke(app, ["iterate", "-r", str(folder / "nope.yaml"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and f"{folder / 'nope.yaml'}: recipe file not found" in result.output


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_is_valid_and_names_files_that_exist(path):
    from selfreward.loop import check_inputs

    recipe = load_recipe(path)
    check_inputs(recipe, path)
    if recipe.launcher.num_processes > 1:
        assert recipe.launcher.config_file and (ROOT / recipe.launcher.config_file).is_file()


def test_a_run_directory_records_its_format_version_and_refuses_another(tmp_path):
    from selfreward.run.directory import FORMAT_VERSION

    run = RunDir(tmp_path / "run")
    run.bind_recipe(parse_recipe({"seed": 1}, "a"))
    assert json.loads(run.format_path.read_text())["format"] == FORMAT_VERSION == 1
    # A directory written before the version existed is version 1: it resumes, and gets the file.
    run.format_path.unlink()
    run.bind_recipe(parse_recipe({"seed": 1}, "a"))
    assert json.loads(run.format_path.read_text())["format"] == 1
    run.format_path.write_text(json.dumps({"format": 2, "selfreward": "9.0"}))
    with pytest.raises(UserError, match=r"run: a run directory of format version 2 \(written by selfreward 9\.0\); this selfreward "
                                        r"\S+ reads version 1 only: resume it with the release that started it, or start a new --output"):
        run.bind_recipe(parse_recipe({"seed": 1}, "a"))
    run.format_path.write_text("{trunc")
    with pytest.raises(UserError, match=r"format\.json: damaged"):
        run.bind_recipe(parse_recipe({"seed": 1}, "a"))


def test_a_run_of_another_format_version_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from selfreward.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 1\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "format.json").write_text(json.dumps({"format": 7}))
    result = CliRunner().invoke(app, ["pairs", "-r", str(recipe), "-o", str(tmp_path / "run"), "-t", "1"])
    assert result.exit_code == 2 and "format version 7" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3 and "Traceback" not in result.output


def test_a_missing_file_names_the_recipe_and_the_key(tmp_path):
    from selfreward.loop import check_inputs

    recipe = parse_recipe({"data": {"ift": str(tmp_path / "none.jsonl")}, "evaluation": {"ranked": "org/oasst1-on-the-hub"}}, "r")
    with pytest.raises(UserError, match=rf"^my/recipe\.yaml: data\.ift: '{tmp_path / 'none.jsonl'}' not found"):
        check_inputs(recipe, "my/recipe.yaml")
    recipe = parse_recipe({"evaluation": {"ranked": str(tmp_path / "ranked.jsonl")}}, "r")
    with pytest.raises(UserError, match=r"^my/recipe\.yaml: evaluation\.ranked: .*ranked\.jsonl' not found"):
        check_inputs(recipe, "my/recipe.yaml")
