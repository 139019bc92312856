"""Reproduce the RNNprop paper's experiments at CPU scale, with tables and loss-curve plots.

Every experiment runs the authors' protocol (:func:`autol2o.meta.evaluate`): each contender sees
the same initial parameters and the same minibatches; the reported loss is the mean over the N
minibatches of the loss at the final parameters, averaged over ``--runs`` runs (mean and std).

Contenders: the zoo's learned optimizers (full mode: ``rnnprop-mnist-v4``, ``rnnprop-mnist-v3``,
``rnnprop-mnist-v2``, ``rnnprop-mnist``, ``rnnprop-mix``, ``dm-mnist``; ``--quick``: the two RNNprop
entries the issue names, ``rnnprop-mnist`` and ``rnnprop-mix``; or the entries given with
``--learned NAME_OR_DIR ...``) with no tuning at all, and Adam, RMSProp, SGD and NAG (momentum 0.9),
each tuned over the paper's learning-rate grid 2^-12, 2^-11.5, ..., 2^0 (powers of sqrt 2). Tuning
uses *other* seeds than the final evaluation (a coarse pass over powers of 2, then the sqrt(2)
neighbours of the best; quick mode: powers of 4, then 2, then sqrt 2), so the baselines' numbers are
not inflated by picking the luckiest runs. A contender with a diverged run scores as diverged (never
best, never a win); "RNNprop / best baseline" takes the best of the RNNprop contenders, and the
report also counts each one's wins alone.

    python benchmarks/paper.py --quick                     # < 10 min on 2 cores
    python benchmarks/paper.py --data-dir ../shared/data/mnist   # full; hours; resumable

Full mode: 20 runs, 5 tuning runs per grid point, every task below.  ``--quick``: 5 runs, 1
tuning run, and a subset: the training task, one longer horizon (1000 steps, only Adam tuned),
the three activations, depths 2/6/10, ``mnist-cnn1`` and ``sin-lstm``.  ``--device cuda``
results are cached under their own keys (see :func:`task_key`).

To score a new entry against the same tuned baselines without re-tuning them, copy the cache
into a new ``--out`` and pass ``--learned rnnprop-mnist path/to/entry``: only the new entry's
evaluations are computed (results are keyed by each entry's checksum).

Results: ``benchmarks/results/paper.md`` and ``benchmarks/results/paper-*.png``; every single
evaluation is cached in ``paper-cache-{quick,full}.json`` so an interrupted run resumes where it
stopped.  The cache is not committed: in a fresh checkout a rerun sees none of the committed
report's rows, so a report that would lose rows or contenders goes to ``paper.new.md``
(``--force`` replaces ``paper.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from autol2o.meta import build_task
from autol2o.meta.evaluate import baseline, evaluate, sqrt2_grid
from autol2o.meta.tasks import preset_spec

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
LEARNED = ["rnnprop-mnist-v4", "rnnprop-mnist-v3", "rnnprop-mnist-v2", "rnnprop-mnist", "rnnprop-mix",
           "dm-mnist"]
# --quick scores the two RNNprop entries the issue names: each learned entry costs about half
# as much as the four tuned baselines together, and with five (stop 16) or three (with dm-mnist:
# 10.1 min on an idle 2-core machine, stop 17) the quick run took longer than its 10 minutes.
LEARNED_QUICK = ["rnnprop-mnist", "rnnprop-mix"]
BASELINES = ["adam", "rmsprop", "sgd", "nag"]
GRID = sqrt2_grid()  # 2^-12 .. 2^0 in powers of sqrt(2)


@dataclass
class Experiment:
    name: str
    title: str
    tasks: list[tuple[str, int]]  # (task preset, steps)


def experiments(quick: bool) -> list[Experiment]:
    depths = [2, 6, 10] if quick else list(range(2, 11))
    return [
        Experiment("train", "Training task: MNIST MLP 784-20-10 sigmoid, 100 steps",
                   [("mnist-nn-sigmoid", 100)]),
        Experiment("horizon", "Longer horizons (same task)",
                   [("mnist-nn-sigmoid", 1000)] if quick
                   else [("mnist-nn-sigmoid", 2000), ("mnist-nn-sigmoid", 10000)]),
        Experiment("activations", "Other activations, 100 steps",
                   [(f"mnist-nn-{a}", 100) for a in ("relu", "elu", "tanh")]),
        Experiment("depths", "Deeper MLPs (layers of 20, sigmoid), 100 steps",
                   [(f"mnist-nn-l{d}-sigmoid", 100) for d in depths]),
        # -std01: the authors' N(0, 0.1^2) init of every weight and bias; plain: He init
        Experiment("cnn", "The paper's MNIST CNNs, 100 steps (plain: He init; -std01: the "
                   "authors' N(0, 0.1^2) init)",
                   [("mnist-cnn1", 100)] if quick
                   else [(f"mnist-{a}{i}", 100) for i in ("", "-std01") for a in ("cnn1", "cnn2")]),
        Experiment("sinlstm", "sin-LSTM regression, 100 steps",
                   [("sin-lstm", 100)] if quick
                   else [("sin-lstm", 100), ("sin-lstm-x2", 100), ("sin-lstm-no001", 100)]),
    ]


class Missing(Exception):
    """A result the report needs is not in the cache yet (that task has not been run)."""


class Cache:
    """Every evaluation's result, keyed by what determines it; saved after each new entry.

    Several invocations may share one cache (e.g. ``--only horizon --threads 1`` beside
    ``--only cnn --threads 1`` on two cores): a save takes an exclusive lock, re-reads the file
    and adds its entry to what is there, so no process drops another's results."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute=None) -> dict:
        """The cached result for ``key``; computed and saved if missing (``compute=None``: the
        report is being assembled from the cache alone, so a missing result raises Missing)."""
        if key not in self.data:
            if compute is None:
                raise Missing(key)
            self._save(key, compute())
        return self.data[key]

    def _save(self, key: str, value: dict) -> None:
        import fcntl  # POSIX only, like the rest of the benchmarks' tooling

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():  # entries other processes saved since this one read the file
                self.data.update(json.loads(self.path.read_text()))
            self.data[key] = value
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


