"""The paper's loop (`iterate.run`), one stage against the run directory (`stage.run_stage`), shards and
their merge (`shards`), and the checks made before any work (`checks`)."""

from selfreward.loop.checks import check_inputs, warn_remote_code
from selfreward.loop.iterate import iteration_metrics, run, write_metrics
from selfreward.loop.shards import merge
from selfreward.loop.stage import run_stage

__all__ = ["check_inputs", "iteration_metrics", "merge", "run", "run_stage", "warn_remote_code", "write_metrics"]
