"""Meta-training throughput: optimizee steps per second with B instances per rule call.

    python benchmarks/meta_throughput.py [--threads 2] [--batches 1 8 32] [--device cpu]
    python benchmarks/meta_throughput.py --task quadratic     # a 10-parameter optimizee

Meta-trains RNNprop (truncated BPTT, unroll 20, both tricks, "last" meta-loss) on a task (default
the digits MLP 64-20-10: 1510 parameters + 20 convex-term parameters per instance) and counts
optimizee steps per second summed over the B instances: one step of B instances counts B.  Also
times the inference path (``evaluate``'s loop: no graph, as when the learned optimizer is
used; the protocol's final-loss pass is not counted).  Writes
``benchmarks/results/meta_throughput.md`` (other tasks: ``meta_throughput-TASK.md``).

Batching removes per-step overhead (Python, kernel launches), not arithmetic: the speed-up is
large where the B = 1 loop is overhead-bound (small optimizees, GPUs) and small where the rule's
coordinatewise LSTM already keeps the CPU busy (the digits MLP).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import torch

from autol2o.meta import TrainConfig, build_task, meta_train
from autol2o.meta.evaluate import run_learned, run_seeds
from autol2o.meta.tasks import generators
from autol2o.optimizers import RNNprop

RESULTS = Path(__file__).parent / "results" / "meta_throughput.md"


CONVEX = 20  # the convex-combination term's extra coordinates per instance


def train_rate(task_name: str, batch: int, device: str, min_seconds: float) -> float:
    task = build_task(task_name, device=device)
    torch.manual_seed(0)
    rule = RNNprop()
    warm = TrainConfig(horizon=100, unroll=20, iterations=1, batch=batch, random_scaling=3.0,
                       convex_combination=True)
    meta_train(rule, task, warm, device=device, progress=False)
    iters = 1
    while True:
        cfg = TrainConfig(horizon=100, unroll=20, iterations=iters, batch=batch,
                          random_scaling=3.0, convex_combination=True, seed=1)
        t0 = time.perf_counter()
        meta_train(rule, task, cfg, device=device, progress=False)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or iters >= 64:
            return iters * cfg.unroll * batch / dt
        iters *= 2


def eval_rate(task_name: str, batch: int, device: str, steps: int = 50) -> float:
    """Inference steps/s: ``evaluate``'s learned-optimizer loop (loss, gradient, one rule call
    for all B instances) timed alone, without the protocol's final-loss pass (which is not an
    optimizer step) and after a warm-up call."""
    task = build_task(task_name, device=device)
    torch.manual_seed(0)
    rule = RNNprop().to(device)
    gens = generators(run_seeds(0, batch))
    theta0, plan = task.init_params(gens), task.make_plan(gens)

    def loop(n: int) -> None:
        theta = run_learned(rule, task, theta0, plan, n)
        if theta.is_cuda:
            torch.cuda.synchronize()

    loop(5)
    t0 = time.perf_counter()
    loop(steps)
    return steps * batch / (time.perf_counter() - t0)


def rule_floor(coords: int, batch: int, device: str) -> float:
    """Optimizee steps/s if the rule's differentiable forward + backward over ``batch`` instances
    of ``coords`` coordinates were the only cost."""
    torch.manual_seed(0)
    rule = RNNprop().to(device)
    n = batch * coords
    grad = torch.randn(n, device=device)
    best = float("inf")
    for _ in range(3):
        state = rule.init_state(n, device=device)
        t0 = time.perf_counter()
        total = 0
        for _ in range(20):
            update, state = rule(grad, state)
            total = total + update.sum()
        total.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 20 * batch / best


def other_load() -> str:
    try:
        load = os.getloadavg()
        top = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"],
                             capture_output=True, text=True).stdout.splitlines()[1:8]
        fields = [line.split() for line in top]
        busy = [" ".join(f[1:])[:70] for f in fields  # not this process, nor the ps probe itself
                if int(f[0]) != os.getpid() and float(f[1]) > 5.0 and f[2:3] != ["ps"]]
        return f"load average {load[0]:.2f}; busy processes: {', '.join(busy) or 'none'}"
    except Exception as exc:  # noqa: BLE001 - best effort description
        return f"unknown ({exc})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-seconds", type=float, default=8.0)
    ap.add_argument("--task", default="mlp-digits", help="task preset (default mlp-digits)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(args.task)
    coords = task.n_params + CONVEX
    before = other_load()
    rows = []
    for b in args.batches:
        tr = train_rate(args.task, b, args.device, args.min_seconds)
        ev = eval_rate(args.task, b, args.device)
        fl = rule_floor(coords, b, args.device)
        rows.append((b, tr, ev, fl))
        print(f"B={b:3d}  meta-train {tr:9.1f} steps/s   inference {ev:9.1f} steps/s   "
              f"rule-only bound {fl:9.1f} steps/s", flush=True)
    after = other_load()
    base_tr, base_ev = rows[0][1], rows[0][2]
    lines = [
        "# Meta-training throughput (benchmarks/meta_throughput.py)",
        "",
        f"RNNprop on `{args.task}` ({task.n_params} parameters + {CONVEX} convex-term parameters "
        f"per instance), truncated BPTT with "
        f"unroll 20, random scaling r=3, convex term; device `{args.device}`, "
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU cores.",
        "Optimizee steps/s count each of the B instances (one step of B instances = B steps).",
        "",
        "",
        "| B | meta-train steps/s | speed-up vs B=1 | inference steps/s | speed-up vs B=1 "
        "| rule fwd+bwd only (bound) |",
        "|---|---|---|---|---|---|",
    ]
    for b, tr, ev, fl in rows:
        lines.append(f"| {b} | {tr:.1f} | {tr / base_tr:.2f}x | {ev:.1f} | {ev / base_ev:.2f}x "
                     f"| {fl:.1f} |")
    fl1 = rows[0][3]
    best_b, best_tr = max(((b, tr) for b, tr, _, _ in rows), key=lambda r: r[1])
    share = base_tr / fl1
    # Whether the rule itself is compute-bound at B=1 shows in its own bound: if one call for B
    # instances is not much faster per coordinate than B=1 calls, flops (not call overhead) rule.
    rule_gain = max(r[3] for r in rows) / fl1
    lines += [
        "",
        f"The last column times only the rule's differentiable forward + backward over B x {coords}",
        "coordinates for 20 steps: an upper bound on meta-training throughput at that B.",
        f"At B=1 the full loop reaches {base_tr:.0f} steps/s = {100 * share:.0f}% of that bound "
        f"({fl1:.0f}): "
        + ("it is compute-bound in the rule's coordinatewise LSTM (~13k flops per coordinate per "
           "step forward, about 3x that with backward; the bound itself gains only "
           f"{rule_gain:.2f}x from batching), not in Python overhead, so batching can only remove "
           "the remaining share." if share > 0.5 and rule_gain < 2 else
           "most of each step is fixed overhead (Python, kernel calls; the rule's own bound gains "
           f"{rule_gain:.2f}x from batching), which one call for all B instances shares out."),
        f"Best meta-training speed-up: {best_tr / base_tr:.2f}x at B={best_b}; "
        + ("the >= 5x goal is met on this task." if best_tr / base_tr >= 5 else
           "the issue's >= 5x goal is NOT met on this task (it assumed Python overhead dominates "
           "at B=1; here it does not). Larger B also stops helping once the BPTT activations "
           "(about 1 GB per 16k coordinates over a 20-step unroll) fall out of cache."),
        "", f"Machine load before: {before}.", f"Machine load after: {after}.",
        "(ps %CPU is the lifetime average of each process; other helpers share these 2 cores.)",
        ""]
    out = RESULTS if args.task == "mlp-digits" else \
        RESULTS.with_name(f"meta_throughput-{args.task}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
