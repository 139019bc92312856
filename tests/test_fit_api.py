"""``autol2o.optimize``: the Python API over the same pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit_support import blobs, zoo  # noqa: F401  (zoo is a fixture)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autol2o

# every test gets a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")


def loaders(n=120):
    x, y = blobs(n)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    tr = DataLoader(TensorDataset(x[:90], y[:90]), batch_size=32, shuffle=True)
    va = DataLoader(TensorDataset(x[90:], y[90:]), batch_size=64)
    return tr, va


def test_optimize_with_dataloaders(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tr, va = loaders()
    res = autol2o.optimize(model, tr, va, steps=20, trials=2, seeds=2, out=tmp_path / "run",
                           progress=False)
    assert res.run_dir == tmp_path / "run"
    assert res.report == json.loads((tmp_path / "run" / "report.json").read_text())
    assert res.winner == res.leaderboard[0]["name"] == res.report["verdict"]["winner"]
    assert {r["name"] for r in res.leaderboard} >= {"adam", "sgd"}
    assert res.report["config"]["batch_size"] == 32          # taken from the loader
    d = res.report["inputs"]["data"]
    assert (d["n_train"], d["n_val"], d["split"]) == (90, 30, "given")
    # the user's module is left untouched; .model is a trained copy that reproduces the
    # winner's first-seed validation loss
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())
    xv = torch.cat([b[0] for b in va])
    yv = torch.cat([b[1] for b in va])
    with torch.no_grad():
        loss = nn.functional.cross_entropy(res.model(xv), yv).item()
    winner = next(f for f in res.report["finals"] if f["name"] == res.winner)
    assert loss == pytest.approx(winner["val_loss"]["values"][0], rel=1e-4)
    assert len(winner["runs"]) == 2 and winner["seeds"] == [1, 2]   # fresh seeds, not the selection seed 0
    # each seed draws its own initial weights, so the two seeds differ
    assert winner["val_loss"]["values"][0] != winner["val_loss"]["values"][1]


def test_optimize_splits_without_val_loader_and_accepts_factories(tmp_path):
    x, y = blobs(100)
    xy = (torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    def build():
        return nn.Sequential(nn.Linear(6, 3))

    res = autol2o.optimize(build, xy, steps=10, trials=2, seeds=1, out=tmp_path / "r",
                           optimizer="rnnprop-rand", progress=False)
    d = res.report["inputs"]["data"]
    assert (d["n_train"], d["n_val"]) == (80, 20) and d["split"].startswith("random 80/20")
    assert res.report["race"]["skipped"] is True
    assert isinstance(res.model, nn.Sequential)


def test_optimize_is_deterministic(tmp_path):
    x, y = blobs(80)
    xy = (torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    reps = []
    for i in range(2):
        torch.manual_seed(0)
        m = nn.Linear(6, 3)
        res = autol2o.optimize(m, xy, steps=10, trials=2, seeds=1, out=tmp_path / f"r{i}",
                               progress=False)
        reps.append([(r["name"], r["val_loss_mean"]) for r in res.leaderboard])
    assert reps[0] == reps[1]


def test_parallel_trials_n_jobs(tmp_path):
    x, y = blobs(80)
    xy = (torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    res = autol2o.optimize(nn.Linear(6, 3), xy, steps=10, trials=4, seeds=1, n_jobs=2,
                           out=tmp_path / "r", optimizer="dm-rand", progress=False)
    for t in res.report["tuning"].values():
        assert t["n_trials"] == 4 and t["trials_by_this_process"] == [0, 1, 2, 3]
        assert t["n_complete"] + t["n_pruned"] == 4


def test_parallel_trials_share_one_starting_model_drawn_before_the_threads(tmp_path,
                                                                        monkeypatch):
    """With --n-jobs > 1 the trials' starting weights are drawn once, in the main thread: two
    threads seeding and drawing from torch's global generator at once could mix the weights."""
    import threading

    from autol2o.fit.problem import UserModel

    builds, real_build = [], UserModel.build

    def spy(self, seed):
        builds.append((seed, threading.current_thread() is threading.main_thread()))
        return real_build(self, seed)

    monkeypatch.setattr(UserModel, "build", spy)
    x, y = blobs(80)
    xy = (torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    # seed 7: no phase before tuning (the race is skipped) has drawn this seed's weights yet
    autol2o.optimize(nn.Linear(6, 3), xy, steps=10, trials=4, seeds=1, n_jobs=2, seed=7,
                     out=tmp_path / "r", optimizer="dm-rand", progress=False)
    assert builds.count((7, True)) == 1 and all(main for _, main in builds)


def test_storage_password_never_reaches_run_files(tmp_path, monkeypatch):
    """A database URL's password is redacted in report.json, report.md and state.json; resuming
    such a run needs the URL again (and only the same URL is accepted)."""
    import optuna

    import autol2o.fit.pipeline as pipeline
    import autol2o.tuning as tuning
    from autol2o.errors import UserError
    from autol2o.fit.pipeline import FitConfig, restore_storage

    url = "postgresql+psycopg2://me:s3cret-pw@db.example/optuna"
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    opened = []

    def fake_storage(u, **kwargs):  # no database server in tests: same URL, a journal behind it
        opened.append(u)
        return journal

    monkeypatch.setattr(pipeline, "make_storage", fake_storage)
    monkeypatch.setattr(tuning, "make_storage", fake_storage)
    torch.manual_seed(0)
    tr, va = loaders()
    autol2o.optimize(nn.Linear(6, 3), tr, va, steps=10, trials=2, seeds=1, storage=url,
                     study="s", out=tmp_path / "run", progress=False)
    assert opened and set(opened) == {url}       # the real URL was used to connect
    files = [f for f in (tmp_path / "run").rglob("*") if f.suffix in (".json", ".md", ".csv")]
    assert {f.name for f in files} >= {"report.json", "report.md", "state.json"}
    for f in files:
        assert "s3cret" not in f.read_text(), f
    saved = json.loads((tmp_path / "run" / "state.json").read_text())["config"]["storage"]
    assert saved == "postgresql+psycopg2://me:***@db.example/optuna"

    cfg = FitConfig.from_dict({"storage": saved})
    assert restore_storage(cfg, url, tmp_path).storage == url
    for given in (None, "postgresql+psycopg2://me:pw@other-host/optuna"):
        with pytest.raises(UserError, match="has a password, which is not saved"):
            restore_storage(FitConfig.from_dict({"storage": saved}), given, tmp_path)
    plain = FitConfig.from_dict({"storage": "sqlite:///x.db"})
    assert restore_storage(plain, None, tmp_path).storage == "sqlite:///x.db"


def test_single_logit_classification_reports_no_accuracy(tmp_path):
    """Binary classification with one logit and a custom BCE loss: argmax over one column means
    nothing, so accuracy is null (not 0.0, not the share of class 0); the loss still counts."""
    x, y = blobs(120, k=2)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    tr = DataLoader(TensorDataset(x[:90], y[:90]), batch_size=32)
    va = DataLoader(TensorDataset(x[90:], y[90:]), batch_size=64)

    def bce(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], t.float())

    res = autol2o.optimize(nn.Linear(6, 1), tr, va, steps=10, trials=2, seeds=1, loss_fn=bce,
                           task="classification", out=tmp_path / "run", progress=False)
    rows = res.leaderboard
    assert rows and all(r["val_acc_mean"] is None for r in rows)
    assert all(r["val_loss_mean"] is not None for r in rows)
