"""End-to-end ``autol2o fit`` runs on tiny data in every input format, and the report schema."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from test_fit_support import (  # noqa: F401  (zoo is a fixture)
    FAST,
    blobs,
    run_cli,
    write_csv,
    write_idx,
    write_images,
    write_model,
    zoo,
)

# every test gets a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")

TOP_KEYS = {"schema_version", "status", "autol2o_version", "created", "finished", "run_dir",
            "device", "inputs", "config", "race", "fine_tune", "tuning", "finals",
            "leaderboard", "verdict", "timings", "artifacts"}


def check_run(run_dir, trials=2, n_contenders=3, task="classification"):
    """Everything a finished run directory must hold, checked against the report's numbers."""
    for f in ("report.json", "report.md", "metrics.csv", "curves.png", "model.safetensors",
              "optuna.db", "state.json"):
        assert (run_dir / f).is_file(), f
    assert not list(run_dir.glob(".*.tmp")), "temporary files left behind"
    r = json.loads((run_dir / "report.json").read_text())
    assert set(r) == TOP_KEYS
    assert r["schema_version"] == 2 and r["status"] == "complete"
    assert r["inputs"]["task"] == task
    board = r["leaderboard"]
    assert len(board) == n_contenders
    assert [row["rank"] for row in board] == list(range(1, n_contenders + 1))
    means = [row["val_loss_mean"] for row in board if row["val_loss_mean"] is not None]
    assert means == sorted(means)
    assert r["verdict"]["winner"] == board[0]["name"]
    assert r["verdict"]["summary"].startswith(board[0]["name"])
    for kind, t in r["tuning"].items():
        done = t["n_complete"] + t["n_pruned"] + t["n_diverged"]
        assert done == trials, kind
        # compute spent = sum of the trials' own step counts, each at most the budget
        steps = [tr["steps_run"] for tr in t["trials"]]
        assert t["compute"]["steps"] == sum(steps)
        assert all(0 < s <= r["config"]["steps"] for s in steps)
        assert r["verdict"]["compute"][kind]["search_steps"] == sum(steps)
    for row in r["finals"]:
        assert len(row["runs"]) == r["config"]["seeds"]
        if task == "classification" and row["val_acc"]["mean"] is not None:
            assert 0.0 <= row["val_acc"]["mean"] <= 1.0
    # metrics.csv agrees with the final validation losses in the report
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == "phase,contender,seed,trial,step,train_loss,val_loss,val_acc"
    for row in r["finals"]:
        last = [ln for ln in lines if ln.startswith(f"final,{row['name']},")][-1].split(",")
        v = row["val_loss"]["values"][0]
        if v is not None:
            assert float(last[6]) == pytest.approx(v, rel=1e-5)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return r


def test_csv_dir_end_to_end(tmp_path, capsys):
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    model = write_model(tmp_path)
    code, out, err = run_cli(["fit", model, tmp_path / "data", *FAST, "--out", tmp_path / "run"],
                             capsys)
    assert code == 0, err
    r = check_run(tmp_path / "run")
    assert r["inputs"]["data"]["format"] == "csv"
    assert r["inputs"]["data"]["standardized"] is True
    assert r["race"]["picked"] in {"rnnprop-rand", "dm-rand"}
    assert len(r["race"]["entries"]) == 2
    assert "leaderboard" in out and r["verdict"]["winner"] in out
    # the saved winner weights load into the user's model and reproduce the reported loss
    from safetensors.torch import load_model

    from autol2o.fit import load_data, load_model_file

    m = load_model_file(model).build(0)
    load_model(m, str(tmp_path / "run" / "model.safetensors"))
    d = load_data(tmp_path / "data", seed=0)
    pre = json.loads((tmp_path / "run" / "preprocessing.json").read_text())["standardize"]
    np.testing.assert_allclose(pre["mean"], d.mean)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(m(d.x_val), d.y_val).item()
    winner = next(f for f in r["finals"] if f["name"] == r["verdict"]["winner"])
    assert loss == pytest.approx(winner["val_loss"]["values"][0], rel=1e-4)
    # a trial is exactly reproducible: best Adam config, the selection seed, the full budget
    from autol2o.fit import Problem
    from autol2o.fit.train import OptSpec, train_run

    p = Problem(load_model_file(model), d, torch.device("cpu"))
    t = r["tuning"]["adam"]
    rerun = train_run(p, OptSpec("adam", "adam", t["best_params"]), steps=20, seed=0,
                      batch_size=128, eval_every=r["config"]["eval_every"])
    assert rerun.final_val_loss == pytest.approx(t["best_value"], rel=1e-6)


