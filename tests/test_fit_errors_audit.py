"""Bad inputs found by the stop-21 audit that failed with a generic exception (or none at all):
each now gets the contract's one line naming the file or argument, and leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit_errors import _cwd, expect_error  # noqa: F401  (_cwd: an autouse fixture)
from test_fit_support import (  # noqa: F401  (zoo is a fixture)
    FAST,
    blobs,
    write_model,
    zoo,
)
from typer.testing import CliRunner

import autol2o
from autol2o.cli import app
from autol2o.errors import UserError
from autol2o.fit import load_model_file

pytestmark = pytest.mark.usefixtures("zoo")


def test_a_model_file_without_the_py_suffix_loads_like_one(tmp_path):
    """importlib's file spec exists only for *.py; the file is compiled whatever its name."""
    src = write_model(tmp_path).read_text()
    for name in ("model.txt", "model"):
        (tmp_path / name).write_text(src)
        um = load_model_file(tmp_path / name)
        assert um.entry == "build_model"
        assert isinstance(um.factory(), torch.nn.Module)


@pytest.mark.parametrize("state, needle", [
    ([], "not a run state (a JSON list, expected an object)"),
    ({"inputs": {}}, "not a run state (no 'config' object)"),
    ({"config": {"steps": "abc"}}, "bad 'config' (--steps must be an integer, got 'abc')"),
    ({"config": {"seed": -1}}, "bad 'config' (--seed must lie in [0, 2^32), got -1)"),
    ({"config": {}, "phases": []}, "not a run state ('phases' is not an object)"),
    ({"config": {"device": None}}, "bad 'config' (--device must be a string, got None)"),
    ({"config": {"baselines": "adam"}},
     "bad 'config' (--baselines must be a list of names, got 'adam')"),
    ({"config": {}, "inputs": {"model": 3}}, "not a run state (inputs model must be paths)"),
])
def test_resume_of_a_state_json_of_the_wrong_shape(tmp_path, capsys, state, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps(state))
    line = expect_error(capsys, tmp_path, ["fit", "--resume", run], "state.json", needle)
    assert "Error:" not in line and "KeyError" not in line and "AttributeError" not in line
    assert json.loads((run / "state.json").read_text()) == state   # untouched


def test_negative_seed_is_a_flag_error(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--seed", "-1"],
                 "--seed must lie in [0, 2^32), got -1")


def test_api_rejects_batch_size_zero_and_wrong_types_before_writing(tmp_path):
    x, y = (torch.as_tensor(a) for a in blobs())
    for kwargs, needle in (({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
                           ({"steps": "10"}, "--steps must be an integer, got '10'"),
                           ({"steps": True}, "--steps must be an integer, got True")):
        with pytest.raises(UserError, match=needle.replace("[", r"\[")):
            autol2o.optimize(torch.nn.Linear(6, 3), (x.float(), y), **{"steps": 5, **kwargs},
                             out=tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_api_nan_in_the_validation_data_blames_val_loader(tmp_path):
    x, y = (torch.as_tensor(a) for a in blobs())
    x = x.float()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="^val_loader: inputs contain NaN or inf"):
        autol2o.optimize(torch.nn.Linear(6, 3), (x, y), (bad, y), steps=5, out=tmp_path / "r")
    with pytest.raises(UserError, match="^train_loader: inputs contain NaN or inf"):
        autol2o.optimize(torch.nn.Linear(6, 3), (bad, y), (x, y), steps=5, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_zoo_list_of_a_missing_root_fails(tmp_path):
    for root in (tmp_path / "nowhere", write_model(tmp_path)):
        res = CliRunner().invoke(app, ["zoo", "list", "--root", str(root)])
        assert res.exit_code != 0
        assert isinstance(res.exception, UserError)
        assert str(res.exception) == f"{root}: zoo directory not found"


@pytest.mark.parametrize("name, what", [("X.npy", "NPY"), ("d.npz", "NPZ")])
def test_a_garbage_numpy_file_is_not_called_a_pickle(tmp_path, capsys, name, what):
    """np.load reads a file without the NPY/NPZ magic as a pickle and then blames pickling."""
    import numpy as np

    x, y = blobs()
    data = tmp_path / "d"
    data.mkdir()
    if what == "NPY":
        np.save(data / "y.npy", y)
    bad = data / name
    bad.write_bytes(b"these are not arrays\n" * 10)
    model = write_model(tmp_path)
    line = expect_error(capsys, tmp_path, ["fit", model, data if what == "NPY" else bad, *FAST],
                        str(bad), f"not a valid {what} file (no {what} header)")
    assert "pickle" not in line


def test_a_state_json_of_an_older_autol2o_still_reads(tmp_path):
    """No race/race_all (older runs), None for the optional fields, an unknown extra key."""
    from autol2o.fit.pipeline import read_state

    (tmp_path / "state.json").write_text(json.dumps({
        "config": {"steps": 10, "threads": None, "eval_every": None, "storage": None,
                   "baselines": ["adam"], "retired_option": 1},
        "inputs": {"model": "m.py", "data": None}, "phases": {}}))
    assert read_state(tmp_path)["config"]["steps"] == 10


def test_a_model_file_sees_its_spec_and_path_as_given(tmp_path):
    src = write_model(tmp_path).read_text()
    (tmp_path / "model.txt").write_text(src + "ORIGIN = __spec__.origin\nFILE = __file__\n")
    g = load_model_file(tmp_path / "model.txt").factory.__globals__
    assert g["ORIGIN"] == g["FILE"] == str(tmp_path / "model.txt")
