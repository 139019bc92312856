"""Two ``autol2o fit`` processes sharing one Optuna study: no trial lost or duplicated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from test_fit_support import blobs, write_csv, write_model, zoo  # noqa: F401

from autol2o.tuning import counts_as_done, make_storage

# every test gets a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")

TRIALS = 8


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_processes_share_one_study(tmp_path, kind):
    x, y = blobs()
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = write_model(tmp_path)
    url = (f"journal:///{tmp_path / 'study.log'}" if kind == "journal"
           else f"sqlite:///{tmp_path / 'study.db'}")
    env = dict(os.environ)  # AUTOL2O_ZOO set by the fixture
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "autol2o", "fit", str(model), str(data), "--steps", "100",
               "--trials", str(TRIALS), "--seeds", "1", "--baselines", "adam", "--optimizer",
               "dm-rand", "--storage", url, "--study", "shared", "--json",
               "--out", str(tmp_path / f"run{i}")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        reports.append(json.loads(out))

    study = optuna.load_study(study_name="shared-adam", storage=make_storage(url))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    ids = [t._trial_id for t in trials]
    assert sorted(numbers) == list(range(len(trials)))          # no gaps, no duplicates
    assert len(set(ids)) == len(ids)
    assert all(counts_as_done(t) for t in trials)               # nothing left running/lost
    # each process stops once the study is full; at most one trial per extra process overshoots
    assert TRIALS <= len(trials) <= TRIALS + 1
    mine = [set(r["tuning"]["adam"]["trials_by_this_process"]) for r in reports]
    assert not (mine[0] & mine[1])                             # nobody ran a trial twice
    assert mine[0] | mine[1] == set(numbers)                    # every trial has its runner
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2                                    # both processes contributed
    # finals use the shared study's best configuration as it stood when that process's tuning
    # ended; the process that finished tuning last saw every trial
    best = study.best_trial.params
    complete = [t.params for t in trials if t.state.name == "COMPLETE"]
    for r in reports:
        adam = next(f for f in r["finals"] if f["kind"] == "adam")
        assert adam["params"] in complete
    assert any(r["tuning"]["adam"]["best_params"] == best for r in reports)
    assert any(r["tuning"]["adam"]["n_trials"] == len(trials) for r in reports)
