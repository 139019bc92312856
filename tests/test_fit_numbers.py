"""The numbers a fit reports, checked by hand: finals statistics, the seed-noise test, the
compute accounting and "steps to match", the verdict of partial and diverged runs, and the
agreement of report.json, report.md and metrics.csv."""

from __future__ import annotations

import csv
import io
import json
import statistics

import optuna
import pytest
import torch
from scipy import stats
from test_fit_support import FAST, blobs, make_zoo, run_cli, write_csv, write_model, zoo  # noqa: F401
from torch import nn

import autol2o
import autol2o.fit.pipeline as pipeline

pytestmark = pytest.mark.usefixtures("zoo")


def data(n=100):
    x, y = blobs(n)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def fit(out, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    args = dict(steps=20, trials=6, seeds=2, optimizer="dm-rand", out=out, progress=False)
    return autol2o.optimize(model, data(), **(args | kw))


def strict_json(path):
    """report.json parsed as strict JSON: NaN / Infinity literals are an error."""
    def no_constant(name):
        raise ValueError(f"{path}: {name} is not valid JSON")
    return json.loads(path.read_text(), parse_constant=no_constant)


def interrupt_at(kind, finals):
    """A train_run that raises KeyboardInterrupt (as Ctrl-C does) at ``kind``'s first final
    run (``finals``; finals keep their weights, trials do not ask) or first trial."""
    real = pipeline.train_run

    def run(problem, opt, **kw):
        if opt.kind == kind and ("keep_state" in kw) == finals:
            raise KeyboardInterrupt
        return real(problem, opt, **kw)
    return run


def comparable(report):
    """A report without its times, paths and worker names (what differs between two runs)."""
    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items() if "wall_time" not in k and k not in
                    ("created", "finished", "run_dir", "timings", "study", "storage", "worker",
                     "optuna_storage", "dashboard_command", "trials_by_this_process")}
        return [walk(v) for v in o] if isinstance(o, list) else o
    return walk(json.loads(json.dumps(report)))


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes trials 1, 3, ... at step 7: a known number of steps for the accounting."""

    def prune(self, study, trial):
        return trial.number % 2 == 1 and trial.last_step >= 7


def test_finals_verdict_and_compute_match_their_definitions(tmp_path, monkeypatch):
    real = pipeline.open_study

    def open_study(*args, **kw):
        study = real(*args, **kw)
        study.pruner = PruneOddTrials()
        return study

    monkeypatch.setattr(pipeline, "open_study", open_study)
    r = fit(tmp_path / "run", trials=4).report
    assert strict_json(tmp_path / "run" / "report.json") == r
    finals = {f["name"]: f for f in r["finals"]}
    # mean +/- std over seeds (sample std), each value the final validation loss of its run
    for row in r["leaderboard"]:
        f = finals[row["name"]]
        vals = [run["val_loss"][-1] for run in f["runs"]]
        assert f["val_loss"]["values"] == vals
        assert row["val_loss_mean"] == pytest.approx(statistics.fmean(vals))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(vals))
        assert f["steps"] == sum(run["steps_run"] for run in f["runs"]) == 2 * 20
    # the seed-noise test is a paired t-test on the two best contenders' final losses, paired
    # by seed (every contender ran the same seeds)
    v, (w, ru) = r["verdict"], r["leaderboard"][:2]
    assert v["gap"] == pytest.approx(ru["val_loss_mean"] - w["val_loss_mean"])
    assert finals[w["name"]]["seeds"] == finals[ru["name"]]["seeds"]
    t = stats.ttest_rel(finals[ru["name"]]["val_loss"]["values"],
                        finals[w["name"]]["val_loss"]["values"])
    assert v["p_value"] == pytest.approx(t.pvalue) and v["significant"] == (t.pvalue < 0.05)
    # compute: every finished trial's steps (a pruned one: up to its last report); "steps to
    # match" replayed from the trial records in order
    learned = finals["dm-rand"]["val_loss"]["values"]
    assert v["learned_target_val_loss"] == pytest.approx(statistics.fmean(learned))
    for kind, t in r["tuning"].items():
        assert [tr["state"] for tr in t["trials"]] == ["COMPLETE", "PRUNED"] * 2
        assert [tr["steps_run"] for tr in t["trials"]] == [20, 7] * 2  # eval_every 1
        total, match = 0, None
        for tr in t["trials"]:
            assert tr["steps_run"] == tr["curve_steps"][-1]
            hit = next((s for s, x in zip(tr["curve_steps"], tr["curve_val"])
                        if x is not None and x <= v["learned_target_val_loss"]), None)
            if hit is not None and match is None:
                match = total + hit
            total += tr["steps_run"]
        assert v["compute"][kind]["search_steps"] == t["compute"]["steps"] == total
        assert v["baseline_steps_to_match_learned"][kind] == match
    # --optimizer: no race, so no search steps, and the summary says why
    assert v["compute"]["learned"]["search_steps"] == 0
    assert "used 0 search steps (race skipped)" in v["summary"]
    # report.md and metrics.csv carry the same numbers
    md = (tmp_path / "run" / "report.md").read_text()
    for row in r["leaderboard"]:
        assert f"| {row['rank']} | {row['name']} |" in md
        assert f"{row['val_loss_mean']:.4g} +/- {row['val_loss_std']:.2g}" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "run" / "metrics.csv").read_text())))
    for name, f in finals.items():
        for run in f["runs"]:
            last = [x for x in rows if (x["phase"], x["contender"], x["seed"])
                    == ("final", name, str(run["seed"]))][-1]
            assert float(last["val_loss"]) == pytest.approx(run["val_loss"][-1], rel=1e-5)


def test_interrupted_finals_name_no_winner_and_resume_equals_an_uninterrupted_run(
        tmp_path, monkeypatch):
    """Ctrl-C in the finals after the learned optimizer's seeds: the partial report must not
    declare it the winner of a race the baselines never ran."""
    real = pipeline.train_run
    monkeypatch.setattr(pipeline, "train_run", interrupt_at("adam", finals=True))
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", trials=2)
    r = strict_json(tmp_path / "run" / "report.json")
    assert r["status"] == "interrupted" and [f["name"] for f in r["finals"]] == ["dm-rand"]
    assert r["verdict"]["winner"] is None
    assert r["verdict"]["summary"] == ("no verdict: the finals were interrupted before adam, "
                                       "sgd finished")
    assert "wins" not in (tmp_path / "run" / "report.md").read_text()

    monkeypatch.setattr(pipeline, "train_run", real)
    resumed = fit(tmp_path / "run", trials=2, resume=True).report
    whole = fit(tmp_path / "whole", trials=2).report
    assert comparable(resumed) == comparable(whole)


def test_interrupted_tuning_is_not_reported_as_divergence(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train_run", interrupt_at("adam", finals=False))
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", trials=2)
    v = strict_json(tmp_path / "run" / "report.json")["verdict"]
    assert v["winner"] is None and v["summary"] == "no finals were run"


def test_diverged_learned_optimizer_is_ranked_last_and_named_in_the_verdict(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("AUTOL2O_ZOO", str(make_zoo(tmp_path / "wild-zoo", diverging=True)))
    res = fit(tmp_path / "run", trials=2, optimizer=None)
    r = strict_json(tmp_path / "run" / "report.json")   # inf losses are null, not Infinity
    last = r["leaderboard"][-1]
    assert (last["name"], last["val_loss_mean"], last["val_loss_std"], last["diverged"]) == \
        ("wild", None, None, 2)
    assert res.winner in ("adam", "sgd")
    assert r["finals"][0]["val_loss"]["values"] == [None, None]
    assert r["verdict"]["learned_target_val_loss"] is None
    assert r["verdict"]["summary"].endswith("The learned optimizer wild diverged (2 of 2 seeds).")


def test_fine_tune_counts_the_short_last_unroll(tmp_path, capsys, monkeypatch):
    """--steps 30: fine-tuning runs have horizon 30 and unrolls of 20, so every second
    meta-iteration advances 10 steps, not 20; the count must match the steps taken."""
    import autol2o.meta.trainer as trainer

    real, taken = trainer._unroll, []

    def count(run, rule, steps, config):
        taken.append(steps * len(run.seeds))
        return real(run, rule, steps, config)

    monkeypatch.setattr(trainer, "_unroll", count)
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    code, _, err = run_cli(["fit", write_model(tmp_path), tmp_path / "data", *FAST,
                            "--steps", "30", "--fine-tune", "3", "--optimizer", "dm-rand",
                            "--baselines", "adam", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    ft = json.loads((tmp_path / "run" / "report.json").read_text())["fine_tune"]
    assert taken == [20 * 2, 10 * 2, 20 * 2]
    # + validations (start and after each iteration: validate_every 3 // 4 -> 1) of 4 runs x 30
    # steps + 2 full-length runs of 30 steps (the fine-tuned and the original optimizer)
    assert ft["optimizee_steps"] == sum(taken) + 4 * 4 * 30 + 2 * 30


def test_curves_legend_says_which_seeds_diverged(tmp_path, monkeypatch):
    """curves.png draws finite seeds only; the legend must say how many diverged, and list a
    contender whose every seed diverged instead of dropping it silently."""
    import matplotlib.axes

    from autol2o.fit.report import plot_curves
    from autol2o.fit.train import RunResult

    def run(seed, diverged=False):
        return RunResult("x", seed, steps=[0, 5, 10], train_loss=[None, 0.9, 0.5],
                         val_loss=[1.0, 0.8, 0.6], val_acc=[None] * 3, steps_run=10,
                         diverged=diverged)

    labels, real_plot = [], matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_curves({"adam": [run(0), run(1)], "rnnprop": [run(0), run(1, True), run(2)],
                 "wild": [run(0, True), run(1, True)]}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert labels[:3] == ["adam (2 seeds)", "rnnprop (2 seeds, 1 diverged (not drawn))",
                          "wild: all 2 seeds diverged"]
    assert labels == labels[:3] * 2          # the same on both panels (train, validation)
