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


def test_16_bit_and_mixed_images_keep_their_values(tmp_path):
    """16-bit grey PNGs are scaled by 65535 (not clipped at 255); with one RGB image in the
    folder, grey images become 3 equal channels."""
    from PIL import Image

    vals = np.array([[0, 1000, 30000, 65535]] * 4, dtype=np.uint16)
    for c in ("a", "b"):
        (tmp_path / "im" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(vals).save(tmp_path / "im" / c / f"{i}.png")
    d = load_data(tmp_path / "im")
    allx = torch.cat([d.x_train, d.x_val])
    assert allx.shape[1:] == (1, 4, 4)
    assert torch.allclose(allx[0, 0, 0], torch.tensor([0, 1000, 30000, 65535]) / 65535.0)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "im" / "a" / "rgb.png")
    d = load_data(tmp_path / "im")
    allx = torch.cat([d.x_train, d.x_val])
    assert allx.shape[1:] == (3, 4, 4)
    red = [x for x in allx if x[0].min() == 1.0 and x[1].max() == 0.0]
    grey = [x for x in allx if torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])]
    assert len(red) == 1 and len(grey) == 6
    assert torch.allclose(grey[0][0, 0], torch.tensor([0, 1000, 30000, 65535]) / 65535.0)


def test_npz_image_arrays_uint8_scaled_float_as_given(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20, 1, 4, 4)).astype(np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "u8.npz", X=imgs, y=y)
    d = load_data(tmp_path / "u8.npz")
    allx = torch.cat([d.x_train, d.x_val])
    assert not d.standardized and 0.0 <= allx.min() and allx.max() <= 1.0
    assert sorted((allx * 255).round().flatten().tolist()) == sorted(imgs.flatten().tolist())
    assert any("uint8 inputs scaled to [0, 1]" in n for n in d.notes)
    np.savez(tmp_path / "f.npz", X=imgs.astype(np.float32) * 3, y=y)
    d = load_data(tmp_path / "f.npz")
    allx = torch.cat([d.x_train, d.x_val])
    assert sorted(allx.flatten().tolist()) == sorted((imgs.astype(np.float32) * 3).flatten().tolist())
    assert any("used as given" in n for n in d.notes)