def _summary(res, points: int = 200) -> dict:
    finals = [float(x) for x in res.final_losses]
    curve = res.curves  # (steps, runs)
    idx = torch.unique(torch.linspace(0, curve.shape[0] - 1, min(points, curve.shape[0])).round().long())
    c = curve[idx]
    ok = torch.isfinite(c).all(0)
    c = c[:, ok] if ok.any() else c
    return {"final_losses": finals, "mean": _finite(res.final_loss), "std": _finite(res.final_loss_std),
            "diverged": res.diverged, "wall_time": res.wall_time, "curve_steps": idx.tolist(),
            "curve_mean": c.mean(1).tolist(), "curve_std": c.std(1).tolist() if c.shape[1] > 1
            else [0.0] * len(idx)}


def _eval(optimizer, task, steps: int, runs: int, seed: int = 0) -> dict:
    return _summary(evaluate(optimizer, task, steps, runs, seed=seed))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _score(entry: dict) -> float:
    # a diverged run makes a configuration unusable for tuning
    return math.inf if entry["diverged"] or entry["mean"] is None else entry["mean"]


def task_key(preset: str, device: str = "cpu") -> str:
    """``preset@<hash of its spec>``: a task whose definition changes (e.g. the sin-LSTM's
    sampling ranges in stop 8) must not reuse results cached for the old one.  Off the CPU the
    device type is appended (``...@cuda``): other kernels give other numbers (and timings), so a
    GPU run must neither reuse nor overwrite CPU results kept in the same cache (CPU keys are
    unchanged, so existing caches stay valid)."""
    spec = json.dumps(preset_spec(preset), sort_keys=True)
    key = f"{preset}@{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    kind = torch.device(device).type
    return key if kind == "cpu" else f"{key}@{kind}"


