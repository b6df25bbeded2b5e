"""What a stage gets to work with: the recipe, the run directory, its iteration and shard, and models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from selfreward.backends import Backend, open_backend
from selfreward.models import resolve_model
from selfreward.recipe import Recipe
from selfreward.run.directory import RunDir
from selfreward.run.units import Shard, unit_seed

T = TypeVar("T")
# Opens a model in a backend: (model path, recipe backend section, seed, trust_remote_code) → Backend.
BackendOpener = Callable[..., Backend]


class Models:
    """Opens a model in the recipe's backend on first use and keeps at most one open.

    Stages of one iteration that use M_t share one load; nothing is loaded for stages already done, and
    the model is closed before training so generation and training never hold the accelerator together.
    `opener` is what loads a model (tests and benchmarks pass their own).
    """

    def __init__(self, recipe: Recipe, opener: BackendOpener = open_backend) -> None:
        self.recipe = recipe
        self.opener = opener
        self.ref: str | None = None
        self.backend: Backend | None = None

    def get(self, ref: str) -> Backend:
        if self.backend is None or self.ref != ref:
            self.close()
            self.backend = self.opener(
                resolve_model(ref), self.recipe.backend, self.recipe.seed, self.recipe.model.trust_remote_code
            )
            self.ref = ref
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend, self.ref = None, None

    def __enter__(self) -> Models:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class StageContext:
    recipe: Recipe
    run_dir: RunDir
    iteration: int  # t; 0 for SFT, which runs before the first iteration
    stage: str  # the stage's name, part of every unit's seed
    models: Models
    shard: Shard | None = None

    @property
    def current_model(self) -> str:
        """M_t as a model reference (the runner has checked that the stage producing it has finished)."""
        return self.run_dir.model_for(self.iteration, self.recipe)

    def backend(self, ref: str | None = None) -> Backend:
        """`ref` (default M_t) loaded in the recipe's backend, shared with the next stage that wants it."""
        return self.models.get(ref or self.current_model)

    def output(self, path: Path) -> Path:
        """Where this process writes the run file `path`: the shard's part file when sharded."""
        return self.run_dir.part(path, self.shard) if self.shard else path

    def take(self, units: Sequence[T]) -> list[T]:
        """This process's share of the units: all of them, or the shard's contiguous block."""
        return self.shard.take(units) if self.shard else list(units)

    def seed_of(self, first_id: str) -> int:
        """The seed of the unit whose first item has id `first_id`."""
        return unit_seed(self.recipe.seed, self.stage, self.iteration, first_id)
