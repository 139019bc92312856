"""Every bad input of ``autol2o fit``: one-line error naming the file, non-zero exit, no
traceback, nothing written and nothing overwritten."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from test_fit_support import (  # noqa: F401  (zoo is a fixture)
    FAST,
    blobs,
    make_zoo,
    run_cli,
    write_csv,
    write_model,
    zoo,
)

from autol2o.errors import UserError

# every test gets a tiny temporary zoo (AUTOL2O_ZOO), never the shipped weights
pytestmark = pytest.mark.usefixtures("zoo")


def expect_error(capsys, tmp_path, args, *needles):
    """Run, assert a clean one-line failure mentioning ``needles``, and that nothing was made."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(args, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err and out == ""
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if "__pycache__" not in p.parts)
    assert after == [p for p in before if "__pycache__" not in p.parts], "something was written"
    return lines[0]


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a default runs/ directory would appear here


# -- MODEL.py ---------------------------------------------------------------------------------
def test_model_missing(tmp_path, data_dir, capsys):
    expect_error(capsys, tmp_path, ["fit", tmp_path / "nope.py", data_dir, *FAST],
                 "nope.py", "not found")


def test_model_syntax_error(tmp_path, data_dir, capsys):
    (tmp_path / "bad.py").write_text("def build_model(:\n    pass\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "bad.py", data_dir, *FAST],
                 "bad.py", "syntax error at line 1")


def test_model_raises(tmp_path, data_dir, capsys):
    (tmp_path / "boom.py").write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "boom.py", data_dir, *FAST],
                 "boom.py", "RuntimeError: no GPU here second line")


def test_model_calling_sys_exit(tmp_path, data_dir, capsys):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "quits.py", data_dir, *FAST],
                 "quits.py: called sys.exit(0) while loading")


def test_model_argparse_sees_no_autol2o_arguments(tmp_path, monkeypatch):
    from autol2o.fit import load_model_file

    (tmp_path / "ap.py").write_text(
        "import argparse, sys\nARGV = list(sys.argv)\np = argparse.ArgumentParser()\n"
        "p.add_argument('--lr', type=float, default=0.1)\nargs = p.parse_args()\n"
        "from torch import nn\ndef build_model():\n    return nn.Linear(6, 3)\n")
    monkeypatch.setattr("sys.argv", ["autol2o", "fit", "ap.py", "--steps", "5"])
    um = load_model_file(tmp_path / "ap.py")
    assert um.entry == "build_model" and um.factory.__globals__["ARGV"] == [
        str(tmp_path / "ap.py")]
    import sys
    assert sys.argv == ["autol2o", "fit", "ap.py", "--steps", "5"]   # restored


def test_model_no_entry_point(tmp_path, data_dir, capsys):
    (tmp_path / "empty.py").write_text("x = 1\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "empty.py", data_dir, *FAST],
                 "empty.py", "no entry point")


def test_build_model_raises(tmp_path, data_dir, capsys):
    (tmp_path / "b.py").write_text("def build_model():\n    return 1 / 0\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "b.py", data_dir, *FAST],
                 "b.py", "ZeroDivisionError")


def test_output_shape_mismatch(tmp_path, data_dir, capsys):
    model = write_model(tmp_path, d=6, k=2)   # 2 outputs for 3 classes
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST],
                 "model.py", "output shape (8, 2)", "3 classes")


def test_input_shape_mismatch(tmp_path, data_dir, capsys):
    model = write_model(tmp_path, d=5, k=3)   # expects 5 features, data has 6
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST],
                 "model.py", "forward pass failed")


def test_model_wired_to_one_batch_size(tmp_path, data_dir, capsys):
    (tmp_path / "bs8.py").write_text(
        "from torch import nn\nclass Model(nn.Linear):\n    def __init__(self):\n"
        "        super().__init__(6, 3)\n    def forward(self, x):\n"
        "        return super().forward(x.view(8, 6))\n")
    expect_error(capsys, tmp_path, ["fit", tmp_path / "bs8.py", data_dir, *FAST, "--out",
                                    tmp_path / "run"],
                 "bs8.py: forward/loss failed on a training batch of shape (72, 6)")