def test_bad_idx_and_builtins(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "m" / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read IDX"):
        load_data(tmp_path / "m")
    d = load_data(None)
    assert (d.n_classes, len(d.x_train) + len(d.x_val)) == (10, 1797)
    assert load_data("diabetes").task == "regression"


def _csv_lines(path, lines: list[str], **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", **kw)


def test_csv_targets_that_are_not_finite_are_refused(tmp_path):
    # the CSV targets are strings until _labels converts them: "nan"/"inf" must still be caught
    x, y = blobs(20, d=2)
    for bad in ("nan", "inf"):
        write_csv(tmp_path / bad / "train.csv", x, [bad if i == 3 else v for i, v in enumerate(y)])
        with pytest.raises(UserError, match=r"train.csv: targets contain NaN or inf \(1 value\)"):
            load_data(tmp_path / bad)
    write_csv(tmp_path / "v" / "train.csv", x, y)
    write_csv(tmp_path / "v" / "val.csv", x, [1.5] * 19 + ["nan"])
    with pytest.raises(UserError, match="validation targets contain NaN or inf"):
        load_data(tmp_path / "v")


def test_csv_header_details(tmp_path):
    x, y = blobs(30, d=2)
    rows = [f"{a},{b},{t}" for (a, b), t in zip(x, y)]
    # a spreadsheet's byte-order mark must not hide the first column's name
    _csv_lines(tmp_path / "bom" / "train.csv", ["target,a,b"] + [f"{t},{a},{b}" for (a, b), t
                                                                  in zip(x, y)], encoding="utf-8-sig")
    d = load_data(tmp_path / "bom")
    assert d.task == "classification" and d.n_classes == 3 and d.x_train.shape[1] == 2
    # semicolon-separated files are read too
    _csv_lines(tmp_path / "semi" / "train.csv", ["a;b;label"] + [r.replace(",", ";") for r in rows])
    assert load_data(tmp_path / "semi").n_classes == 3
    _csv_lines(tmp_path / "dup" / "train.csv", ["a,label,label"] + rows)
    with pytest.raises(UserError, match="train.csv: duplicate column name 'label'"):
        load_data(tmp_path / "dup")
    _csv_lines(tmp_path / "empty" / "train.csv", ["a,b,label"] + rows[:5] + ["1,2,"])
    with pytest.raises(UserError, match="train.csv: line 7: missing target value"):
        load_data(tmp_path / "empty")


def test_val_csv_columns_are_matched_by_name(tmp_path):
    x, y = blobs(40, d=3)
    write_csv(tmp_path / "d" / "train.csv", x, y)
    # the same rows with the feature columns in reverse order
    _csv_lines(tmp_path / "d" / "val.csv", ["label,f2,f1,f0"] + [
        f"{t},{c:.6f},{b:.6f},{a:.6f}" for (a, b, c), t in zip(x, y)])
    d = load_data(tmp_path / "d")
    assert torch.allclose(d.x_val, d.x_train, atol=1e-5)  # standardised with the same stats
    _csv_lines(tmp_path / "d" / "val.csv", ["label,f2,f1,zz"] + [f"{t},1,2,3" for t in y])
    with pytest.raises(UserError, match="val.csv: feature columns differ from train.csv's"):
        load_data(tmp_path / "d")
    # a directory with only val.csv must not train and validate on the same rows
    (tmp_path / "d" / "train.csv").unlink()
    with pytest.raises(UserError, match=r"no training CSV \(train.csv\) beside val.csv"):
        load_data(tmp_path / "d")


def test_gappy_integer_labels_become_contiguous_classes(tmp_path):
    x, _ = blobs(40, d=2)
    write_csv(tmp_path / "y.csv", x, [1990, 2000, 2010, 10000] * 10)
    d = load_data(tmp_path / "y.csv")
    assert d.n_classes == 4 and d.classes == [1990, 2000, 2010, 10000]  # numeric, not str, order
    assert sorted(set(d.y_train.tolist()) | set(d.y_val.tolist())) == [0, 1, 2, 3]
    write_csv(tmp_path / "c.csv", x, [0, 1, 2, 3] * 10)   # already 0..K-1: kept as is
    d = load_data(tmp_path / "c.csv")
    assert d.classes is None and d.n_classes == 4


def test_detection_priority_and_odd_arrays(tmp_path):
    x, y = blobs(30, d=2)
    (tmp_path / "n").mkdir()
    np.savez(tmp_path / "n" / "data.npz", X=x, y=y)
    write_csv(tmp_path / "n" / "meta.csv", x, y)          # a stray CSV beside the real data
    d = load_data(tmp_path / "n")
    assert d.format == "npz" and d.notes == ["ignored: meta.csv"]
    with pytest.raises(UserError, match="--target applies to CSV data only"):
        load_data(tmp_path / "n", target="label")
    write_images(tmp_path / "i", classes=("a", "b"))
    (tmp_path / "i" / "empty").mkdir()
    write_csv(tmp_path / "i" / "labels.csv", x, y)
    d = load_data(tmp_path / "i")
    assert d.format == "images" and d.classes == ["a", "b"]
    assert "ignored sub-folders without images: empty" in d.notes
    np.savez(tmp_path / "s.npz", X=np.float32(1), y=np.int64(0))
    with pytest.raises(UserError, match="s.npz: X is a scalar"):
        load_data(tmp_path / "s.npz")
    np.savez(tmp_path / "one.npz", X=x[:, 0], y=y)        # 1-D X: one feature per example
    d = load_data(tmp_path / "one.npz")
    assert d.x_train.shape[1:] == (1,) and d.standardized


def test_quoted_line_breaks_and_target_on_builtin_data(tmp_path):
    x, y = blobs(20, d=2)
    rows = [f'{a},"{b}",{t}' for (a, b), t in zip(x, y)]
    rows[3] = f'{x[3][0]},"{x[3][1]}",{y[3]}'
    text = "a,b,label\n" + "\n".join(rows) + "\n"
    # a quoted header cell spanning two lines is one field, as in any CSV reader
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text(text.replace("a,b,label", '"a\nfirst",b,label'))
    d = load_data(tmp_path / "d")
    assert d.x_train.shape[1] == 2 and len(d.x_train) + len(d.x_val) == 20
    with pytest.raises(UserError, match="--target applies to CSV data only"):
        load_data(None, target="label")
