"""One process of a training stage under `accelerate launch` (started by `selfreward.train.trainer.launch`).

    python -m selfreward.stages.worker sft|dpo RUN_DIR ITERATION RESULT_JSON

Every process reads the run directory's recipe and trains; only the main process writes the model and
the result file, which the launching process turns into the stage's done record.
"""

from __future__ import annotations

import sys
from pathlib import Path

from selfreward.allocator import keep_freed_memory
from selfreward.process_tree import join_stage
from selfreward.recipe import load_recipe
from selfreward.run.directory import RunDir
from selfreward.stages import BY_NAME
from selfreward.stages.context import Models, StageContext
from selfreward.train.trainer import write_result


def main(argv: list[str]) -> None:
    join_stage()  # die with accelerate launch; hold the stage's worker lock while alive
    stage, root, iteration, result_path = argv
    keep_freed_memory()
    run_dir = RunDir(Path(root))
    recipe = load_recipe(run_dir.recipe_path)
    ctx = StageContext(recipe, run_dir, int(iteration), BY_NAME[stage].name, Models(recipe))
    write_result(Path(result_path), BY_NAME[stage].run.train(ctx))


if __name__ == "__main__":
    main(sys.argv[1:])
