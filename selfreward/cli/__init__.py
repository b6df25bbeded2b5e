"""The `selfreward` command. `app` is the typer app; importing this package registers every command, in the
order `--help` lists them: the loop and its stages (`run`), the judge on its own (`judge`), cluster jobs
(`deploy`)."""

# isort: off
from selfreward.cli.app import app
from selfreward.cli import run, judge, deploy  # noqa: F401  (each registers its commands on `app`)
# isort: on

__all__ = ["app"]
