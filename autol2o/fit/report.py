"""Run-directory outputs: ``report.json`` (schema below), ``report.md``, ``metrics.csv``,
``curves.png`` and the winner's weights.  Every file is written to a temporary name and renamed,
so an interrupted run never leaves a half-written file.

``report.json`` schema, ``schema_version`` 2 (losses are ``null`` where a run diverged).
Version 2 (stop 14): ``verdict.noise``/``p_value`` come from a paired t-test over the shared seeds
(1: Welch's unpaired test), and ``fine_tune`` meta-trains on held-out loss with
``probe_val_loss_*`` from full-length runs (1: the training loss, 10% probes)::

    schema_version   int, 2
    status           "complete" | "interrupted" | "failed" (partial: later sections may be
                     empty; a failed run's verdict.summary is "failed: <the error>")
    autol2o_version, created, finished (ISO time), run_dir, device
    inputs           model (path or "<api model>"), model_name, entry_point, task, n_params, loss,
                     data {source, format, task, n_train, n_val, input_shape, n_classes, classes,
                           standardized, split, notes} (the DATA path is data.source), plus
                     the CLI's target argument
    config           FitConfig fields (steps, batch_size, probe_fraction, race, race_all,
                     trials, seeds, fine_tune, optimizer, baselines, device, storage (a
                     password shown as ***), study, n_jobs, seed, threads, zoo) + probe_steps,
                     eval_every
    race             null | {skipped, picked, picked_path, probe_steps, mode ("halving",
                             "full", or null when skipped; absent in runs started before
                             autol2o had the halving race), rounds (the step each round trains
                             its survivors to; [] when skipped),
                             steps (all entries' steps), excluded (names of usable
                             entries left out because their card says "race": false; []
                             with race_all or when skipped; absent in runs from before it),
                             entries: [{name, path, val_loss, val_acc, diverged, steps (how
                                        far it got: entries out after an early round have
                                        fewer), wall_time, curve}]}  (an entry that failed to
                             load: {name, error, val_loss null, diverged, steps 0, wall_time};
                             the only usable entry is picked unprobed: steps 0, no curve)
    fine_tune        null | {name, path, iterations, optimizee_steps, diverged_runs,
                             best_val (the meta-validation score: the mean loss, on the 20%
                             (at most 2048 examples) of the training data each run held out,
                             of fresh models trained by the optimizer on the rest for
                             min(steps, 1000) steps; meta-training never sees the validation
                             split),
                             best_iteration (0: the starting weights stayed best),
                             probe_val_loss_before, probe_val_loss_after (validation loss after
                             a full --steps run from the --seed init, with the picked and with
                             the fine-tuned optimizer), used (fine-tuned weights improved
                             meta-validation and the full run is not worse), wall_time}
    tuning           {adam|sgd: {study, storage, n_trials (finished: complete, pruned or
                     diverged; what --trials counts), n_unfinished (cut off by an interruption;
                     re-run on --resume), n_complete, n_pruned, n_failed, n_diverged,
                     best_params, best_value, compute {trials, steps, wall_time},
                     trials_by_this_process [numbers], trials: [{number, state, params, value,
                     steps_run, wall_time, diverged, worker, curve_steps, curve_val}]}}
    finals           [{name, kind ("learned"|"adam"|"sgd"), params, val_loss {mean, std, values},
                       val_acc {mean, std, values} | null, train_loss {...}, diverged, seeds,
                       steps, wall_time, runs: [{name, seed, steps, train_loss, val_loss,
                       val_acc, steps_run, diverged, wall_time}]}]  (mean null if a seed
                       diverged; std null then and with one seed)
    leaderboard      [{rank, name, kind, params, val_loss_mean, val_loss_std, val_acc_mean,
                       val_acc_std, n_seeds, diverged}]  (best first; *_std null with one seed;
                       a contender with a diverged seed has null mean and ranks last)
    verdict          {winner (null unless every contender's finals finished and one of
                      them did not diverge), runner_up, gap, noise (the gap a two-sided
                      paired t-test at 5% over the shared seeds needs: t_crit(n-1) x the
                      standard error of the per-seed differences), p_value,
                      significant (p < 0.05; null with one seed), summary (one sentence),
                      compute {learned|adam|sgd: {search_steps, search_wall_time, [search_trials],
                               final_runs, final_steps, final_wall_time}}  (a key only for
                               contenders that ran),
                      learned_target_val_loss, baseline_steps_to_match_learned {adam|sgd: int|null}
                      ({} when the learned optimizer diverged),
                      [best_adam_trial_val_loss, learned_steps_to_match_best_adam: only with a
                      learned contender and an Adam study], learned_search_steps}
    timings          seconds per phase (race, fine_tune, tune_adam, tune_sgd, finals)
    artifacts        {report_json, report_md, fine_tuned (the fine-tuned zoo entry's folder,
                      or null), metrics, curves, weights, optuna_storage,
                      optuna_db, dashboard_command, [preprocessing]}  (file names in run_dir;
                      preprocessing.json holds the feature mean/std when tabular inputs were
                      standardised)

``metrics.csv`` columns: ``phase,contender,seed,trial,step,train_loss,val_loss,val_acc``
(phase is ``race``, ``tuning`` or ``final``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from autol2o.atomic import atomic_write_bytes, atomic_write_text

SCHEMA_VERSION = 2


def save_weights(model: nn.Module, path: Path) -> None:
    """The trained model's state dict as safetensors (shared tensors stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # safetensors creates its files 0600; give the weights the umask's mode like the other files
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    save_model(model, str(tmp))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_all(run_dir: Path, report: dict[str, Any], finals: dict, race_runs: list) -> None:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "metrics.csv", metrics_csv(report, finals, race_runs))
    if finals:
        plot_curves(finals, run_dir / "curves.png")
    atomic_write_text(run_dir / "report.md", markdown(report))
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def metrics_csv(report: dict[str, Any], finals: dict, race_runs: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["phase", "contender", "seed", "trial", "step", "train_loss", "val_loss", "val_acc"])
    for r in race_runs:
        for s, tl, vl, va in zip(r.steps, r.train_loss, r.val_loss, r.val_acc):
            w.writerow(["race", r.name, r.seed, "", s, _c(tl), _c(vl), _c(va)])
    for name, runs in finals.items():
        for r in runs:
            for s, tl, vl, va in zip(r.steps, r.train_loss, r.val_loss, r.val_acc):
                w.writerow(["final", name, r.seed, "", s, _c(tl), _c(vl), _c(va)])
    for kind, t in report.get("tuning", {}).items():
        for tr in t.get("trials", []):
            for s, v in zip(tr.get("curve_steps") or [], tr.get("curve_val") or []):
                w.writerow(["tuning", kind, "", tr["number"], s, "", _c(v), ""])
    return buf.getvalue()


