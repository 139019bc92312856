"""What ``autol2o fit --fine-tune`` buys, and why its meta-objective is a held-out loss.

On the embedded digits default (the bundled 64-64-10 ReLU MLP, 300 steps) this runs the whole
``autol2o fit`` pipeline three times, each with its own Optuna studies (same seed, so the same
tuned baselines; the table checks that) and the same finals seeds:

* **zoo as shipped**: the race picks an entry, no fine-tuning;
* **fine-tuned, held-out objective** (what ``--fine-tune N`` does): N meta-iterations on the
  user's task, each run scored on its own random 20% of the training data it does not train on;
* **fine-tuned, training objective** (the control, the papers' meta-objective): the same
  meta-training settings (:func:`autol2o.fit.pipeline.fine_tune_config`) with the meta-loss on
  the training minibatches, then raced through the same finals with ``--optimizer``.

The finals compare validation loss (``--seeds`` seeds) against Optuna-tuned Adam and SGD.

    python benchmarks/fine_tune.py [--iterations 300] [--seeds 5] [--threads 2]

Writes ``benchmarks/results/fine_tune.md`` (run directories under ``--runs``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from autol2o.fit import FitConfig, Problem, default_example, fit_files, load_data, load_model_file
from autol2o.fit.pipeline import fine_tune_config, fine_tune_task, resolve_device
from autol2o.fit.progress import Reporter
from autol2o.meta import meta_train
from autol2o.zoo import load_rule, save_entry


def finals_row(arm: str, report: dict, extra: str) -> str:
    board = {r["name"]: r for r in report["leaderboard"]}
    learned = next(r for r in report["leaderboard"] if r["kind"] == "learned")
    adam = board.get("adam")

    ratio = (f"{learned['val_loss_mean'] / adam['val_loss_mean']:.2f}x"
             if adam and None not in (learned["val_loss_mean"], adam["val_loss_mean"]) else "-")
    acc = "-" if learned["val_acc_mean"] is None else f"{learned['val_acc_mean']:.4f}"
    return (f"| {arm} | {learned['name']} | {extra} | {cell(learned)} | {acc} | {ratio} | "
            f"{cell(adam) if adam else '-'} | {report['verdict']['winner']} |")


def cell(r: dict) -> str:
    """mean ± std of a leaderboard row (std: none with one seed)."""
    if r["val_loss_mean"] is None:
        return f"diverged ({r['diverged']} of {r['n_seeds']})"
    std = "" if r["val_loss_std"] is None else f" ± {r['val_loss_std']:.4f}"
    return f"{r['val_loss_mean']:.4f}{std}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fine_tune.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="fine-tune-"))
    model_path = default_example()
    base = FitConfig(seeds=args.seeds, threads=args.threads)
    rows, notes = [], []

    t0 = time.perf_counter()
    r0 = fit_files(model_path, None, base, out=runs / "shipped", reporter=Reporter(True)).report
    picked = r0["race"]["picked"]
    adam = next(r for r in r0["leaderboard"] if r["name"] == "adam")
    rows.append(finals_row("zoo as shipped", r0, f"race: {picked}, no meta-training"))
    notes.append(f"shipped: {time.perf_counter() - t0:.0f} s")

    t0 = time.perf_counter()
    cfg = replace(base, fine_tune=args.iterations)
    r1 = fit_files(model_path, None, cfg, out=runs / "heldout", reporter=Reporter(True)).report
    ft = r1["fine_tune"]
    rows.append(finals_row(
        "fine-tuned, held-out objective (`--fine-tune`)", r1,
        f"{ft['iterations']} iterations, best at {ft['best_iteration']}, "
        f"{'used' if ft['used'] else 'not used'}, {ft['wall_time']:.0f} s"))
    notes.append(f"held-out: {time.perf_counter() - t0:.0f} s")

    # the control: the same meta-training settings, the meta-loss on the training minibatches
    t0 = time.perf_counter()
    problem = Problem(load_model_file(model_path), load_data(None, seed=base.seed),
                      device=resolve_device(base.device))
    rule = load_rule(picked)
    tc = fine_tune_config(cfg, rule, meta_data="train")
    res = meta_train(copy.deepcopy(rule), fine_tune_task(problem, cfg, holdout=0.0), tc,
                     progress=True)
    path = save_entry(res.rule, runs / "zoo-train-objective" / f"{picked}-ft-train",
                      {"name": f"{picked}-ft-train", "base": picked}, overwrite=True)
    meta_wall = time.perf_counter() - t0
    r2 = fit_files(model_path, None, replace(base, optimizer=str(path)), out=runs / "train",
                   reporter=Reporter(True)).report
    rows.append(finals_row(
        "fine-tuned, training objective (control)", r2,
        f"{args.iterations} iterations, best at {res.best_iteration}, {meta_wall:.0f} s"))
    notes.append(f"control: {time.perf_counter() - t0:.0f} s")

    lines = [
        "# fine_tune: `autol2o fit --fine-tune` on the embedded digits default", "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s). "
        f"Command: `python benchmarks/fine_tune.py --iterations {args.iterations} --seeds "
        f"{args.seeds} --threads {args.threads}`.", "",
        "Model: the bundled 64-64-10 ReLU MLP on scikit-learn's digits (1437 train / 360 "
        "validation, standardised), 300 steps, batch 128; Adam and SGD tuned by Optuna (20 "
        f"trials each, seed 0); finals on {args.seeds} fresh seeds, the same for every "
        "contender. Validation loss at the last step, mean ± std over the seeds. "
        f"Tuned Adam: **{cell(adam)}** (accuracy {adam['val_acc_mean'] or float('nan'):.4f}).",
        "",
        "| fine-tuning | learned optimizer | meta-training | val loss | val acc | vs tuned Adam "
        "| tuned Adam in this run | winner |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "Wall times: " + "; ".join(notes) + ".", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
