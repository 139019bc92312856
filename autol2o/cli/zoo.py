"""``autol2o zoo list | show | train``: browse the pretrained zoo and add to it.

Tables and cards go to stdout (``--json`` for machines); training progress goes to stderr.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="List, show and train pretrained learned optimizers.", no_args_is_help=True)

RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Zoo directory (default: $AUTOL2O_ZOO, else the shipped zoo)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def summary(entry) -> dict[str, Any]:
    """The fields ``zoo list`` shows, taken from a card (missing fields become ``None``)."""
    card = entry.card
    training = card.get("training") or {}

    def field(*keys: str) -> Any:  # top-level card fields first, then a "training" section
        for key in keys:
            for src in (card, training):
                if src.get(key) is not None:
                    return src[key]
        return None

    weights = entry.weights_path
    return {
        "name": entry.name,
        "path": str(entry.path),
        "rule": card.get("rule"),
        "trained_on": [_task_label(t) for t in card.get("tasks") or []],
        "horizon": field("max_horizon", "horizon"),
        "meta_iterations": field("meta_iterations", "iterations"),
        "n_meta_params": card.get("n_meta_params"),
        "size_bytes": weights.stat().st_size if weights.is_file() else None,
        "headline": (card.get("evaluation") or {}).get("headline"),
        "race": entry.races,  # `autol2o fit` races it (--race-all overrides an opt-out)
        "error": entry.error,
    }


def _task_label(spec: Any) -> str:
    if isinstance(spec, dict):
        for key in ("label", "name", "kind", "task"):
            if spec.get(key):
                return str(spec[key])
    return str(spec)


def _console():
    from rich.console import Console

    return Console(soft_wrap=False)


@app.command("list")
def list_cmd(root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """List the zoo: name, rule, training tasks, horizon, meta-iterations, size, whether `fit`
    races it, headline."""
    from autol2o.errors import UserError
    from autol2o.zoo import ZooError, list_entries, verified_weights, zoo_root

    base = zoo_root(root)
    if not base.is_dir():
        raise UserError(f"{base}: zoo directory not found")
    entries = list_entries(base)
    for e in entries:  # the listing vouches for what `fit` will load: check every checksum
        if e.error is None:
            try:
                verified_weights(e.path, e.card)
            except ZooError as exc:
                e.error = str(exc)
    rows = [summary(e) for e in entries]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no zoo entries in {base}", err=True)
        return
    con = _console()
    if con.width < WIDE_TABLE:
        _print_entries(con, rows, base)
        return
    from rich.table import Table

    table = Table(title=f"autol2o zoo ({base})")
    for col in ("name", "rule", "trained on", "horizon", "meta-iters", "size", "raced",
                "headline result"):
        # a name must not wrap ("rnnprop-l / ong"); the long cells fold
        table.add_column(col, overflow="fold", no_wrap=col in ("name", "rule", "raced"))
    for r in rows:
        table.add_row(r["name"], str(r["rule"]), ", ".join(r["trained_on"]) or "?",
                      _fmt(r["horizon"]), _fmt(r["meta_iterations"]), _size(r),
                      "yes" if r["race"] else "no", _headline(r))
    con.print(table)
    if not all(r["race"] for r in rows):
        con.print("raced: whether `autol2o fit` races the entry (no: the card says "
                  '"race": false; `fit --race-all` races it too)', soft_wrap=True)


#: terminal width from which ``zoo list`` prints one table row per entry; narrower terminals
#: (80 columns, CI logs) get a block per entry, since eight columns fold the headline into a
#: one-word-wide strip there
WIDE_TABLE = 120


def _size(r: dict) -> str:
    return (f"{r['n_meta_params']} params, {r['size_bytes'] / 1024:.1f} KiB"
            if r["size_bytes"] is not None else "?")


def _headline(r: dict) -> str:
    return f"unusable: {r['error']}" if r["error"] else r["headline"] or "not evaluated"


def _print_entries(con, rows: list[dict], root) -> None:
    """``zoo list`` for narrow terminals: the same fields, one block per entry."""
    from rich.markup import escape

    con.print(f"[bold]autol2o zoo[/bold] ({escape(str(root))})")
    for r in rows:
        con.print(f"\n[bold]{escape(r['name'])}[/bold]  {escape(str(r['rule']))}, horizon "
                  f"{_fmt(r['horizon'])}, {_fmt(r['meta_iterations'])} meta-iterations, "
                  f"{_size(r)}" + ("" if r["race"] else ", not raced by fit (--race-all)"),
                  soft_wrap=True)
        con.print(f"  trained on: {escape(', '.join(r['trained_on']) or '?')}", soft_wrap=True)
        con.print(f"  headline:   {escape(_headline(r))}", soft_wrap=True)


@app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Zoo entry name, or a path to an entry directory.")],
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an entry's card (after verifying its weights' checksum)."""
    from autol2o.zoo import load_entry, resolve

    path = resolve(name, root)
    _, card = load_entry(path)
    if as_json:
        typer.echo(json.dumps(card, indent=2))
        return
    from rich.pretty import Pretty
    from rich.rule import Rule

    con = _console()
    con.print(Rule(f"{path.name}  ({path})"))
    if card.get("name") not in (None, path.name):  # e.g. a renamed entry directory
        con.print(f"card name: {card['name']} (look it up as {path.name})")
    con.print(Pretty(card, expand_all=True))
    con.print(f"weights: {path / 'weights.safetensors'} (sha256 verified)")


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Entry directory to write, e.g. pretrained/NAME.")],
    rule: Annotated[str, typer.Option("--rule", help="Learned rule: rnnprop or dm.")] = "rnnprop",
    task: Annotated[list[str] | None, typer.Option(
        "--task", help="Training task (repeatable): a preset, e.g. mlp-digits, mnist-nn-sigmoid, "
                       "or a task spec as JSON, as in a card's tasks.")] = None,
    horizon: Annotated[int, typer.Option(
        help="Optimizee steps per run (with --curriculum: leave out, it sets the horizons).")] = 100,
    unroll: Annotated[int, typer.Option(
        help="Steps per truncated-BPTT segment (<= the horizon; a curriculum stage shorter "
             "than it is unrolled whole).")] = 20,
    iterations: Annotated[int, typer.Option(
        help="Meta-iterations: meta-updates, one per unroll (a run of --horizon steps takes "
             "horizon/unroll of them).")] = 200,
    batch: Annotated[int, typer.Option(help="Optimizee instances trained at once.")] = 8,
    meta_lr: Annotated[float, typer.Option("--meta-lr", help="Adam learning rate on meta-weights.")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(
        "--lr-schedule", help="Meta learning-rate schedule: constant or cosine (decays to 0).")] = "constant",
    warmup: Annotated[int, typer.Option(
        "--warmup", help="Iterations of linear meta-lr warmup (useful with --init).")] = 0,
    ema: Annotated[float, typer.Option(
        "--ema", help="Average the meta-weights: w_avg <- ema*w_avg + (1-ema)*w after each "
                      "update; validation and the entry use w_avg (0: off; e.g. 0.99).")] = 0.0,
    magnitude: Annotated[bool, typer.Option(
        "--magnitude", help="RNNprop with a third input, log of the gradient RMS (not in the "
                            "paper: lets it learn momentum-SGD-like steps; see benchmarks/"
                            "README.md).")] = False,
    init: Annotated[str | None, typer.Option(
        "--init", help="Start from this zoo entry's weights (name or directory) instead of "
                       "a random init.")] = None,
    random_scaling: Annotated[bool | None, typer.Option(
        "--random-scaling/--no-random-scaling",
        help="Random scaling trick (default: on for rnnprop, off for dm).")] = None,
    convex: Annotated[bool | None, typer.Option(
        "--convex/--no-convex",
        help="Add the random convex term (default: on for rnnprop, off for dm).")] = None,
    meta_batch_size: Annotated[int, typer.Option(
        "--meta-batch-size",
        help="Score the meta-loss on a separate batch of this many examples (0: the step's own "
             "minibatch, as in the paper; e.g. 2048 cuts meta-gradient noise).")] = 0,
    meta_data: Annotated[str, typer.Option(
        "--meta-data",
        help="Score the meta-loss on 'train' (the paper: fast training loss) or 'heldout' "
             "examples (the first half of the dataset's test split; fresh sin-LSTM waves): a "
             "rule for low validation loss. --meta-batch-size of them per scored step (0: "
             "1024); validation scores the test split's other half.")] = "train",
    log_loss: Annotated[bool, typer.Option(
        "--log-loss/--no-log-loss",
        help="Meta-train on log(loss), so tasks on different loss scales weigh alike.")] = False,
    relative_loss: Annotated[bool, typer.Option(
        "--relative-loss/--no-relative-loss",
        help="Meta-train on loss / (the run's loss at step 0): tasks on different scales weigh "
             "alike without log(loss)'s unbounded weight on a loss near 0.")] = False,
    second_order: Annotated[bool, typer.Option(
        "--second-order/--first-order",
        help="Keep second derivatives: the exact meta-gradient of each unroll (measured at "
             "about the first-order cost on the MNIST MLP); both papers drop them "
             "(--first-order).")] = False,
    curriculum: Annotated[str | None, typer.Option(
        help="Horizons to move through: 'ITER:HORIZON,...' starting at iteration 0 (e.g. "
             "0:100,200:500,400:1000), or bare horizons spread evenly over --iterations (e.g. "
             "100,200,500,1000).")] = None,
    validate_every: Annotated[int, typer.Option(
        "--validate-every", help="Validate every K meta-iterations and keep the best (0: off).")] = 0,
    val_runs: Annotated[int, typer.Option(
        "--val-runs", help="Optimizee runs per validation (more: less noisy best-pick).")] = 8,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Checkpoint every K meta-iterations (for --resume).")] = 25,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Directory with the MNIST IDX .gz files (for MNIST tasks).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for everything.")] = 0,
    resume: Annotated[bool, typer.Option(
        help="Continue the interrupted run in --out, with the same settings (--iterations may "
             "grow).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing entry, or an interrupted run, at --out.")] = False,
) -> None:
    """Meta-train a learned optimizer and write it to the zoo as ``--out``."""
    from autol2o.errors import UserError
    from autol2o.meta.cli_support import resolve_device, rule_options

    if lr_schedule not in ("constant", "cosine"):
        raise UserError(f"--lr-schedule must be constant or cosine, got {lr_schedule!r}")
    options = rule_options(rule, magnitude)
    device = resolve_device(device)
    stages = _parse_curriculum(curriculum, iterations)
    # the curriculum sets the horizons; --horizon has a default, so only one given on the
    # command line can conflict (and an equal one is accepted: older cards' commands have it)
    from autol2o.cli import option_given

    if stages and horizon != stages[0][1] and option_given(ctx, "horizon"):
        raise UserError(f"--horizon {horizon} conflicts with --curriculum, which starts at "
                        f"horizon {stages[0][1]} (the curriculum sets the horizons; drop --horizon)")
    from autol2o.meta import TrainConfig, paper_recipe, train_to_zoo

    recipe = paper_recipe(rule)

    # validated here, before train_to_zoo creates anything
    config = TrainConfig(
        horizon=stages[0][1] if stages else horizon, unroll=unroll, iterations=iterations,
        meta_lr=meta_lr, lr_schedule=lr_schedule, warmup=warmup, ema=ema, batch=batch,
        seed=seed, curriculum=tuple(stages),
        meta_loss=recipe["meta_loss"], log_loss=log_loss, relative_loss=relative_loss,
        meta_batch_size=meta_batch_size, meta_data=meta_data, second_order=second_order,
        random_scaling=recipe["random_scaling"] if random_scaling is None else
        (3.0 if random_scaling else 0.0),
        convex_combination=recipe["convex_combination"] if convex is None else convex,
        validate_every=validate_every, val_runs=val_runs, checkpoint_every=checkpoint_every)
    # the canonical command (every setting explicit, --resume dropped) reproduces the entry
    argv = ["--rule", rule, *[a for t in (task or ["mlp-digits"]) for a in ("--task", t)],
            *(["--curriculum", ",".join(f"{i}:{h}" for i, h in stages)] if stages
              else ["--horizon", horizon]),
            "--unroll", unroll, "--iterations", iterations, "--batch", batch,
            "--meta-lr", meta_lr, "--lr-schedule", lr_schedule, "--warmup", warmup,
            *(["--ema", ema] if ema else []),
            *(["--magnitude"] if magnitude else []),
            *(["--init", init] if init else []),
            "--random-scaling" if config.random_scaling else "--no-random-scaling",
            "--convex" if config.convex_combination else "--no-convex",
            *(["--log-loss"] if log_loss else []),
            *(["--relative-loss"] if relative_loss else []),
            *(["--meta-batch-size", meta_batch_size] if meta_batch_size else []),
            *(["--meta-data", meta_data] if meta_data != "train" else []),
            *(["--second-order"] if second_order else []),
            "--validate-every", validate_every, "--val-runs", val_runs,
            *(["--data-dir", data_dir] if data_dir else []),
            "--seed", seed, "--out", out]
    command = "autol2o zoo train " + " ".join(shlex.quote(str(a)) for a in argv)
    path = train_to_zoo(rule, list(task or ["mlp-digits"]), config, out, data_dir, device,
                        resume, command, init=init, overwrite=overwrite,
                        rule_options=options)
    typer.echo(str(path))