def tune(cache: Cache, task, preset: str, steps: int, opt: str, runs: int, log, stride: int,
         device: str = "cpu") -> float:
    """Best learning rate on the sqrt(2) grid, found on tuning seeds: a coarse pass over every
    ``stride``-th grid point, then the sqrt(2) neighbours of the best (``stride // 2`` away, then
    one step, as long as the best moves).  ``task=None`` reads the cache only."""
    def ev(lr: float) -> float:
        key = f"tune|{task_key(preset, device)}|{steps}|{opt}|{lr:.6g}|{runs}"
        compute = None if task is None else partial(_eval, baseline(opt, lr), task, steps, runs, seed=1)
        return _score(cache.get(key, compute))
    scores = {lr: ev(lr) for lr in GRID[::stride]}
    best = min(scores, key=scores.get)
    width = stride // 2
    while width >= 1:
        i = GRID.index(best)
        for j in (i - width, i + width):
            if 0 <= j < len(GRID) and GRID[j] not in scores:
                scores[GRID[j]] = ev(GRID[j])
        best = min(scores, key=scores.get)
        width //= 2
    log(f"    {opt:8s} best lr {best:.4g} (tuning loss {scores[best]:.4g})")
    return best


Row = dict[str, tuple[dict, "float | None"]]  # contender -> (result, tuned lr or None)


def task_row(cache: Cache, task, preset: str, steps: int, learned: dict, version: dict, runs: int,
             tune_runs: int, quick: bool, log, device: str = "cpu") -> Row:
    """Every contender's result on one task: computed where missing, or (``task=None``) read
    from the cache alone, raising Missing if any piece is not there."""
    row: Row = {}
    for name, rule in learned.items():
        key = f"eval|{task_key(preset, device)}|{steps}|{name}@{version[name]}|{runs}"
        compute = None if task is None else partial(_eval, rule, task, steps, runs)
        row[name] = (cache.get(key, compute), None)
        log(f"    {name:14s} {row[name][0]['mean']}")
    # quick mode tunes only Adam (the paper's best baseline there) at the long horizon
    for opt in ["adam"] if quick and steps > 100 else BASELINES:
        lr = tune(cache, task, preset, steps, opt, tune_runs, log, 4 if quick else 2, device)
        key = f"eval|{task_key(preset, device)}|{steps}|{opt}|{lr:.6g}|{runs}"
        compute = None if task is None else partial(_eval, baseline(opt, lr), task, steps, runs)
        row[opt] = (cache.get(key, compute), lr)
    return row


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    cache = Cache(args.out / f"paper-cache-{mode}.json")
    runs = args.runs or (5 if args.quick else 20)
    tune_runs = args.tune_runs or (1 if args.quick else 5)
    from autol2o.zoo import ZooError, load_entry, resolve

    learned, version, rnnprop = {}, {}, []
    for spec in args.learned or (LEARNED_QUICK if args.quick else LEARNED):
        try:
            rule, card = load_entry(spec)
            name = resolve(spec).name
        except ZooError as exc:
            if args.learned:  # asked for by name: not a silent omission
                raise SystemExit(f"error: --learned {spec}: {exc}") from None
            print(f"skipping {spec}: {exc}", file=sys.stderr)
            continue
        if name in learned or name in BASELINES:
            raise SystemExit(f"error: --learned {spec}: a second contender named {name!r}")
        # --report-only computes nothing: it also renders a GPU run's cache on a machine without one
        learned[name] = rule if args.report_only else rule.to(args.device)
        version[name] = card["sha256"][:12]  # a retrained entry must not reuse cached results
        if card["rule"] == "rnnprop":
            rnnprop.append(name)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    wanted = set(args.tasks or [])
    selected = [e for e in experiments(args.quick) if not args.only or e.name in args.only]
    if args.report_only:
        selected = []
    t_start = time.perf_counter()
    for exp in selected:
        log(f"== {exp.title}")
        for preset, steps in exp.tasks:
            if wanted and f"{preset}:{steps}" not in wanted:
                continue
            task = build_task(preset, data_dir=args.data_dir, device=args.device)
            log(f"  {preset} x {steps} steps ({runs} runs)")
            row = task_row(cache, task, preset, steps, learned, version, runs, tune_runs,
                           args.quick, log, args.device)
            plot(args.out, preset, steps, row)

    # The report covers every task of the mode whose results are all in the cache, not only the
    # ones run now, so resuming one experiment never drops the tables of the others.
    tables: dict[str, list[tuple[str, int, Row]]] = {}
    missing: list[str] = []
    for exp in experiments(args.quick):
        for preset, steps in exp.tasks:
            try:
                row = task_row(cache, None, preset, steps, learned, version, runs, tune_runs,
                               args.quick, lambda _msg: None, args.device)
            except Missing:
                missing.append(f"{preset} x {steps}")
                continue
            tables.setdefault(exp.name, []).append((preset, steps, row))
            if args.report_only:  # every table row gets its plot, wherever it was computed
                plot(args.out, preset, steps, row)
    write_report(args.out, tables, missing, cache, runs, tune_runs, mode,
                 time.perf_counter() - t_start, args.quick, rnnprop, args.device, args.force)


