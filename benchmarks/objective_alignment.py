"""Does the paper's meta-training objective rank the zoo the way the evaluation does?

Truncated BPTT (the paper: 100-step runs cut into unrolls of 20, random scaling and the convex
term on) minimises, per run, the mean over the unrolls of the tricked loss at each unroll's end::

    J_paper(w) = E[ (1/K) sum_{k=1..K} F(theta_{kT}; batch_{kT}) ]       (T = 20, K = 5)

where F(theta) = f(c * theta) + convex term (c = exp(U(-3, 3)) per coordinate).  The evaluation
(authors' protocol) scores the *untricked* loss at step 100.  For each zoo entry this measures,
on the same instances and minibatches for every entry:

- ``eval``: the authors' protocol, 100 steps (what the issue's 0.8x bar is about);
- ``J_paper``: the value of the objective above (what the paper's trainer descends);
- ``J_paper@100``: the tricked loss at step 100 only (the same tricks, no truncation);
- ``J_noscale``: J with random scaling off (convex term kept), unrolls of 20;

plus Spearman's rank correlation of each objective with ``eval`` across the entries.  An entry
better at ``eval`` but worse at ``J_paper`` shows the objective itself preferring a worse
optimizer; better at both, with the paper's trainer still moving away from it (benchmarks/README,
stop 22), points at the truncated meta-gradient instead.

    python benchmarks/objective_alignment.py --data-dir ../shared/data/mnist --threads 2  # ~13 min

Writes ``benchmarks/results/objective_alignment.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from autol2o.meta import build_task
from autol2o.meta.evaluate import evaluate, loss_and_grad, run_seeds
from autol2o.meta.tasks import Task, generators
from autol2o.meta.trainer import Objective, TrainConfig
from autol2o.optimizers.base import LearnedRule
from autol2o.zoo import load_rule

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
DEFAULT_ENTRIES = ("rnnprop-mnist,rnnprop-mnist-v2,rnnprop-mnist-v3,rnnprop-mnist-v4,rnnprop-mix,"
                   "rnnprop-mlp300,rnnprop-long")


def segment_losses(rule: LearnedRule, task: Task, seeds: list[int], horizon: int, unroll: int,
                   random_scaling: float, convex: bool) -> torch.Tensor:
    """The tricked loss F(theta_{kT}; batch_{kT}) at the end of every unroll, ``(K, B)``: the
    terms the trainer's meta-loss ("last") is made of, built exactly as the trainer builds a run
    (:class:`Objective` from the same generators, in the same order).  Not through the
    trainer's ``_Run.unroll``: that keeps the graph to the meta-weights, gigabytes for 64 MNIST
    instances, where no gradient is needed (a test checks the two agree)."""
    config = TrainConfig(horizon=horizon, unroll=unroll, random_scaling=random_scaling,
                         convex_combination=convex, validate_every=0)
    gens = generators(seeds)
    theta0 = task.init_params(gens)
    plan = task.make_plan(gens)
    objective = Objective(task, gens, config)
    theta = objective.initial(theta0)
    state = rule.init_state(theta.numel(), device=theta.device, dtype=theta.dtype)
    ends = []
    for t in range(horizon + 1):
        loss, grad = loss_and_grad(objective.loss, theta, task.batch(plan, t))
        if t and t % unroll == 0:
            ends.append(loss)
        if t == horizon:
            break
        with torch.no_grad():
            update, state = rule(grad.reshape(-1), state)
            theta = theta + update.view_as(theta)
    return torch.stack(ends)


def mean_se(x: torch.Tensor) -> tuple[float, float, int]:
    """Mean and standard error of the finite values of ``x``, and how many were not finite (a
    run that diverged, which :func:`evaluate` drops from its mean too); s.e. nan below 2."""
    ok = x[torch.isfinite(x)]
    n = ok.numel()
    mean = float(ok.mean()) if n else float("nan")
    se = float(ok.std() / n ** 0.5) if n > 1 else float("nan")
    return mean, se, x.numel() - n


def paired_difference(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean of ``x - ref`` over the instances both finished, and its standard error: paired,
    so the instance-to-instance spread every entry shares cancels."""
    return mean_se(x - ref)[:2]


