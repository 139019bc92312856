"""Ctrl-C keeps the run directory with a partial report; ``--resume`` finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from test_fit_support import FAST, blobs, run_cli, write_csv, write_model, zoo  # noqa: F401

import autol2o.fit.pipeline as pipeline

# every test gets a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")


def test_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    x, y = blobs()
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = write_model(tmp_path)
    run = tmp_path / "run"
    args = ["fit", model, data, "--steps", "20", "--trials", "3", "--seeds", "1", "--quiet",
            "--out", run]

    real, calls = pipeline.train_run, []

    def ctrl_c_in_second_sgd_trial(problem, opt, **kw):
        calls.append(opt.kind)
        if calls.count("sgd") == 2:
            raise KeyboardInterrupt
        return real(problem, opt, **kw)

    monkeypatch.setattr(pipeline, "train_run", ctrl_c_in_second_sgd_trial)
    code, _, err = run_cli(args, capsys)
    assert code == 130
    r = json.loads((run / "report.json").read_text())
    assert r["status"] == "interrupted"
    assert r["tuning"]["adam"]["n_complete"] + r["tuning"]["adam"]["n_pruned"] == 3
    assert r["finals"] == [] and r["verdict"]["winner"] is None
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted" and "race" in state["phases"]
    # the interrupted trial is recorded as FAIL and does not count
    storage = f"sqlite:///{run / 'optuna.db'}"
    sgd = optuna.load_study(study_name="run-sgd", storage=storage)
    assert [t.state.name for t in sgd.trials] == ["COMPLETE", "FAIL"]

    # flags that would change the run are refused, not silently ignored; nothing is touched
    before = (run / "state.json").read_bytes()
    code, _, err = run_cli(["fit", "--resume", run, "--steps", "50", "--trials", "2",
                            "--out", tmp_path / "other"], capsys)
    assert code == 2 and err.strip() == (f"error: --resume continues {run} with its saved "
                                         "settings; drop --steps, --trials, --out"), err
    assert (run / "state.json").read_bytes() == before and not (tmp_path / "other").exists()

    # resume: the race is not re-run, adam is not re-tuned, sgd gets its 2 missing trials;
    # --threads (how to compute, not what) is accepted and used.  The run is resumed after a
    # move, as "--resume ." from inside it: the studies are still found by their saved names
    monkeypatch.setattr(pipeline, "train_run", real)
    calls.clear()
    run = run.rename(tmp_path / "moved")
    storage = f"sqlite:///{run / 'optuna.db'}"
    monkeypatch.chdir(run)
    code, _, err = run_cli(["fit", "--resume", ".", "--quiet", "--threads", "1"], capsys)
    assert code == 0, err
    r = json.loads((run / "report.json").read_text())
    assert r["status"] == "complete" and r["verdict"]["winner"]
    assert r["config"]["threads"] == 1 and r["config"]["steps"] == 20
    assert r["race"] == state["phases"]["race"]
    # the race's probe curves are still in metrics.csv although the race was not re-run
    race_rows = [ln for ln in (run / "metrics.csv").read_text().splitlines()
                 if ln.startswith("race,")]
    n_points = sum(len(e["curve"]["steps"]) for e in r["race"]["entries"] if "curve" in e)
    assert n_points > 0 and len(race_rows) == n_points
    t = r["tuning"]["sgd"]
    # --trials 3 finished; the trial cut off by the interruption is counted apart
    assert t["n_trials"] == 3 and t["n_unfinished"] == 1 and t["n_failed"] == 1
    assert t["n_complete"] + t["n_pruned"] == 3
    assert "3 finished trials" in (run / "report.md").read_text()
    assert r["tuning"]["adam"]["n_trials"] == 3
    # resumed sampler does not replay the configurations already tried
    sgd = optuna.load_study(study_name="run-sgd", storage=storage)
    lrs = [tr.params["lr"] for tr in sgd.trials]
    assert len(set(lrs)) == len(lrs)

    # a finished run cannot be resumed again, and is left alone
    before = (run / "report.json").read_bytes()
    code, _, err = run_cli(["fit", "--resume", run], capsys)
    assert code != 0 and "already complete" in err
    assert (run / "report.json").read_bytes() == before


def test_sigint_subprocess_keeps_partial_report(tmp_path):
    """A real SIGINT from outside: exit 130, partial report on disk, resumable."""
    x, y = blobs()
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = write_model(tmp_path)
    run = tmp_path / "run"
    env = dict(os.environ)  # AUTOL2O_ZOO set by the fixture
    cmd = [sys.executable, "-m", "autol2o", "fit", str(model), str(data), "--steps", "200",
           "--trials", "50", "--seeds", "1", "--quiet", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline:   # wait until tuning has started (trials in the storage)
        if (run / "state.json").exists() and '"race"' in (run / "state.json").read_text():
            time.sleep(1.0)
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    r = json.loads((run / "report.json").read_text())
    assert r["status"] == "interrupted"
    assert not list(run.glob(".*.tmp"))


def test_resume_takes_typed_runtime_flags_even_when_they_equal_the_default(tmp_path):
    saved = {"config": pipeline.FitConfig(n_jobs=4, threads=2, steps=50).to_dict()}
    given = pipeline.FitConfig()                       # n_jobs=1, threads=None: the defaults
    # the CLI says --n-jobs 1 was typed: it undoes the saved 4; --threads was not: saved 2 stays
    cfg = pipeline.resume_config(saved, given, tmp_path, explicit={"n_jobs"})
    assert cfg.n_jobs == 1 and cfg.threads == 2 and cfg.steps == 50
    # the Python API cannot tell typed from default: only non-default values override
    cfg = pipeline.resume_config(saved, given, tmp_path)
    assert cfg.n_jobs == 4 and cfg.threads == 2


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path, monkeypatch):
    """The automatic run name has one-second resolution; the directory is claimed by mkdir
    itself, so runs started together (a shell loop with &) each get their own."""
    import threading

    monkeypatch.setattr(pipeline.time, "strftime", lambda fmt, *a: "20260101-000000")
    barrier, got = threading.Barrier(8), []

    def start():
        barrier.wait()
        got.append(pipeline.new_run_dir(None, "m", base=tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(d.is_dir() for d in got)
    assert sorted(d.name for d in got)[:2] == ["20260101-000000-m", "20260101-000000-m-2"]


def test_a_run_saves_its_zoo_and_optimizer_as_absolute_paths(tmp_path, monkeypatch, capsys):
    """--zoo / AUTOL2O_ZOO / --optimizer given relative to the working directory are pinned
    when the run is created, so --resume from elsewhere races the same entries."""
    from pathlib import Path

    from autol2o.fit import FitConfig, pin_paths

    root = Path(os.environ["AUTOL2O_ZOO"])  # the tiny zoo of the autouse fixture

    monkeypatch.chdir(root.parent)
    cfg = pin_paths(FitConfig(zoo="zoo", optimizer="zoo/dm-rand"))
    assert cfg.zoo == str(root.resolve()) and cfg.optimizer == str((root / "dm-rand").resolve())
    assert pin_paths(FitConfig(optimizer="dm-rand")).optimizer == "dm-rand"  # a name stays one
    monkeypatch.setenv("AUTOL2O_ZOO", "zoo")
    assert pin_paths(FitConfig()).zoo == str(root.resolve())
    # end to end: a run started with a relative --zoo, interrupted, resumes from elsewhere
    x, y = blobs()
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = write_model(tmp_path)
    real = pipeline.train_run

    def ctrl_c_in_first_sgd_trial(problem, opt, **kw):
        if opt.kind == "sgd":
            raise KeyboardInterrupt
        return real(problem, opt, **kw)

    monkeypatch.setattr(pipeline, "train_run", ctrl_c_in_first_sgd_trial)
    code, _, err = run_cli(["fit", model, data, "--steps", "10", "--trials", "2", "--seeds", "1",
                            "--quiet", "--zoo", "zoo", "--storage", "sqlite:///trials.db",
                            "--out", tmp_path / "run"], capsys)
    assert code == 130, err
    monkeypatch.setattr(pipeline, "train_run", real)
    monkeypatch.chdir(tmp_path / "d")   # "zoo" and "trials.db" mean nothing here
    # another storage would start the tuning over: refused, nothing touched
    code, _, err = run_cli(["fit", "--resume", tmp_path / "run", "--storage", "sqlite:///o.db"],
                           capsys)
    assert code == 2 and "--resume keeps that storage (drop --storage sqlite:///o.db)" in err, err
    assert not (tmp_path / "d" / "o.db").exists()
    code, _, err = run_cli(["fit", "--resume", tmp_path / "run", "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    assert r["status"] == "complete" and r["config"]["zoo"] == str(root.resolve())
    assert r["config"]["storage"] == f"sqlite:///{root.parent.resolve() / 'trials.db'}"
    assert r["tuning"]["adam"]["n_trials"] == 2   # found where they were, not run again
    assert not (tmp_path / "d" / "trials.db").exists()
