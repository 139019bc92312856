"""Learned optimizers on a paper CNN far past their meta-training horizon, against tuned Adam.

The default entries were meta-trained on MLP runs of 100 (``rnnprop-mlp300``: 300) steps; the
paper and ``paper.py`` test the CNNs at 100 steps only, and Open-L2O reports RNNprop stalling on
a ConvNet over long runs.  This runs one task (default ``mnist-cnn1``, the paper's first MNIST CNN)
for ``--steps`` (default 1000) under the authors' protocol (:func:`autol2o.meta.evaluate`: same
inits and minibatches for every contender; final loss = mean over the N minibatches of the loss
at the final parameters).  Adam, the best tuned baseline on every CNN row of the full paper run,
is tuned on the sqrt(2) grid between ``--adam-grid LO:HI`` (powers of 2) on *other* seeds than
the final runs; the learned entries are not tuned.

    python benchmarks/cnn_horizon.py --data-dir ../shared/data/mnist --threads 2   # ~30 min

Writes ``benchmarks/results/cnn_horizon.md`` (table) and ``cnn_horizon.png`` (mean loss curves).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from autol2o.meta import build_task
from autol2o.meta.evaluate import EvalResult, baseline, evaluate, sqrt2_grid, tune_lr, tuning_score
from autol2o.zoo import load_rule

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist-cnn1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=6, help="final runs per contender")
    ap.add_argument("--tune-runs", type=int, default=3, help="runs per Adam grid point")
    ap.add_argument("--adam-grid", default="-9.5:-6.5",
                    help="LO:HI exponents of 2, sqrt(2) steps (write --adam-grid=-9.5:-6.5)")
    ap.add_argument("--entries", default="rnnprop-mlp300,rnnprop-mnist-v3,rnnprop-mnist-v2")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "cnn_horizon.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lo, hi = (float(x) for x in args.adam_grid.split(":"))
    task = build_task(args.task, data_dir=args.data_dir)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    best_lr, tuned = tune_lr(lambda lr: baseline("adam", lr), task, args.steps,
                             sqrt2_grid(lo, hi), args.tune_runs, seed=1, log=log)
    tuning = {lr: tuning_score(res) for lr, res in tuned.items()}
    results: dict[str, EvalResult] = {
        "adam": evaluate(baseline("adam", best_lr), task, args.steps, args.runs, seed=0)}
    log(f"adam @ {best_lr:.4g}: {results['adam'].final_loss:.4g}")
    names = [n.strip() for n in args.entries.split(",") if n.strip()]
    for name in names:
        results[name] = evaluate(load_rule(name), task, args.steps, args.runs, seed=0)
        log(f"{name}: {results[name].final_loss:.4g} ({results[name].diverged} diverged)")

    adam = results["adam"].final_loss
    edge = best_lr in (min(tuning), max(tuning))
    lines = [f"# `{args.task}` for {args.steps} steps: learned optimizers past their horizon", "",
             f"Authors' protocol, {args.runs} runs (mean ± std); Adam tuned on the sqrt(2) grid "
             f"2^{lo:g}..2^{hi:g} with {args.tune_runs} runs per rate on separate seeds: best "
             f"lr {best_lr:.4g} (2^{math.log2(best_lr):g})"
             + (", at the grid's edge" if edge else "") + ". Learned entries untuned. "
             f"Wall time {(time.perf_counter() - t0) / 60:.1f} min, torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s); command: "
             f"`python benchmarks/cnn_horizon.py {' '.join(sys.argv[1:])}`", "",
             "| optimizer | final loss | worst run | ratio to tuned Adam | diverged |",
             "|---|---|---|---|---|"]
    for name, res in results.items():
        ok = res.final_losses[torch.isfinite(res.final_losses)]
        worst = f"{float(ok.max()):.4g}" if ok.numel() else "-"
        label = f"Adam (lr {best_lr:.4g})" if name == "adam" else name
        # as in paper.py, a contender with a diverged run has no ratio: its mean over the
        # other runs would flatter it
        ratio = (f"{res.final_loss / adam:.2f}" if not res.diverged and not results["adam"].diverged
                 else "diverged")
        loss = (f"{res.final_loss:.4g} ± {res.final_loss_std:.2g}" if ok.numel() else "diverged")
        lines.append(f"| {label} | {loss} | {worst} | {ratio} | {res.diverged} |")
    lines += ["", "Adam's tuning losses: " + ", ".join(f"{lr:.4g}: {v:.4g}"
                                                      for lr, v in tuning.items()), ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    _plot(results, args.out.with_suffix(".png"), args.task, args.steps)


def _plot(results: dict[str, EvalResult], path: Path, task: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        c = res.curves[:, torch.isfinite(res.curves).all(0)]
        if c.shape[1] == 0:
            continue
        # a 25-step running mean: single minibatch losses of a CNN are too noisy to read
        k = min(25, c.shape[0])
        m = torch.nn.functional.avg_pool1d(c.mean(1)[None, None], k, 1)[0, 0]
        label = name + (f" ({res.diverged} diverged, not drawn)" if res.diverged else "")
        ax.plot(torch.arange(k, c.shape[0] + 1), m, "--" if name == "adam" else "-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over runs, 25-step running mean)")
    ax.set_title(f"{task}, {steps} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