def _c(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_curves(finals: dict, path: Path) -> None:
    """Train and validation loss vs step, mean over seeds with a min..max band per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "train_loss", "training loss (mean since last eval)"),
                           (axes[1], "val_loss", "validation loss")):
        for name, runs in finals.items():
            ok = [r for r in runs if not r.diverged]
            gone = len(runs) - len(ok)
            if not ok:  # nothing to draw, but the legend must not pretend it never ran
                ax.plot([], [], " ", label=f"{name}: all {gone} seeds diverged")
                continue
            first = 1 if key == "train_loss" else 0   # no training loss before step 1
            steps = ok[0].steps[first:]
            vals = np.array([[np.nan if v is None else v for v in getattr(r, key)[first:]]
                             for r in ok if len(r.steps) == len(ok[0].steps)], dtype=float)
            if not len(steps) or np.isnan(vals).all():
                continue
            mean = np.nanmean(vals, axis=0)
            note = f", {gone} diverged (not drawn)" if gone else ""
            line = ax.plot(steps, mean, label=f"{name} ({len(vals)} seeds{note})")[0]
            if len(vals) > 1:
                ax.fill_between(steps, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0),
                                color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(r: dict[str, Any]) -> str:
    """Human-readable report.md."""
    inp, cfg, v = r["inputs"], r["config"], r["verdict"]
    d = inp.get("data", {})
    lines = [f"# autol2o fit report ({r['status']})", "",
             f"**Verdict:** {v.get('summary', '-')}", "",
             "## Inputs", "",
             f"- model: `{inp.get('model')}` (entry point `{inp.get('entry_point')}`, "
             f"{inp.get('n_params')} parameters, loss {inp.get('loss')})",
             f"- data: {d.get('format')} from `{d.get('source')}`: {d.get('n_train')} train / "
             f"{d.get('n_val')} val ({d.get('split')}), task {inp.get('task')}"
             + (f", {d.get('n_classes')} classes" if d.get("n_classes") else "")
             + (", standardised from training statistics" if d.get("standardized") else ""),
             f"- budget: {cfg['steps']} steps per run, batch {cfg['batch_size']}, "
             f"{cfg['trials']} trials per baseline, {cfg['seeds']} seeds in the finals, "
             f"device {r.get('device')}", ""]
    if r["leaderboard"]:
        lines += ["## Leaderboard (finals)", "",
                  "| rank | optimizer | config | val loss (mean +/- std) | val acc | diverged |",
                  "|---|---|---|---|---|---|"]
        for row in r["leaderboard"]:
            acc = "-" if row["val_acc_mean"] is None else f"{row['val_acc_mean']:.4f}" + (
                "" if row["val_acc_std"] is None else f" +/- {row['val_acc_std']:.4f}")
            loss = "diverged" if row["val_loss_mean"] is None else \
                f"{row['val_loss_mean']:.4g}" + (
                    "" if row["val_loss_std"] is None else f" +/- {row['val_loss_std']:.2g}")
            conf = (", ".join(f"{k}={_f(x, 3)}" for k, x in row["params"].items())
                    or "learned: no hyperparameters")
            lines.append(f"| {row['rank']} | {row['name']} | {conf} | {loss} | {acc} | "
                         f"{row['diverged']}/{row['n_seeds']} |")
        lines.append("")
    comp = v.get("compute", {})
    if comp:
        lines += ["## Compute", "", "| side | search steps | search time (s) | final steps |",
                  "|---|---|---|---|"]
        for side, c in comp.items():
            lines.append(f"| {side} | {c['search_steps']} | {_f(c['search_wall_time'])} | "
                         f"{c['final_steps']} |")
        lines.append("")
        for kind, s in v.get("baseline_steps_to_match_learned", {}).items():
            lines.append(f"- steps tuned {kind} needed in total to match the learned "
                         f"optimizer's {_f(v.get('learned_target_val_loss'))}: "
                         f"{s if s is not None else 'never matched'}")
        if "learned_steps_to_match_best_adam" in v:
            s = v["learned_steps_to_match_best_adam"]
            lines.append(f"- learned optimizer steps (search + training) to reach the best Adam "
                         f"trial's {_f(v.get('best_adam_trial_val_loss'))}: "
                         f"{s if s is not None else 'not reached within the step budget'}")
        lines.append("")
    race = r.get("race")
    if race:
        lines += ["## Zoo race", ""]
        if race["skipped"]:
            lines.append(f"Skipped (`--optimizer {race['picked']}`).")
        else:
            how = ("successive halving, rounds to step " +
                   ", ".join(str(n) for n in race["rounds"]) + "; " if
                   race.get("mode") == "halving" and race.get("rounds") else "")
            lines += [f"Probe: {race['probe_steps']} steps from identical initial weights "
                      f"({how}{race['steps']} steps in all)."
                      + (f" Left out (card `\"race\": false`; `--race-all` races them): "
                         f"{', '.join(race['excluded'])}." if race.get("excluded") else ""), "",
                      "| optimizer | steps | val loss | |", "|---|---|---|---|"]
            for e in race["entries"]:
                state = "error: " + e["error"] if e.get("error") else \
                    ("diverged" if e["diverged"] else
                     ("picked" if e["name"] == race["picked"] else ""))
                if e["name"] == race["picked"] and not e.get("steps"):
                    state = "picked (the only usable entry: not probed)"
                lines.append(f"| {e['name']} | {e.get('steps', '')} | {_f(e['val_loss'])} "
                             f"| {state} |")
        lines.append("")
    if r.get("fine_tune"):
        f = r["fine_tune"]
        lines += ["## Fine-tuning", "",
                  f"{f['iterations']} meta-iterations; val loss of a full run "
                  f"{_f(f['probe_val_loss_before'])} -> {_f(f['probe_val_loss_after'])}; "
                  f"{'used' if f['used'] else 'not used'}. Weights: `{f['path']}`.", ""]
    for kind, t in r.get("tuning", {}).items():
        lines += [f"## Optuna: {kind}", "",
                  f"Study `{t['study']}`: {t['n_trials']} finished trials ({t['n_complete']} "
                  f"complete, {t['n_pruned']} pruned, {t['n_diverged']} diverged)"
                  + (f" and {t['n_unfinished']} cut off by an interruption"
                     if t.get("n_unfinished") else "")
                  + f", {t['compute']['steps']} optimizer steps. Best "
                  f"{_f(t['best_value'])} with {t['best_params']}.", ""]
    a = r["artifacts"]
    lines += ["## Files", "", f"- curves: `{a.get('curves')}`; metrics: `{a['metrics']}`; "
              f"weights: `{a.get('weights')}`",
              f"- Optuna storage: `{a['optuna_storage']}`; open with `{a['dashboard_command']}`",
              ""]
    return "\n".join(lines)
