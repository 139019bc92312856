"""autol2o.tuning: search spaces, failed-trial handling, trial accounting, storages."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from autol2o.errors import UserError
from autol2o.tuning import (
    LR_RANGE,
    Diverged,
    best_trial,
    compute_spent,
    make_storage,
    n_done,
    open_study,
    run_study,
    steps_to_match,
    suggest,
)


def study(tmp_path, name="s", seed=0):
    return open_study(f"sqlite:///{tmp_path / 'o.db'}", name, seed, shared=False)


def test_search_spaces(tmp_path):
    s = study(tmp_path)
    seen = {"adam": [], "sgd": []}
    for kind in seen:
        for _ in range(30):
            t = s.ask()
            seen[kind].append(suggest(t, kind))
            s.tell(t, 0.0)
    assert all(set(p) == {"lr"} for p in seen["adam"])
    assert all(set(p) == {"lr", "momentum", "nesterov"} for p in seen["sgd"])
    lrs = [p["lr"] for ps in seen.values() for p in ps]
    assert all(LR_RANGE[0] <= lr <= LR_RANGE[1] for lr in lrs)
    # log-uniform: draws span several decades, not just the top one
    assert max(lrs) / min(lrs) > 1e3
    assert all(0.0 <= p["momentum"] <= 0.99 for p in seen["sgd"])
    assert {p["nesterov"] for p in seen["sgd"]} == {False, True}
    assert isinstance(s.sampler, optuna.samplers.TPESampler)
    assert isinstance(s.pruner, optuna.pruners.MedianPruner)


def fake_objective(values):
    """Objective returning scripted values; a NaN means 'diverged'; records 10 steps/trial."""
    def objective(trial):
        suggest(trial, "adam")
        v = values[trial.number]
        trial.set_user_attr("steps_run", 10)
        trial.set_user_attr("curve_steps", [0, 5, 10])
        trial.set_user_attr("curve_val", [2.0, (2.0 + v) / 2 if math.isfinite(v) else None, v])
        if not math.isfinite(v):
            trial.set_user_attr("diverged", True)
            raise Diverged("boom")
        return v
    return objective


def test_diverged_trials_fail_without_stopping_the_study(tmp_path):
    s = study(tmp_path)
    ran = run_study(s, fake_objective([1.0, math.nan, 0.5, 0.7]), 4)
    assert ran == 4
    states = [t.state for t in s.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                      TrialState.COMPLETE]
    assert n_done(s) == 4                      # a diverged trial counts as finished
    assert best_trial(s).value == 0.5
    assert compute_spent(s)["steps"] == 40


def test_interrupted_trials_are_not_counted_and_resume_fills_up(tmp_path):
    s = study(tmp_path)
    run_study(s, fake_objective([1.0] * 10), 2)

    def interrupted(trial):
        suggest(trial, "adam")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(s, interrupted, 5)
    assert n_done(s) == 2 and len(s.trials) == 3
    s2 = open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", 0, shared=False)
    assert run_study(s2, fake_objective([0.9] * 10), 5) == 3
    assert n_done(s2) == 5
    # the resumed sampler is seeded differently, so it does not replay trial 0's draw
    assert len({t.params["lr"] for t in s2.trials}) == len(s2.trials)


def test_steps_to_match_counts_trials_in_order(tmp_path):
    s = study(tmp_path)
    run_study(s, fake_objective([1.5, math.nan, 0.4, 0.2]), 4)
    # curve of trial k: [2.0 @0, (2+v)/2 @5, v @10]
    assert steps_to_match(s, 2.0) == 0                # trial 0 at step 0
    assert steps_to_match(s, 1.5) == 10               # trial 0's final value
    assert steps_to_match(s, 0.5) == 10 + 10 + 10     # trial 2, step 10 (after 2 full trials)
    assert steps_to_match(s, 1.2) == 20 + 5           # trial 2, mid-curve: (2+0.4)/2 = 1.2
    assert steps_to_match(s, 0.2) == 30 + 10
    assert steps_to_match(s, 0.1) is None


def test_run_study_respects_trials_added_by_others(tmp_path):
    s = study(tmp_path)
    run_study(s, fake_objective([1.0] * 10), 3)
    other = open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", 0, shared=True)
    assert run_study(other, fake_objective([1.0] * 10), 3) == 0   # already full
    assert run_study(other, fake_objective([1.0] * 10), 4) == 1


def test_storages(tmp_path):
    j = make_storage(f"journal:///{tmp_path / 'a' / 'j.log'}")
    assert isinstance(j, optuna.storages.JournalStorage)
    assert isinstance(make_storage(str(tmp_path / "k.log")), optuna.storages.JournalStorage)
    assert isinstance(make_storage(f"sqlite:///{tmp_path / 'x.db'}"), optuna.storages.RDBStorage)
    with pytest.raises(UserError, match="not an Optuna storage URL"):
        make_storage("somewhere")
    with pytest.raises(UserError, match="cannot open Optuna storage"):
        make_storage("sqlite:////nonexistent-dir/x/y.db", attempts=2)


def test_file_storages_are_relative_with_three_slashes_and_pinned_absolute(tmp_path, monkeypatch):
    """journal:///f.log, like sqlite:///f.db, is relative to the working directory (four slashes:
    absolute); pin_storage makes either absolute, for a run to save."""
    from autol2o.tuning import pin_storage

    monkeypatch.chdir(tmp_path)
    make_storage("journal:///rel.log")
    assert (tmp_path / "rel.log").exists()
    make_storage("journal:rel2.journal")
    assert (tmp_path / "rel2.journal").exists()
    assert pin_storage("sqlite:///x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert pin_storage("journal:///j.log") == f"journal:///{tmp_path / 'j.log'}"
    assert pin_storage("sub/k.log") == str(tmp_path / "sub" / "k.log")
    for fixed in (f"sqlite:///{tmp_path / 'x.db'}", "postgresql://u:p@h/db", "sqlite://", None):
        assert pin_storage(fixed) == fixed


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:pw@host:5432/db", "postgresql://u:***@host:5432/db"),
    ("postgresql://:secret@host/db", "postgresql://:***@host/db"),        # no user name
    ("mysql+pymysql://u:p@ss:w@host/db", "mysql+pymysql://u:***@host/db"),  # '@' in the password
    ("postgresql://u@host/db", "postgresql://u@host/db"),
    ("sqlite:////tmp/a@b.db", "sqlite:////tmp/a@b.db"),                    # '@' in a path
])
def test_redact_hides_every_password(url, shown):
    from autol2o.tuning import redact

    assert redact(url) == shown


def test_missing_database_driver_is_one_clear_error_without_retries(monkeypatch):
    calls = []

    def no_driver(url, **kwargs):
        calls.append(url)
        raise ImportError("Failed to import DB access module for the specified storage URL.")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    with pytest.raises(UserError, match=r"no database driver .* psycopg2-binary .* pymysql"):
        make_storage("postgresql://u@db/optuna")
    assert calls == ["postgresql://u@db/optuna"]  # not retried

    def unreachable(url, **kwargs):
        raise RuntimeError(f"could not connect to {url}")

    monkeypatch.setattr(optuna.storages, "RDBStorage", unreachable)
    with pytest.raises(UserError) as err:
        make_storage("postgresql://u:hunter2@db/optuna", attempts=1)
    assert "hunter2" not in str(err.value) and "postgresql://u:***@db/optuna" in str(err.value)
