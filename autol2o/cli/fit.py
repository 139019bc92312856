"""``autol2o fit [MODEL.py] [DATA]`` and ``autol2o demo``: a thin layer over :mod:`autol2o.fit`.

Progress and logs go to stderr; the leaderboard (or, with ``--json``, only the report JSON) goes
to stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from autol2o.cli import option_given  # defined before autol2o.cli imports this module

FIT_HELP = """Train MODEL.py on DATA with the best learned optimizer from the zoo and compare it with
Optuna-tuned Adam and SGD.  Without arguments: a bundled MLP on scikit-learn's digits."""


#: fit options that --resume accepts: they say how to compute (storage password, threads, device,
#: parallel trials) or what to print, not what the run is; MODEL/DATA are refused by fit_files
RESUME_OK = {"model", "data", "resume", "storage", "threads", "device", "n_jobs", "json_out",
             "quiet"}


def fit(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(
        help="MODEL.py: defines build_model(), a module-level `model`, or a class `Model`.",
        show_default=False)] = None,
    data: Annotated[str | None, typer.Argument(
        help="DATA: directory or file (CSV, NPZ/NPY, image folder, MNIST idx .gz), or "
             "'digits'/'diabetes'. Default: digits.", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per training run.")] = 300,
    trials: Annotated[int, typer.Option(help="Optuna trials per baseline (Adam, SGD).")] = 20,
    seeds: Annotated[int, typer.Option(help="Seeds per contender in the finals.")] = 3,
    fine_tune: Annotated[int, typer.Option(
        "--fine-tune", help="Meta-train the picked optimizer on this task for N iterations.")] = 0,
    optimizer: Annotated[str | None, typer.Option(
        help="Use this zoo entry (name or path) and skip the race.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Minibatch size.")] = 128,
    probe: Annotated[float, typer.Option(help="Race probe length, fraction of --steps.")] = 0.1,
    race: Annotated[str, typer.Option(
        help="halving: successive halving (all entries a third of the probe, the best third "
             "on to the full probe); full: every entry the whole probe.")] = "halving",
    race_all: Annotated[bool, typer.Option(
        "--race-all", help="Race every zoo entry, also those whose card says \"race\": false "
                           "(the papers' reproductions and training-task specialists).")] = False,
    baselines: Annotated[str, typer.Option(help="Comma-separated: adam,sgd.")] = "adam,sgd",
    target: Annotated[str | None, typer.Option(help="CSV target column.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (sqlite:///f.db, postgresql://..., journal:///f.log) shared "
             "by several processes. Default: RUN/optuna.db.")] = None,
    study: Annotated[str | None, typer.Option(
        help="Study name prefix (…-adam, …-sgd); use the same one to share trials.")] = None,
    n_jobs: Annotated[int, typer.Option("--n-jobs", help="Parallel Optuna trials.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for split, init, minibatches, sampler.")] = 0,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: 1 for small models, else torch's default).")] = None,
    zoo: Annotated[str | None, typer.Option(
        help="Zoo directory (default: $AUTOL2O_ZOO or the shipped zoo).")] = None,
    out: Annotated[str | None, typer.Option(
        help="Run directory (default runs/<timestamp>-<model>); must be new or empty.")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue an interrupted run directory with its saved settings (with --storage "
             "URL again if that URL has a password: it is not saved in the run); only "
             "--threads, --device, --n-jobs, --json and -q may be given too.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print only the report JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    from autol2o.fit import FitConfig, fit_files
    from autol2o.fit.progress import Reporter

    cfg = FitConfig(steps=steps, batch_size=batch_size, probe_fraction=probe, race=race,
                    race_all=race_all, trials=trials, seeds=seeds, fine_tune=fine_tune,
                    optimizer=optimizer,
                    # "adam,adam" would tune and retrain Adam twice, for one leaderboard row
                    baselines=tuple(dict.fromkeys(b.strip() for b in baselines.split(",")
                                                  if b.strip())),
                    device=device, storage=storage, study=study, n_jobs=n_jobs, seed=seed,
                    zoo=zoo, threads=threads)
    explicit = None
    if resume is not None:
        _check_resume_flags(ctx, resume)
        explicit = {n for n in ("threads", "device", "n_jobs") if option_given(ctx, n)}
    reporter = Reporter(not quiet)
    # --json: stdout carries the report only, so whatever user code prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
        res = fit_files(model, data, cfg, out=out, target=target, resume=resume,
                        reporter=reporter, explicit=explicit)
    if json_out:
        typer.echo(json.dumps(res.report, indent=2))
        return
    print_leaderboard(res.report)
    reporter.log(f"report: {Path(res.run_dir) / 'report.md'}")
    reporter.log(f"dashboard: {res.report['artifacts']['dashboard_command']}")


def _check_resume_flags(ctx: typer.Context, resume: str) -> None:
    """Refuse flags that a resumed run would silently ignore (it keeps its saved settings)."""
    from autol2o.errors import UserError

    given = [p.opts[0] for p in ctx.command.params
             if p.name not in RESUME_OK and p.name is not None and option_given(ctx, p.name)]
    if given:
        raise UserError(f"--resume continues {resume} with its saved settings; drop "
                        + ", ".join(given))


def print_leaderboard(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="autol2o leaderboard (finals, validation)")
    for col in ("rank", "optimizer", "config", "val loss", "val acc", "diverged"):
        table.add_column(col, justify="right" if col in ("rank", "val loss", "val acc") else "left")
    for r in report["leaderboard"]:
        conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r["params"].items()) or "learned: no hyperparameters"
        loss = "diverged" if r["val_loss_mean"] is None else \
            _pm(r["val_loss_mean"], r["val_loss_std"])
        acc = "-" if r["val_acc_mean"] is None else _pm(r["val_acc_mean"], r["val_acc_std"],
                                                        ".4f")
        table.add_row(str(r["rank"]), r["name"], conf, loss, acc,
                      f"{r['diverged']}/{r['n_seeds']}")
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(highlight=False, soft_wrap=True, width=140)
    console.print(table)
    console.print(report["verdict"]["summary"])


def _pm(mean: float, std: float | None, fmt: str = ".4g") -> str:
    """mean ± std as report.md writes it (losses: 4 significant digits, so small losses stay
    apart); the std is None with one seed (nothing to show)."""
    return format(mean, fmt) + ("" if std is None else
                                f" ± {format(std, '.2g' if fmt == '.4g' else fmt)}")


def demo(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Optimizer steps per training run.")] = 300,
    trials: Annotated[int, typer.Option(help="Optuna trials per baseline.")] = 20,
    seeds: Annotated[int, typer.Option(help="Seeds per contender in the finals.")] = 3,
    out: Annotated[str | None, typer.Option(help="Run directory.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Only the report JSON.")] = False,
) -> None:
    """The embedded default: the bundled MLP on scikit-learn's digits (same as plain `fit`)."""
    fit(ctx, None, None, steps=steps, trials=trials, seeds=seeds, fine_tune=0, optimizer=None,
        batch_size=128, probe=0.1, race="halving", race_all=False, baselines="adam,sgd",
        target=None, device="auto", storage=None, study=None, n_jobs=1, seed=0, threads=None,
        zoo=None, out=out, resume=None, json_out=json_out, quiet=False)


def register(app: typer.Typer) -> None:
    app.command("fit", help=FIT_HELP)(fit)
    app.command("demo")(demo)