def test_model_failing_mid_run_marks_the_run_failed(tmp_path, data_dir, capsys):
    (tmp_path / "noeval.py").write_text(
        "from torch import nn\nclass Model(nn.Linear):\n    def __init__(self):\n"
        "        super().__init__(6, 3)\n    def forward(self, x):\n"
        "        assert self.training, 'no validation'\n        return super().forward(x)\n")
    run = tmp_path / "run"
    code, out, err = run_cli(["fit", "noeval.py", data_dir, *FAST, "--out", run], capsys)
    assert code == 2 and out == ""
    assert err.strip() == ("error: noeval.py: forward/loss failed during training: "
                           "AssertionError: no validation"), err
    state = json.loads((run / "state.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert state["status"] == report["status"] == "failed"
    assert "no validation" in state["error"] and "no validation" in report["verdict"]["summary"]


# -- DATA -------------------------------------------------------------------------------------
def test_data_missing(tmp_path, capsys):
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "nodata", *FAST],
                 "nodata", "not found")


def test_data_empty_dir(tmp_path, capsys):
    model = write_model(tmp_path)
    (tmp_path / "e").mkdir()
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "e", *FAST], "e: data directory is empty")


def test_data_empty_csv(tmp_path, capsys):
    model = write_model(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("")
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "d", *FAST],
                 "train.csv", "empty")


def test_data_unknown_format(tmp_path, capsys):
    model = write_model(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "d", *FAST],
                 "unknown data format")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "x.parquet", *FAST],
                 "x.parquet", "unknown data format")


@pytest.mark.parametrize("bad,needle", [("nan", "NaN or inf"), ("inf", "NaN or inf"),
                                        ("abc", "non-numeric value 'abc'")])
def test_data_bad_values(tmp_path, capsys, bad, needle):
    x, y = blobs()
    p = write_csv(tmp_path / "d" / "train.csv", x, y)
    lines = p.read_text().splitlines()
    lines[3] = bad + lines[3][lines[3].index(","):]
    p.write_text("\n".join(lines) + "\n")
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "d", *FAST], "train.csv", needle)


def test_data_length_mismatch(tmp_path, capsys):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", X=x, y=y[:-5])
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "d.npz", *FAST],
                 "d.npz", "X has 90 rows but y has 85")


def test_npz_needing_pickle_is_refused(tmp_path, capsys):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", X=x, y=np.array([object()] * len(y), dtype=object))
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, tmp_path / "d.npz", *FAST],
                 "d.npz", "without pickle")


# -- output, zoo ------------------------------------------------------------------------------
def test_unwritable_output(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--out",
                                    tmp_path / "afile" / "run"], "afile", "cannot write")


def test_existing_run_is_not_overwritten(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text('{"keep": true}')
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--out", tmp_path / "run"],
                 "run", "already exists")
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"keep": True}


def test_output_is_a_file(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    (tmp_path / "single.csv").write_text("keep")
    line = expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--out", "single.csv"],
                        "single.csv: exists and is a file, not a directory")
    assert "--resume" not in line


def test_empty_zoo(tmp_path, data_dir, capsys, monkeypatch):
    (tmp_path / "nozoo").mkdir()
    monkeypatch.setenv("AUTOL2O_ZOO", str(tmp_path / "nozoo"))
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST], "nozoo", "autol2o zoo train")
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--zoo", tmp_path / "nope"],
                 "nope: zoo directory not found")


def test_zoo_without_a_usable_entry(tmp_path, data_dir, capsys, monkeypatch):
    bad = make_zoo(tmp_path / "bad-zoo")
    monkeypatch.setenv("AUTOL2O_ZOO", str(bad))
    for weights in bad.glob("*/weights.safetensors"):   # every entry fails its checksum
        weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--out", tmp_path / "run"],
                 "no usable learned optimizer", "sha256 mismatch")


def test_unknown_optimizer(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--optimizer", "adamw-9000"],
                 "adamw-9000")