def plot(out: Path, preset: str, steps: int, row) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (entry, lr) in row.items():
        x = [s + 1 for s in entry["curve_steps"]]
        m = torch.tensor(entry["curve_mean"])
        s = torch.tensor(entry["curve_std"])
        label = name if lr is None else f"{name} (lr {lr:.3g})"
        if entry["diverged"]:  # the curve averages the finite runs only: say how many are missing
            label += f", {entry['diverged']} diverged (not drawn)"
        style = "-" if lr is None else "--"
        (line,) = ax.plot(x, m, style, label=label, lw=1.5)
        # On a log axis a band reaching below 0 would plunge to the clamp: cut it at mean / 10
        lower = torch.maximum(m - s, m / 10)
        ax.fill_between(x, lower, m + s, color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over runs)")
    ax.set_title(f"{preset}, {steps} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"paper-{preset}-{steps}.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, tables, missing: list[str], cache: Cache, runs: int, tune_runs: int,
                 mode: str, wall: float, quick: bool, rnnprop: list[str],
                 device: str = "cpu", force: bool = False) -> None:
    """Write ``paper.md``; the ratio column is the best of the ``rnnprop`` contenders over the
    best tuned baseline.  A contender with a diverged run scores inf (:func:`_score`): it is
    never bold and never wins, and a task where every RNNprop contender diverged still counts,
    as a loss (it must not drop out of "wins of total")."""
    compute = sum(v.get("wall_time", 0.0) for v in cache.data.values())
    lines = [f"# Paper experiments ({mode} mode)", "",
             f"Authors' protocol: same inits and minibatches for every contender; loss = mean over the "
             f"N minibatches of the loss at the final parameters; {runs} runs (mean ± std). Baselines "
             f"tuned over the sqrt(2) grid 2^-12..2^0 on separate tuning seeds ({tune_runs} runs per "
             f"grid point)" + ("; at horizons above 100 steps only Adam is tuned (quick mode)"
                              if quick else "") +
             f". Learned optimizers are not tuned. A contender with a diverged run (shown as "
             f"'k div.', its mean over the other runs) counts as diverged: it cannot be best or "
             f"win. Device: {device}. All evaluations in the cache took "
             f"{compute / 60:.1f} min of wall time in total, with whatever threads each invocation "
             f"had (this one: {wall / 60:.1f} min, cached results count as 0, "
             f"{torch.get_num_threads()} torch thread(s)) on a "
             f"{os.cpu_count()}-core machine, torch {torch.__version__}. Where a tuned rate sits at the "
             f"grid's edge (2^0), the baseline might do better still above the paper's grid. Plots: "
             f"mean over runs with a band of 1 std, cut at a tenth of the mean on the log axis.", ""]
    if missing:
        lines += ["Not run yet (resume with `--only` / `--tasks`): " + ", ".join(missing) + ".", ""]
    wins = total = 0
    entry_wins = dict.fromkeys(rnnprop, 0)
    for exp in experiments(quick):
        if exp.name not in tables:
            continue
        lines += [f"## {exp.title}", ""]
        names = list(tables[exp.name][0][2])
        lines.append("| task | steps | " + " | ".join(names) + " | RNNprop / best baseline |")
        lines.append("|---|---:|" + "---:|" * len(names) + "---:|")
        for preset, steps, row in tables[exp.name]:
            scores = {n: _score(e) for n, (e, _) in row.items()}
            best = min(scores, key=scores.get)
            cells = []
            for n, (e, lr) in row.items():
                txt = "diverged" if e["mean"] is None else f"{e['mean']:.4g} ± {e['std']:.2g}"
                if e["diverged"] and e["mean"] is not None:
                    txt += f" ({e['diverged']} div.)"
                if lr is not None:
                    txt += f" @{lr:.3g}"
                cells.append(f"**{txt}**" if n == best and math.isfinite(scores[n]) else txt)
            base = min((scores[n] for n in BASELINES if n in scores), default=math.nan)
            rnn = {n: scores[n] for n in rnnprop if n in scores}
            if not rnn or math.isnan(base):
                ratio_txt = "-"
            else:
                best_rnn = min(rnn.values())
                total += 1
                wins += best_rnn < base  # strict: a tie is no win; inf (diverged) never wins
                for n, v in rnn.items():
                    entry_wins[n] += v < base
                ratio_txt = (f"{best_rnn / base:.2f}" if math.isfinite(best_rnn)
                             and math.isfinite(base) and base > 0 else
                             "RNNprop diverged" if not math.isfinite(best_rnn) else
                             "baselines diverged")
            lines.append(f"| {preset} | {steps} | " + " | ".join(cells) + f" | {ratio_txt} |")
        lines.append("")
    which = ("RNNprop" if len(rnnprop) < 2 else
             "RNNprop (best of " + ", ".join(f"`{n}`" for n in rnnprop) + ")")
    each = ("" if len(rnnprop) < 2 else " Each alone: " + ", ".join(
        f"`{n}` {k} of {total}" for n, k in entry_wins.items()) + ".")
    lines.insert(4, f"{which} beats the best tuned baseline on {wins} of {total} tasks.{each}\n")
    text = "\n".join(lines) + "\n"
    target = out / "paper.md"
    # The cache is not committed, so a fresh checkout holds the report but not the results
    # behind it: a rerun there must not replace a report's rows with "not run yet" (nor drop
    # contenders' columns, with fewer --learned).
    lost = (table_rows(target.read_text()) - table_rows(text)) if target.exists() else set()
    if lost and not force:
        target = out / "paper.new.md"
        print(f"warning: {out / 'paper.md'} has results the new report lacks ("
              + ", ".join(sorted({f"{t} x {s}" for t, s, _ in lost}))
              + "; contenders " + ", ".join(sorted({c for _, _, c in lost}))
              + f"); wrote {target} instead (--force replaces paper.md)", file=sys.stderr)
    target.write_text(text)
    print(text)