def _parse_curriculum(text: str | None, iterations: int) -> list[tuple[int, int]]:
    """``--curriculum`` as the trainer's ``(from_iteration, horizon)`` pairs."""
    from autol2o.errors import UserError
    from autol2o.meta.trainer import even_stages

    if not text:
        return []
    items = [x for x in text.replace(" ", "").split(",") if x]
    try:
        if all(":" in x for x in items):
            pairs = [x.split(":") for x in items]
            if any(len(p) != 2 for p in pairs):  # e.g. 0:10:999
                raise ValueError
            stages = [(int(a), int(h)) for a, h in pairs]
        else:  # bare horizons: equal shares of the iterations
            stages = even_stages([int(x) for x in items], iterations)
    except ValueError:
        raise UserError(f"--curriculum must be 'ITER:HORIZON,...' or horizons, got {text!r}") from None
    if not stages or any(h <= 0 or i < 0 for i, h in stages):
        raise UserError(f"--curriculum horizons must be positive, got {text!r}")
    stages.sort()
    # the curriculum alone sets the horizons (--horizon is refused with it), so it must say
    # which one the first iterations use
    if stages[0][0] != 0:
        raise UserError(f"--curriculum must start at iteration 0, got {text!r}")
    return stages


def _fmt(x: Any) -> str:
    return "?" if x is None else str(x)
