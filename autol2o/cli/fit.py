"""``autol2o fit`` (placeholder until the fit pipeline lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
