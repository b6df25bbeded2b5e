"""What is checked before any work starts: the files and models a recipe names, and remote code."""

from __future__ import annotations

import logging
from pathlib import Path

from selfreward.data.seeds import is_local, load_eft, load_ift
from selfreward.errors import UserError
from selfreward.models import check_model_reference
from selfreward.recipe import Recipe

log = logging.getLogger(__name__)


def check_inputs(recipe: Recipe, source: str) -> None:
    """Every file and model the recipe names exists: checked before any work starts and before the run
    directory is created, so that a typo costs a second rather than an SFT run."""
    files = {
        "data.ift": recipe.data.ift, "data.eft": recipe.data.eft, "prompts.template": recipe.prompts.template,
        "judge.template": recipe.judge.template, "evaluation.pairs": recipe.evaluation.pairs, "launcher.config_file": recipe.launcher.config_file,
        "evaluation.head_to_head.instructions": recipe.evaluation.head_to_head.instructions,
    }
    for key, where in (("data.oasst1", recipe.data.oasst1), ("evaluation.ranked", recipe.evaluation.ranked)):
        if where and is_local(where):
            files[key] = where  # a local file, not a hub id
    for key, value in files.items():
        if value is not None and not Path(value).expanduser().exists():
            raise UserError(f"{source}: {key}: '{value}' not found (relative paths start from {Path.cwd()})")
    judge = None if recipe.evaluation.head_to_head.endpoint else recipe.evaluation.head_to_head.judge
    for key, ref in (("model.base", recipe.model.base), ("prompts.model", recipe.prompts.model), ("evaluation.head_to_head.judge", judge)):
        try:
            if ref:
                check_model_reference(ref)
        except UserError as error:
            raise UserError(f"{source}: {key}: {error}") from None
    # Seed files are small: read them whole now, so a bad line is reported before the run starts.
    if recipe.data.ift and not load_ift(recipe.data.ift) and not recipe.data.oasst1:
        raise UserError(f"{recipe.data.ift}: empty file: no IFT seed examples")
    if recipe.data.eft:
        load_eft(recipe.data.eft)


def warn_remote_code(recipe: Recipe) -> None:
    """Put it in the run log when the recipe lets model repositories run their own Python code here."""
    if recipe.model.trust_remote_code:
        models = [recipe.model.base] + ([recipe.prompts.model] if recipe.prompts.model else [])
        log.warning("model.trust_remote_code is on: code from %s will be executed", " and ".join(models))
