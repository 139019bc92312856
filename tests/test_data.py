"""autol2o.fit.data: format detection, targets and tasks, split, standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fit_support import blobs, write_csv, write_idx, write_images

from autol2o.errors import UserError
from autol2o.fit.data import load_data


def test_csv_target_column_rules(tmp_path):
    x, y = blobs(30, d=3)
    # "target" wins over the last column; "label" too; else the last column; --target overrides
    p = tmp_path / "a.csv"
    p.write_text("target,f1,f2,f3\n" + "\n".join(
        f"{t},{a},{b},{c}" for t, (a, b, c) in zip(y, x)))
    d = load_data(p)
    assert d.x_train.shape[1] == 3 and d.task == "classification" and d.n_classes == 3
    write_csv(tmp_path / "b.csv", x, y, target="whatever")
    assert load_data(tmp_path / "b.csv").n_classes == 3
    d = load_data(tmp_path / "b.csv", target="f0")      # a float column -> regression
    assert d.task == "regression" and d.y_train.dtype == torch.float32
    with pytest.raises(UserError, match="b.csv: target column 'nope' not found"):
        load_data(tmp_path / "b.csv", target="nope")


def test_labels_are_mapped_and_tasks_inferred(tmp_path):
    x, _ = blobs(40, d=2)
    write_csv(tmp_path / "s.csv", x, ["b", "a"] * 20)
    d = load_data(tmp_path / "s.csv")
    assert d.classes == ["a", "b"] and set(d.y_train.tolist()) <= {0, 1}
    write_csv(tmp_path / "n.csv", x, [-1, 1] * 20)     # negative ints: remapped
    d = load_data(tmp_path / "n.csv")
    assert d.classes == [-1, 1] and d.n_classes == 2
    write_csv(tmp_path / "f.csv", x, np.linspace(0, 1, 40))
    assert load_data(tmp_path / "f.csv").task == "regression"
    # MODEL.py's task overrides inference
    assert load_data(tmp_path / "n.csv", task="regression").task == "regression"


def test_split_is_deterministic_and_stratified(tmp_path):
    x, y = blobs(100)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    a, b = load_data(tmp_path / "d.npz", seed=3), load_data(tmp_path / "d.npz", seed=3)
    c = load_data(tmp_path / "d.npz", seed=4)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    assert len(a.x_val) == 20 and a.split == "random 80/20, seed 3"
    counts = torch.bincount(a.y_val, minlength=3).tolist()
    assert max(counts) - min(counts) <= 1               # stratified


def test_standardisation_uses_training_statistics_only(tmp_path):
    rng = np.random.default_rng(0)
    xtr, xva = rng.normal(5, 3, (50, 4)), rng.normal(-2, 1, (20, 4))
    xtr[:, 2] = 7.0                                     # constant column: sigma := 1
    write_csv(tmp_path / "d" / "train.csv", xtr, np.arange(50) % 2)
    write_csv(tmp_path / "d" / "val.csv", xva, np.arange(20) % 2)
    d = load_data(tmp_path / "d")
    xtr_r, xva_r = np.round(xtr, 6), np.round(xva, 6)   # the CSV holds 6 decimals
    mu, sd = xtr_r.mean(0), xtr_r.std(0)
    sd[sd == 0] = 1.0
    np.testing.assert_allclose(d.x_train.numpy(), (xtr_r - mu) / sd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.x_val.numpy(), (xva_r - mu) / sd, rtol=1e-5, atol=1e-5)
    # validation data are *not* centred on themselves (no leakage of their statistics)
    assert abs(d.x_val[:, 0].mean().item()) > 1.0
    assert d.split == "given" and d.standardized


def test_npy_dir_with_validation_files(tmp_path):
    x, y = blobs(60)
    for name, arr in (("X", x[:40]), ("y", y[:40]), ("X_val", x[40:]), ("y_val", y[40:])):
        np.save(tmp_path / f"{name}.npy", arr)
    d = load_data(tmp_path)
    assert (len(d.x_train), len(d.x_val), d.format) == (40, 20, "npy")


def test_idx_and_images(tmp_path):
    imgs = np.arange(4 * 3 * 3).reshape(4, 3, 3) % 256
    (tmp_path / "m").mkdir()
    write_idx(tmp_path / "m" / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte.gz", np.array([0, 1, 0, 1]))
    d = load_data(tmp_path / "m")
    assert d.format == "idx" and not d.standardized
    allx = torch.cat([d.x_train, d.x_val])
    assert allx.shape[1:] == (1, 3, 3) and 0.0 <= allx.min() and allx.max() <= 1.0
    assert sorted((allx * 255).round().flatten().tolist()) == sorted(imgs.flatten().tolist())

    write_images(tmp_path / "im", n_per_class=4, classes=("x", "y"), size=5)
    d = load_data(tmp_path / "im")
    assert d.classes == ["x", "y"] and d.x_train.shape[1:] == (1, 5, 5)
    # an image of another size is named in the error
    from PIL import Image

    Image.new("L", (7, 7)).save(tmp_path / "im" / "y" / "odd.png")
    with pytest.raises(UserError, match="odd.png: image size 7x7"):
        load_data(tmp_path / "im")


def test_bad_idx_and_builtins(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "m" / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read IDX"):
        load_data(tmp_path / "m")
    d = load_data(None)
    assert (d.n_classes, len(d.x_train) + len(d.x_val)) == (10, 1797)
    assert load_data("diabetes").task == "regression"
