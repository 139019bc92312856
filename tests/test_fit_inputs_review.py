"""Unusual but legitimate inputs to ``autol2o fit``: data layouts, model files, Optuna studies.

Each test pins a case that once loaded the wrong thing silently, or failed with a misleading
message, mid-run, or with a traceback.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import optuna
import pytest
from test_fit_support import (  # noqa: F401  (zoo is a fixture)
    FAST,
    blobs,
    run_cli,
    write_csv,
    write_images,
    write_model,
    zoo,
)

from autol2o.errors import UserError
from autol2o.fit.data import load_data
from autol2o.tuning import open_study

# end-to-end tests get a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")


def _idx(path, arr):
    """An uncompressed IDX file (as ``gunzip`` or Kaggle leave them)."""
    arr = np.asarray(arr, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.tobytes())


# -- data -------------------------------------------------------------------------------------
def test_npz_lowercase_val_split_is_used_and_half_a_val_split_is_refused(tmp_path):
    x, y = blobs(40)
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "data.npz", x=x[:30], y=y[:30], x_val=x[30:], y_val=y[30:])
    d = load_data(tmp_path / "a")
    assert (len(d.x_train), len(d.x_val), d.split) == (30, 10, "given")
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "X.npy", x)
    np.save(tmp_path / "b" / "y.npy", y)
    np.save(tmp_path / "b" / "X_val.npy", x[:5])
    with pytest.raises(UserError, match="found X_val.npy but not y_val.npy"):
        load_data(tmp_path / "b")


def test_idx_kaggle_names_and_count_mismatch_names_the_right_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 9)):
        _idx(tmp_path / f"{split}-images.idx3-ubyte", rng.integers(0, 256, (n, 4, 4)))
        _idx(tmp_path / f"{split}-labels.idx1-ubyte", np.arange(n) % 3)
    d = load_data(tmp_path)
    assert (len(d.x_train), len(d.x_val), d.n_classes) == (30, 9, 3)
    assert d.split.startswith("given")
    _idx(tmp_path / "t10k-labels.idx1-ubyte", np.arange(8) % 3)
    with pytest.raises(UserError, match=r"t10k-images.idx3-ubyte: 9 images but "
                                        r"t10k-labels.idx1-ubyte has 8 labels"):
        load_data(tmp_path)


def test_single_class_is_refused(tmp_path):
    x, _ = blobs(20)
    write_csv(tmp_path / "c" / "train.csv", x, [7] * 20)
    with pytest.raises(UserError, match=r"train.csv: all targets are one class \(7\)"):
        load_data(tmp_path / "c")
    write_images(tmp_path / "img", n_per_class=4, classes=("only",))
    with pytest.raises(UserError, match=r"img: only one class sub-folder with images \(only\)"):
        load_data(tmp_path / "img")


def test_hidden_files_in_image_folders_are_not_images(tmp_path):
    root = write_images(tmp_path / "img", n_per_class=4, classes=("a", "b"))
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    d = load_data(root)
    assert len(d.x_train) + len(d.x_val) == 8 and d.classes == ["a", "b"]


def test_empty_cell_is_reported_as_missing(tmp_path):
    (tmp_path / "train.csv").write_text("a,b,label\n" + "".join(
        f"{i},{'' if i == 3 else i},{i % 2}\n" for i in range(10)))
    with pytest.raises(UserError, match=r"train.csv: missing value \(empty cell\) in column "
                                        r"'b' \(line 5\)"):
        load_data(tmp_path)


def test_large_integer_labels_stay_distinct_classes(tmp_path):
    # 2**53 + 1 rounds to 2**53 as a float: two classes merged into one
    x, y = blobs(20, k=2)
    big = 2**53
    write_csv(tmp_path / "train.csv", x, [big + int(v) for v in y])
    d = load_data(tmp_path)
    assert d.classes == [big, big + 1] and d.n_classes == 2


def test_val_csv_target_is_train_target_by_name(tmp_path):
    # no `target`/`label` column: train.csv's last column is the target, also in a val.csv
    # whose columns come in another order
    (tmp_path / "train.csv").write_text("a,b,price\n" + "".join(
        f"{i},{i * 2},{i * 0.5}\n" for i in range(10)))
    (tmp_path / "val.csv").write_text("price,b,a\n" + "".join(
        f"{i * 0.5},{i * 2},{i}\n" for i in range(4)))
    d = load_data(tmp_path)
    assert d.task == "regression" and len(d.x_val) == 4
    assert d.y_val.tolist() == [0.0, 0.5, 1.0, 1.5]
    # features matched by name: val rows equal the train rows they copy, after standardising
    assert np.allclose(d.x_val.numpy(), d.x_train[:4].numpy(), atol=1e-6)


def test_class_only_in_validation_is_noted(tmp_path):
    x, y = blobs(30, k=3)
    write_csv(tmp_path / "train.csv", x[:20], ["cat" if v == 0 else "dog" for v in y[:20]])
    write_csv(tmp_path / "val.csv", x[20:], [["cat", "dog", "eel"][v] for v in y[20:]])
    d = load_data(tmp_path)
    assert d.classes == ["cat", "dog", "eel"]
    assert any("only in the validation data" in n and "eel" in n for n in d.notes)


# -- model file: found before any run directory exists ---------------------------------------
def test_float_class_labels_get_a_hint_to_set_the_task(tmp_path, capsys):
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, [f"{v}.0" for v in y])  # as pandas writes
    model = write_model(tmp_path)
    code, out, err = run_cli(["fit", model, tmp_path / "data", *FAST, "--out", tmp_path / "r"],
                             capsys)
    assert code != 0 and out == "" and "Traceback" not in err
    assert "regression targets" in err and 'set task = "classification"' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_loss_without_gradient_is_refused_before_the_run(tmp_path, capsys):
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    model = write_model(tmp_path)
    model.write_text(model.read_text() + (
        "\nimport torch, torch.nn.functional as F\n"
        "def loss_fn(out, y):\n    return torch.tensor(F.cross_entropy(out, y).item())\n"))
    code, out, err = run_cli(["fit", model, tmp_path / "data", *FAST, "--out", tmp_path / "r"],
                             capsys)
    assert code != 0 and "Traceback" not in err
    assert "model.py: the loss does not depend on the model's parameters" in err
    assert not (tmp_path / "r").exists()


def test_duplicate_baselines_are_tuned_once(tmp_path, monkeypatch, capsys):
    import autol2o.fit

    def fake(model, data, cfg, **kw):
        raise UserError(f"baselines={','.join(cfg.baselines)}")

    monkeypatch.setattr(autol2o.fit, "fit_files", fake)
    code, _, err = run_cli(["fit", "--baselines", "adam, sgd,adam"], capsys)
    assert code != 0 and err.strip().endswith("baselines=adam,sgd")


# -- Optuna studies ---------------------------------------------------------------------------
def test_study_of_the_same_name_with_another_direction_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(storage=url, study_name="max", direction="maximize")
    optuna.create_study(storage=url, study_name="multi", directions=["minimize", "minimize"])
    with pytest.raises(UserError, match="max: .* direction maximize"):
        open_study(url, "max", 0, shared=True)
    with pytest.raises(UserError, match="multi: .* direction minimize, minimize"):
        open_study(url, "multi", 0, shared=True)


def test_study_signature_mismatch_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    sig = {"steps": 100, "input_shape": (6,), "model": "mlp"}
    open_study(url, "s", 0, shared=True, signature=sig)
    open_study(url, "s", 1, shared=True, signature=dict(sig))   # a second worker: same problem
    with pytest.raises(UserError, match=r"s: this Optuna study was made for another problem "
                                        r"\(steps: 100 there, 300 here\)"):
        open_study(url, "s", 0, shared=True, signature=sig | {"steps": 300})


def test_fit_refuses_a_shared_study_made_for_another_budget_before_the_race(tmp_path, capsys):
    """Two `fit`s on one --storage/--study with different --steps: the second would count the
    first's trials as its own and retrain their best config; it stops before the race."""
    x, y = blobs(60)
    data = write_csv(tmp_path / "d" / "train.csv", x, y).parent
    model = write_model(tmp_path)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    common = ["fit", model, data, *FAST, "--storage", storage, "--study", "shared"]
    code, _, err = run_cli([*common, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    fast_steps = FAST[FAST.index("--steps") + 1]
    args = [*common, "--out", tmp_path / "b"]
    args[args.index(fast_steps)] = "30"
    code, _, err = run_cli(args, capsys)
    assert code != 0 and "Traceback" not in err
    assert err.strip().endswith(f"shared-adam: this Optuna study was made for another problem "
                                f"(steps: {fast_steps} there, 30 here); its trials cannot be "
                                "shared (choose another --study)")
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["status"] == "failed" and "race" not in state["phases"]


# -- split layouts: torchvision's train/<class>/ + val/<class>/, Keras' x_train/y_train ---------
def test_split_image_folders_match_classes_by_name(tmp_path):
    root = tmp_path / "data"
    write_images(root / "train", n_per_class=4, classes=("a", "b", "c"))
    # val has no 'a' but a 'd' nobody trains on: indices follow the names, not the positions
    write_images(root / "val", n_per_class=2, classes=("b", "c", "d"))
    (root / "test" / "a").mkdir(parents=True)
    d = load_data(root)
    assert (len(d.x_train), len(d.x_val), d.split) == (12, 6, "given")
    assert d.classes == ["a", "b", "c", "d"] and d.n_classes == 4
    assert d.y_val.tolist() == [1, 1, 2, 2, 3, 3]
    # write_images draws class i's pixels from [60 i, 60 i + 60): val/b is its own position 0,
    # so its pixels prove the folder was read under its name
    b_val = (d.x_val[d.y_val == 1] * 255).round()
    assert b_val.min() >= 0 and b_val.max() < 60
    assert any("classes only in val/ (never trained on): d" in n for n in d.notes)
    assert any(n.startswith("test/ found: not used") for n in d.notes)
    assert d.source == str(root) and d.format == "images"


def test_split_image_folders_without_val_are_split_and_bad_layouts_refused(tmp_path):
    root = tmp_path / "data"
    write_images(root / "train", n_per_class=5, classes=("a", "b"))
    d = load_data(root)
    assert len(d.x_train) + len(d.x_val) == 10 and d.split.startswith("random 80/20")
    write_images(root / "valid", n_per_class=1, classes=("a", "b"))
    write_images(root / "val", n_per_class=1, classes=("a", "b"))
    with pytest.raises(UserError, match=r"several validation folders \(val, valid\)"):
        load_data(root)
    import shutil

    from PIL import Image

    shutil.rmtree(root / "valid")
    Image.new("L", (9, 9)).save(root / "val" / "b" / "big.png")
    with pytest.raises(UserError, match=r"val/b/big.png: image size 9x9 differs from 6x6"):
        load_data(root)


def test_a_class_named_train_is_a_class_not_a_split(tmp_path):
    root = write_images(tmp_path / "img", n_per_class=3, classes=("train", "val"))
    d = load_data(root)
    assert d.classes == ["train", "val"] and len(d.x_train) + len(d.x_val) == 6
    assert d.split.startswith("random")


def test_keras_style_array_names(tmp_path):
    x, y = blobs(50)
    (tmp_path / "k").mkdir()
    np.savez(tmp_path / "k" / "mnist.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:],
             y_test=y[40:])
    d = load_data(tmp_path / "k")
    # the test split is never used for selection: 40 rows split 80/20, test noted
    assert (len(d.x_train), len(d.x_val)) == (32, 8) and d.split.startswith("random")
    assert any("x_test, y_test in mnist.npz found: not used" in n for n in d.notes)
    d = load_data(tmp_path / "k" / "mnist.npz")  # the file itself, too
    assert len(d.x_train) == 32 and any("x_test" in n for n in d.notes)
    np.savez(tmp_path / "k" / "mnist.npz", X_train=x[:40], y_train=y[:40], X_val=x[40:],
             y_val=y[40:])
    d = load_data(tmp_path / "k")
    assert (len(d.x_train), len(d.x_val), d.split) == (40, 10, "given")
    np.savez(tmp_path / "k" / "mnist.npz", X_train=x, y=y)  # half of each pair
    with pytest.raises(UserError, match=r"mnist.npz: expected arrays 'X' and 'y' \(or 'X_train' "
                                        r"and 'y_train'\), found X_train, y"):
        load_data(tmp_path / "k")
    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "x_train.npy", x)
    np.save(tmp_path / "n" / "y_train.npy", y)
    np.save(tmp_path / "n" / "x_test.npy", x[:3])
    d = load_data(tmp_path / "n")
    assert len(d.x_train) + len(d.x_val) == 50 and any("x_test.npy" in n for n in d.notes)


def test_fit_runs_on_split_image_folders(tmp_path, capsys):
    write_images(tmp_path / "d" / "train", n_per_class=6, size=6)
    write_images(tmp_path / "d" / "val", n_per_class=2, size=6)
    model = write_model(tmp_path, d=36)
    code, _, err = run_cli(["fit", model, tmp_path / "d", *FAST, "--baselines", "sgd",
                            "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    data = r["inputs"]["data"]
    assert (data["format"], data["n_train"], data["n_val"], data["split"]) == ("images", 18, 6,
                                                                               "given")


def test_fine_tune_on_one_training_example_is_refused_before_the_run(tmp_path, capsys):
    x, y = blobs(12)
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "data.npz", X=x[:1], y=y[:1], X_val=x[1:], y_val=y[1:])
    code, _, err = run_cli(["fit", write_model(tmp_path), tmp_path / "d", *FAST,
                            "--fine-tune", "2", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "--fine-tune needs at least 2 training examples, got 1" in err
    assert not (tmp_path / "run").exists()


def test_split_layout_edge_cases(tmp_path):
    # one class to train on is refused even when val/ has two (the union used to count)
    root = tmp_path / "one"
    write_images(root / "train", n_per_class=3, classes=("a",))
    write_images(root / "val", n_per_class=2, classes=("a", "b"))
    with pytest.raises(UserError, match=r"one/train: only one class sub-folder with images \(a\)"):
        load_data(root)
    # capitalised split names, a val.npz-style x_valid pair, a test.npz beside train.npz
    root = tmp_path / "caps"
    write_images(root / "Train", n_per_class=3, classes=("a", "b"))
    write_images(root / "Val", n_per_class=1, classes=("a", "b"))
    (root / "Test").mkdir()
    d = load_data(root)
    assert (len(d.x_train), len(d.x_val)) == (6, 2) and any("Test/ found" in n for n in d.notes)
    x, y = blobs(40)
    (tmp_path / "n").mkdir()
    np.savez(tmp_path / "n" / "train.npz", x_train=x[:30], y_train=y[:30], x_valid=x[30:],
             y_valid=y[30:])
    np.savez(tmp_path / "n" / "test.npz", x=x[:5], y=y[:5])
    d = load_data(tmp_path / "n")
    assert (len(d.x_train), len(d.x_val)) == (30, 10)
    assert any(n.startswith("test.npz found: not used") for n in d.notes)
    (tmp_path / "n" / "train.npz").unlink()
    np.savez(tmp_path / "n" / "train.npz", X=x[:30], y=y[:30])
    np.savez(tmp_path / "n" / "val.npz", x_val=x[30:], y_val=y[30:])
    assert len(load_data(tmp_path / "n").x_val) == 10  # val.npz with _val names