def table_rows(text: str) -> set[tuple[str, int, str]]:
    """The ``(task, steps, contender)`` results of a report's tables (a contender's column
    counts as much as a task's row: a rerun with fewer ``--learned`` entries also loses some)."""
    cells_of = []
    header: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| task | steps |"):
            header = cells
        elif line.startswith("| ") and len(cells) > 2 and cells[1].isdigit():
            cells_of += [(cells[0], int(cells[1]), name) for name in header[2:-1]]
    return set(cells_of)


def main() -> None:
    ap = argparse.ArgumentParser(description="Reproduce the RNNprop paper's experiments.")
    ap.add_argument("--quick", action="store_true", help="fewer runs/tasks: < 10 min on 2 cores")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="MNIST IDX .gz directory")
    ap.add_argument("--runs", type=int, default=0, help="evaluation runs (default 20; quick 5)")
    ap.add_argument("--tune-runs", type=int, default=0, help="runs per grid point (default 5; quick 1)")
    ap.add_argument("--only", nargs="*", help="experiments: train horizon activations depths cnn sinlstm")
    ap.add_argument("--tasks", nargs="*", help="only these tasks, as PRESET:STEPS (e.g. mnist-cnn1:100)")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing; rewrite paper.md from the cache")
    ap.add_argument("--learned", nargs="*",
                    help="learned contenders: zoo entry names or directories (default: "
                         + " ".join(LEARNED) + "; --quick: " + " ".join(LEARNED_QUICK)
                         + "); the ratio column takes the best RNNprop one")
    ap.add_argument("--force", action="store_true",
                    help="write paper.md even if it drops rows the existing one has")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 on a machine shared with other jobs")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
