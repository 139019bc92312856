"""``autol2o zoo ...`` (placeholder until the zoo commands land)."""

import typer

app = typer.Typer(help="List, show and train pretrained learned optimizers.", no_args_is_help=True)
