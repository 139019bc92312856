"""Each zoo entry (and Adam at given rates) on `fit_vs_optuna.py`'s MNIST model, outside the race.

The question behind issue 4's MNIST row: how many steps does a learned rule need to reach a
target validation loss on the 784-64-10 ReLU MLP, when nobody picks it by a probe?  Every
contender trains the same initial weights on the same minibatches as `autol2o fit`'s finals
(seeds ``--seed + 1 ... --seed + 3``, the pipeline's batch size and validation grid), and the
table gives, per seed, the first validation step at or below ``--target`` (default 0.1270: the
best validation loss of the 20-trial Optuna-Adam study in `results/fit_vs_optuna.md`), the
final validation loss, and the validation loss every 100 steps.

    python benchmarks/zoo_on_fit.py --data-dir ../shared/data/mnist \\
        --entries rnnprop-mnist-v3,rnnprop-mlp300 --adam 0.0103

Writes ``benchmarks/results/zoo_on_fit.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fit_vs_optuna import MNIST_MODEL

from autol2o.fit import FitConfig, Problem, load_data, load_model_file
from autol2o.fit.pipeline import resolve_device
from autol2o.fit.train import OptSpec, default_eval_every, train_run
from autol2o.zoo import list_entries, load_rule, shipped_root


def contenders(entries: str | None, adam: list[float]) -> list[OptSpec]:
    names = entries.split(",") if entries else [e.name for e in list_entries(shipped_root())
                                                 if e.races]
    specs = [OptSpec("learned", n, rule=load_rule(n)) for n in names]
    return specs + [OptSpec("adam", f"adam lr {lr:g}", {"lr": lr}) for lr in adam]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="directory with the MNIST idx .gz files")
    ap.add_argument("--entries", help="comma-separated zoo entries (default: the racing ones)")
    ap.add_argument("--adam", default="0.0103", help="comma-separated Adam rates ('' for none)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--target", type=float, default=0.1270)
    ap.add_argument("--seed", type=int, default=0, help="fit's --seed; finals use seed+1..+3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_on_fit.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_path = Path(tempfile.mkdtemp(prefix="zoo_on_fit-")) / "mnist_mlp.py"
    model_path.write_text(MNIST_MODEL)
    p = Problem(load_model_file(model_path), load_data(args.data_dir, seed=args.seed),
                resolve_device("cpu"))
    p.check()
    every = default_eval_every(args.steps)
    batch = FitConfig().batch_size  # what `autol2o fit` trains with by default
    seeds = [args.seed + 1 + i for i in range(3)]
    adam = [float(x) for x in args.adam.split(",") if x.strip()]
    rows, t0 = [], time.perf_counter()
    for spec in contenders(args.entries, adam):
        runs = [train_run(p, spec, steps=args.steps, seed=s, batch_size=batch, eval_every=every)
                for s in seeds]
        # a diverged run stops early with an infinite loss: it is counted, not averaged
        ok = [r for r in runs if not r.diverged]
        finals = [r.val_loss[-1] for r in ok]
        reach = [None if r.diverged else r.steps_to_reach(args.target) for r in runs]
        curve = {s: statistics.mean(r.val_loss[i] for r in ok)
                 for i, s in enumerate(ok[0].steps) if s % 100 == 0 and s > 0} if ok else {}
        mean = statistics.mean(finals) if finals else math.inf
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        rows.append((spec.name, reach, mean, std, len(runs) - len(ok), curve))
        print(f"{spec.name}: reaches {args.target} at {reach}, final {mean:.4f}", flush=True)
    wall = time.perf_counter() - t0

    marks = sorted({s for *_, curve in rows for s in curve})
    lines = [
        "# Zoo entries on `fit_vs_optuna.py`'s MNIST model, outside the race",
        "",
        f"784-64-10 ReLU MLP on MNIST (`fit`'s split, seed {args.seed}), {args.steps} steps, "
        f"batch {batch}, validation every {every} steps; seeds {seeds} (the finals' seeds); "
        f"target = validation loss {args.target}. Wall time {wall:.0f} s on "
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s). "
        f"Command: `python benchmarks/zoo_on_fit.py --data-dir DIR"
        + (f" --entries {args.entries}" if args.entries else "")
        + f" --adam {args.adam} --steps {args.steps} --target {args.target}`.",
        "",
        "| contender | first step <= target (per seed) | final val loss (mean ± std) | diverged | "
        + " | ".join(f"val @{s}" for s in marks) + " |",
        "|---|---|---|---|" + "---|" * len(marks),
    ]
    for name, reach, mean, std, div, curve in rows:
        r = " / ".join("never" if s is None else str(s) for s in reach)
        lines.append(f"| {name} | {r} | {mean:.4f} ± {std:.4f} | {div} | "
                     + " | ".join(f"{curve[s]:.4f}" if s in curve else "-" for s in marks)
                     + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