def test_debug_shows_the_exception(tmp_path, data_dir):
    from autol2o.cli import main

    with pytest.raises(UserError, match="syntax error"):
        (tmp_path / "bad.py").write_text("def (\n")
        main(["--debug", "fit", str(tmp_path / "bad.py"), str(data_dir), *FAST])


# -- diverging learned optimizer --------------------------------------------------------------
def test_diverging_learned_optimizer_is_reported_not_fatal(tmp_path, data_dir, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("AUTOL2O_ZOO", str(make_zoo(tmp_path / "wild-zoo", diverging=True)))
    model = write_model(tmp_path)
    code, _, err = run_cli(["fit", model, data_dir, *FAST, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    # the only entry is picked without a probe (nothing to race it against)
    assert r["race"]["entries"][0]["steps"] == 0 and r["race"]["steps"] == 0
    assert r["race"]["picked"] == "wild"
    learned = next(row for row in r["leaderboard"] if row["kind"] == "learned")
    assert learned["diverged"] == 1 and learned["val_loss_mean"] is None
    assert learned["rank"] == len(r["leaderboard"])      # diverged ranks last
    assert r["verdict"]["winner"] in ("adam", "sgd")


def test_bad_flags(tmp_path, data_dir, capsys):
    model = write_model(tmp_path)
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--steps", "0"], "--steps")
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--baselines", "adamw"],
                 "adamw")
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--storage", "nowhere"],
                 "nowhere", "not an Optuna storage URL")
    expect_error(capsys, tmp_path, ["fit", "--resume", tmp_path / "norun"], "state.json")
    for n in ("-2", "0"):
        expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--threads", n],
                     f"--threads must be >= 1, got {n}")
    expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--baselines", ","],
                 "--baselines must name at least one")
    if not torch.cuda.is_available():
        expect_error(capsys, tmp_path, ["fit", model, data_dir, *FAST, "--device", "cuda"],
                     "CUDA is not available")


def test_usage_errors_are_clicks(tmp_path, data_dir, capsys):
    """Unknown options and unparsable values: click's usage message naming the option, exit 2."""
    code, out, err = run_cli(["fit", "--bogus"], capsys)
    assert code == 2 and "No such option: --bogus" in err and "Traceback" not in err
    code, out, err = run_cli(["fit", "m.py", data_dir, "--steps", "abc"], capsys)
    assert code == 2 and "Invalid value for '--steps'" in err and not list(tmp_path.glob("runs"))


def test_click_exceptions_of_the_installed_click_are_recognised():
    """typer >= 0.29 raises its bundled click's exceptions (``typer._click``), older typer the
    real click's: whichever this typer uses must be classified."""
    import importlib
    import importlib.util

    from autol2o.cli import _click_kind

    module = "typer._click" if importlib.util.find_spec("typer._click") else "click"
    mod = importlib.import_module(module)
    exc = importlib.import_module(f"{module}.exceptions")
    assert _click_kind(exc.UsageError("bad")) == "usage"
    assert _click_kind(mod.ClickException("bad")) == "usage"
    assert _click_kind(ValueError("bad")) is None


def test_ctrl_c_under_any_typer_or_click_exits_130_interrupted(monkeypatch, capsys):
    """Ctrl-C reaches ``main`` as a KeyboardInterrupt, as Exit(130) returned by typer, or (older
    typer, or the real click) as an Abort: every one must print "interrupted" and exit 130."""
    import importlib
    import importlib.util

    import autol2o.cli as cli

    aborts = [typer.Abort]
    for name in ("click", "typer._click"):
        if importlib.util.find_spec(name):
            mod = importlib.import_module(name)
            aborts += [a for m in (mod, getattr(mod, "exceptions", None))
                       if isinstance(a := getattr(m, "Abort", None), type)]

    def raising(exc_type):
        def fake_app(args=None, standalone_mode=True):
            raise exc_type()
        return fake_app

    for fake in [raising(KeyboardInterrupt), lambda args=None, standalone_mode=True: 130,
                 *(raising(a) for a in aborts)]:
        monkeypatch.setattr(cli, "app", fake)
        with pytest.raises(SystemExit) as info:
            cli.main(["zoo", "list"])
        assert info.value.code == 130
        assert capsys.readouterr().err.strip() == "interrupted"