def test_csv_with_val_and_named_target_and_json(tmp_path, capsys):
    x, y = blobs(120)
    names = np.array(["cat", "dog", "eel"])[y]
    write_csv(tmp_path / "d" / "train.csv", x[:90], names[:90], target="kind")
    write_csv(tmp_path / "d" / "val.csv", x[90:], names[90:], target="kind")
    model = write_model(tmp_path)
    code, out, err = run_cli(["fit", model, tmp_path / "d", *FAST, "--target", "kind", "--json",
                              "--optimizer", "dm-rand", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = json.loads(out)  # stdout is exactly the report JSON
    assert r == json.loads((tmp_path / "run" / "report.json").read_text())
    assert r["race"]["skipped"] and r["race"]["picked"] == "dm-rand"
    d = r["inputs"]["data"]
    assert (d["n_train"], d["n_val"], d["split"]) == (90, 30, "given")
    assert d["classes"] == ["cat", "dog", "eel"]


def test_json_stdout_survives_printing_model_and_files_follow_umask(tmp_path, capsys):
    """User code that prints (at import and per build) cannot corrupt --json's stdout; run files
    get the umask's mode (not mkstemp's 0600); one seed has no std (null, not 0.0)."""
    x, y = blobs()
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = tmp_path / "talky.py"
    model.write_text("print('loading')\n" + write_model(tmp_path).read_text().replace(
        "    return", "    print('building')\n    return"))
    old = os.umask(0o022)
    try:
        code, out, err = run_cli(["fit", model, data, *FAST, "--json", "--optimizer", "dm-rand",
                                  "--baselines", "adam", "--out", tmp_path / "run"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    r = json.loads(out)
    assert "loading" in err and "building" in err
    assert all(row["val_loss_std"] is None for row in r["leaderboard"])
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {"0o644"}, modes


def test_npz_file_and_npy_dir(tmp_path, capsys):
    x, y = blobs()
    np.savez(tmp_path / "data.npz", X=x, y=y)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "X.npy", x)
    np.save(tmp_path / "npy" / "y.npy", y)
    model = write_model(tmp_path)
    for src, fmt in ((tmp_path / "data.npz", "npz"), (tmp_path / "npy", "npy")):
        out_dir = tmp_path / f"run-{fmt}"
        loud = [a for a in FAST if a != "--quiet"]
        code, _, err = run_cli(["fit", model, src, *loud, "--baselines", "adam",
                                "--out", out_dir], capsys)
        assert code == 0, err
        r = check_run(out_dir, n_contenders=2)
        assert r["inputs"]["data"]["format"] == fmt
        assert f"{fmt} data from" in err  # what was detected is printed to stderr


def test_image_folder(tmp_path, capsys):
    write_images(tmp_path / "imgs", size=6)
    model = write_model(tmp_path, d=36)
    code, _, err = run_cli(["fit", model, tmp_path / "imgs", *FAST, "--baselines", "sgd",
                            "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = check_run(tmp_path / "run", n_contenders=2)
    d = r["inputs"]["data"]
    assert d["format"] == "images" and d["input_shape"] == [1, 6, 6]
    assert d["classes"] == ["a", "b", "c"] and d["standardized"] is False


def test_mnist_idx(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    imgs = (rng.integers(0, 80, (60, 5, 5)) + 80 * y[:, None, None]).astype(np.uint8)
    (tmp_path / "mn").mkdir()
    write_idx(tmp_path / "mn" / "train-images-idx3-ubyte.gz", imgs[:45])
    write_idx(tmp_path / "mn" / "train-labels-idx1-ubyte.gz", y[:45])
    write_idx(tmp_path / "mn" / "t10k-images-idx3-ubyte.gz", imgs[45:])
    write_idx(tmp_path / "mn" / "t10k-labels-idx1-ubyte.gz", y[45:])
    model = write_model(tmp_path, d=25)
    code, _, err = run_cli(["fit", model, tmp_path / "mn", *FAST, "--baselines", "adam",
                            "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = check_run(tmp_path / "run", n_contenders=2)
    d = r["inputs"]["data"]
    assert d["format"] == "idx" and (d["n_train"], d["n_val"]) == (45, 15)


def test_regression_csv_with_entry_points(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=80)
    write_csv(tmp_path / "r.csv", x, y, target="target")
    # a class `Model` entry point and a custom loss_fn, one of shape (1,) rather than 0-d
    (tmp_path / "reg.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def loss_fn(out, y):\n    return ((out - y[:, None]) ** 2).mean(0)\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(4, 1)\n"
        "    def forward(self, x):\n        return self.l(x)\n")
    code, _, err = run_cli(["fit", tmp_path / "reg.py", tmp_path / "r.csv", *FAST,
                            "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = check_run(tmp_path / "run", task="regression")
    assert r["inputs"]["entry_point"] == "Model" and r["inputs"]["loss"] == "loss_fn (user)"
    assert all(row["val_acc_mean"] is None for row in r["leaderboard"])


def test_embedded_default_and_default_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["fit", *FAST], capsys)
    assert code == 0, err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-mlp_digits")
    r = check_run(runs[0])
    assert r["inputs"]["data"]["source"].startswith("digits")
    assert r["inputs"]["n_params"] == 64 * 64 + 64 + 64 * 10 + 10
    # a second run in the same second gets its own directory
    code, _, err = run_cli(["fit", *FAST], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("entry, meta_loss", [("rnnprop-rand", "last"), ("dm-rand", "mean")])
def test_fine_tune_saves_a_zoo_entry_in_the_run(tmp_path, capsys, entry, meta_loss):
    """Fine-tuning writes a checksummed entry of the picked rule, meta-trained on that rule's
    own meta-loss (RNNprop: last step of each unroll; DM: mean over the unroll)."""
    from autol2o.optimizers import DMOptimizer, RNNprop
    from autol2o.zoo import load_entry

    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    model = write_model(tmp_path)
    code, _, err = run_cli(["fit", model, tmp_path / "data", *FAST, "--fine-tune", "2",
                            "--optimizer", entry, "--baselines", "adam",
                            "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = check_run(tmp_path / "run", n_contenders=2)
    ft = r["fine_tune"]
    assert ft["iterations"] == 2 and ft["name"] == f"{entry}-ft"
    rule, card = load_entry(tmp_path / "run" / "fine-tuned")      # checksum-verified entry
    assert r["artifacts"]["fine_tuned"] == "fine-tuned"
    assert not (tmp_path / "run" / "fine-tune-checkpoint").exists()   # spent once on record
    assert isinstance(rule, DMOptimizer if entry == "dm-rand" else RNNprop)
    assert card["base"] == entry and card["train_config"]["meta_loss"] == meta_loss
    learned = next(f for f in r["finals"] if f["kind"] == "learned")
    assert learned["name"] == (f"{entry}-ft" if ft["used"] else entry)
    assert ft["used"] == (ft["best_iteration"] != 0
                          and ft["probe_val_loss_after"] <= ft["probe_val_loss_before"])
    assert r["verdict"]["compute"]["learned"]["search_steps"] == ft["optimizee_steps"]
    # 2 unrolls of 20 steps x 2 instances + 3 validations (start, after 1, after 2) of 4 runs
    # x 20 steps + 2 full-length runs of 20 steps (--steps 20)
    tc = card["train_config"]
    assert (tc["unroll"], tc["batch"], tc["val_runs"], tc["horizon"]) == (20, 2, 4, 20)
    assert tc["meta_data"] == "heldout"
    assert ft["optimizee_steps"] == 2 * 20 * 2 + 3 * 4 * 20 + 2 * 20


def test_report_schema_is_documented():
    """Every top-level report key is described in autol2o.fit.report's docstring."""
    from autol2o.fit import report

    doc = report.__doc__
    assert f"schema_version`` {report.SCHEMA_VERSION}" in doc
    for key in TOP_KEYS:
        assert f"\n    {key} " in doc or key in ("autol2o_version", "created", "finished",
                                                "run_dir", "device") and key in doc, key


def test_cli_defaults_match_the_library():
    import inspect

    from autol2o.cli import fit as fit_cli
    from autol2o.fit import FitConfig

    params = inspect.signature(fit_cli.fit).parameters
    cfg = FitConfig()
    for name in ("steps", "trials", "seeds", "fine_tune", "batch_size", "n_jobs", "seed"):
        assert params[name].default == getattr(cfg, name), name
    assert params["probe"].default == cfg.probe_fraction


def test_verdict_significance_is_a_paired_t_test_over_the_shared_seeds():
    import statistics

    from scipy import stats

    from autol2o.fit.pipeline import paired_t

    # seed 2 is hard for both: unpaired, its spread hides a gap every seed shows
    win, other = [0.100, 0.104, 0.140], [0.106, 0.111, 0.146]
    diffs = [b - a for a, b in zip(win, other)]
    v = paired_t(diffs)
    ref = stats.ttest_rel(other, win)
    assert v["p_value"] == pytest.approx(ref.pvalue, rel=1e-9) and v["significant"]
    assert stats.ttest_ind(other, win, equal_var=False).pvalue > 0.5  # Welch: "noise"
    se = statistics.stdev(diffs) / math.sqrt(3)
    assert v["noise"] == pytest.approx(stats.t.ppf(0.975, 2) * se, rel=1e-12)
    # 2 standard errors would call a gap real; with 2 degrees of freedom it is not
    d2 = [0.010, 0.002, 0.018]
    v2 = paired_t(d2)
    assert statistics.fmean(d2) > 2 * statistics.stdev(d2) / math.sqrt(3)
    assert not v2["significant"] and v2["noise"] > statistics.fmean(d2)
    assert paired_t([0.01, 0.01])["significant"]            # the same gap on every seed
    assert not paired_t([0.0, 0.0])["significant"]
