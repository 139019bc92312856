"""The ``autol2o`` command line: a thin layer over the library.

Data goes to stdout, progress and logs to stderr.  Errors that are the user's to fix
(:class:`autol2o.errors.UserError` and friends) print one line and exit non-zero; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from autol2o.errors import UserError

app = typer.Typer(
    name="autol2o",
    help="Train your model with a learned optimizer and prove whether it beats tuned Adam/SGD.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def option_given(ctx: typer.Context, name: str) -> bool:
    """Was option ``name`` typed on the command line (not left at its default)?  Compared by
    name: typer >= 0.29 bundles its own click, with its own ParameterSource enum."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _register() -> None:
    from autol2o.cli import fit as fit_cli
    from autol2o.cli import zoo as zoo_cli

    app.add_typer(zoo_cli.app, name="zoo")
    fit_cli.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and turns user errors into one-line messages."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = app(args=argv, standalone_mode=False)
        # typer turns Ctrl-C into Exit(130) and, outside standalone mode, returns the code
        if isinstance(rc, int) and rc != 0:
            if rc == 130:
                typer.echo("interrupted", err=True)
            raise SystemExit(rc)
    except UserError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        kind = _click_kind(exc)
        if kind == "help":  # a bare group (`autol2o zoo`): its help is the answer, not an error
            typer.echo(exc.format_message())
            raise SystemExit(0) from None
        if kind == "exit":
            raise SystemExit(exc.exit_code) from None
        if kind == "usage":  # click's own "Usage: ... Error: ..." naming the option
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if kind == "abort":  # older typer lets click turn Ctrl-C into Abort: same as above
            typer.echo("interrupted", err=True)
            raise SystemExit(130) from None
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        raise SystemExit(1) from None


def _click_kind(exc: Exception) -> str | None:
    """Classify a click exception, whichever click raised it: typer >= 0.29 bundles its own copy
    (``typer._click``, with ``typer.Exit``/``typer.Abort`` of its own), older typer uses ``click``
    itself, and the two class hierarchies are unrelated."""
    import importlib

    mods = [typer]   # typer.Exit, typer.Abort
    for name in ("typer._click", "click"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        mods += [mod, getattr(mod, "exceptions", mod)]

    def classes(name: str) -> tuple[type, ...]:
        return tuple({c for m in mods if isinstance(c := getattr(m, name, None), type)})

    for kind, name in (("help", "NoArgsIsHelpError"), ("exit", "Exit"),
                       ("usage", "ClickException"), ("abort", "Abort")):
        if isinstance(exc, classes(name)):
            return kind
    return None