def fmt_se(mean: float, se: float, signed: bool = True) -> str:
    """``mean (+-se)`` to 4 decimals; the s.e. left out where it is nan (one instance)."""
    return f"{mean:{'+' if signed else ''}.4f}" + ("" if se != se else f" (+-{se:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist-nn-sigmoid")
    ap.add_argument("--horizon", type=int, default=100)
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--random-scaling", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=64, help="instances per objective and entry")
    ap.add_argument("--entries", default=DEFAULT_ENTRIES,
                    help="comma-separated zoo names or entry directories")
    ap.add_argument("--seed", type=int, default=777, help="instance seeds (not the trainers')")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "objective_alignment.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.horizon % args.unroll:
        sys.exit(f"--horizon {args.horizon} is not a multiple of --unroll {args.unroll}")
    task = build_task(args.task, data_dir=args.data_dir)
    seeds = run_seeds(args.seed, args.runs)
    entries = [e for e in args.entries.split(",") if e]
    t0 = time.perf_counter()

    rows = []
    for name in entries:
        rule = load_rule(name)
        ev = evaluate(rule, task, steps=args.horizon, runs=args.runs, seed=args.seed)
        paper = segment_losses(rule, task, seeds, args.horizon, args.unroll,
                               args.random_scaling, True)
        noscale = segment_losses(rule, task, seeds, args.horizon, args.unroll, 0.0, True)
        per_run = paper.mean(0)
        j_paper, se_paper, bad = mean_se(per_run)
        j_noscale, _, bad_noscale = mean_se(noscale.mean(0))
        row = {"entry": Path(name).name, "eval": ev.final_loss, "J_paper": j_paper,
               "se_paper": se_paper, "J_paper@100": mean_se(paper[-1])[0],
               "J_noscale": j_noscale, "per_run": per_run,
               "diverged": f"{ev.diverged} / {bad} / {bad_noscale}"}
        rows.append(row)
        print(f"{row['entry']:<24} eval {row['eval']:.4f}  J_paper {row['J_paper']:.4f} "
              f"(+-{row['se_paper']:.4f})  J_paper@100 {row['J_paper@100']:.4f}  "
              f"J_noscale {row['J_noscale']:.4f}  diverged {row['diverged']}", file=sys.stderr)

    cols = ["J_paper", "J_paper@100", "J_noscale"]
    evals = [r["eval"] for r in rows]
    lines = [
        "# The paper's meta-training objective against the evaluation",
        "",
        f"Task `{args.task}`, {args.horizon} steps, unrolls of {args.unroll}, random scaling "
        f"r = {args.random_scaling:g} (`J_noscale`: r = 0), convex term on; {args.runs} instances "
        f"(seed {args.seed}), the same for every entry and column. Lower is better everywhere. "
        f"`benchmarks/objective_alignment.py` (module doc: what each column is); "
        f"{time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Command: `python benchmarks/objective_alignment.py "
        f"{' '.join(sys.argv[1:])}`",
        "",
        f"`J_paper - best` is J_paper minus that of the entry best at `eval` "
        f"(`{min(rows, key=lambda r: r['eval'])['entry']}`), +- the paired standard error over "
        "the instances (every entry ran the same ones).",
        "",
        "| entry | eval (authors' protocol) | J_paper (+- s.e.) | J_paper - best | J_paper@100 "
        "| J_noscale | diverged (eval / J_paper / J_noscale) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    best = min(rows, key=lambda r: r["eval"])["per_run"]
    for r in sorted(rows, key=lambda r: r["eval"]):
        paired = fmt_se(*paired_difference(r["per_run"], best))
        j_paper = fmt_se(r["J_paper"], r["se_paper"], signed=False)
        lines.append(f"| `{r['entry']}` | {r['eval']:.4f} | {j_paper} | {paired} | {r['J_paper@100']:.4f} "
                     f"| {r['J_noscale']:.4f} | {r['diverged']} |")
    if len(rows) >= 5:  # below that a rank correlation says nothing (n = 3: p = 0 at +-1)
        corr = {c: spearmanr(evals, [r[c] for r in rows]) for c in cols}
        lines += ["", f"Spearman rank correlation with `eval` over the {len(rows)} entries (ties "
                  "get their average rank; p: two-sided, against unrelated rankings): " + ", ".join(
                      f"{c} {corr[c].statistic:+.2f} (p = {corr[c].pvalue:.2g})" for c in cols) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
