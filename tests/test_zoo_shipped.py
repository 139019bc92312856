"""The shipped zoo: every entry loads with a valid checksum, and it survives `pip install .`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from autol2o import DMOptimizer, RNNprop
from autol2o.zoo import list_entries, load_entry, save_entry, shipped_root

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"rnnprop-mnist": RNNprop, "rnnprop-mnist-v2": RNNprop, "rnnprop-mnist-v3": RNNprop,
            "dm-mnist": DMOptimizer, "rnnprop-mix": RNNprop, "rnnprop-long": RNNprop,
            "rnnprop-mnist-v4": RNNprop, "rnnprop-mlp300": RNNprop}


def test_shipped_entries_load_and_verify(tmp_path):
    root = shipped_root()
    assert root.resolve() == (REPO / "pretrained").resolve() or root.parent.name == "autol2o"
    entries = {e.name: e for e in list_entries(root)}
    assert set(EXPECTED) <= set(entries), f"missing from {root}: {set(EXPECTED) - set(entries)}"
    for name, entry in entries.items():
        rule, card = load_entry(entry.path)  # verifies the sha256
        if name in EXPECTED:
            assert type(rule) is EXPECTED[name]
        assert card["name"] == name == entry.path.name
        # a staged recipe is its stages' commands joined by " && ", the last writing the entry
        stages = card["command"].split(" && ")
        assert all(st.startswith("autol2o zoo train") for st in stages), name
        assert stages[-1].endswith(f"--out pretrained/{name}") or \
            f"--out pretrained/{name} " in stages[-1], name
        assert card["tasks"] and card["training"]["meta_iterations"] > 0
        assert card["wall_time_s"] > 0
        assert card["evaluation"].get("headline"), f"{name} has no evaluation headline"
        # a trained rule is not its random init: it moves a coordinate by less than the cap
        g = torch.randn(100)
        with torch.no_grad():
            upd, _ = rule(g, rule.init_state(100))
        assert torch.isfinite(upd).all() and upd.abs().max() <= rule.out_scale + 1e-6
        # written the way save_entry writes (key-sorted header): the same meta-weights saved
        # again, as by a rerun of the card's command, give the same bytes and the card's sha256
        data = (entry.path / "weights.safetensors").read_bytes()
        again = save_entry(rule, tmp_path / name, {"name": name}) / "weights.safetensors"
        assert again.read_bytes() == data, f"{name}: not the bytes save_entry writes"


def test_each_cards_command_names_exactly_its_training_tasks():
    """A card's ``--task`` arguments (preset names, or specs as JSON where a preset has changed
    since the entry was trained) rebuild the very task specs the card lists (for a staged
    recipe, those of its last stage, whose training block the card holds)."""
    import shlex

    from autol2o.meta import build_task
    from autol2o.meta.tasks import preset_spec

    def built(spec: dict) -> dict:
        # what the trainer records is the built task's spec, defaults filled in (the sin-LSTM
        # preset leaves its ranges to the constructor); MNIST tasks would need the data files,
        # and their presets name every field
        return spec if spec.get("dataset") == "mnist" else build_task(spec).spec

    for entry in list_entries(shipped_root()):
        argv = shlex.split(entry.card["command"].split(" && ")[-1])
        given = [argv[i + 1] for i, a in enumerate(argv) if a == "--task"]
        specs = [built(json.loads(t) if t.startswith("{") else preset_spec(t)) for t in given]
        assert specs == entry.card["tasks"], entry.name


def test_fit_races_the_general_entries_and_not_the_references():
    """The papers' reproductions and the training-task specialist opt out of `fit`'s race
    (card "race": false; see pretrained/README.md), the general-purpose entries race."""
    race = {e.name: e.races for e in list_entries(shipped_root())}
    assert {n for n, r in race.items() if not r} == {"dm-mnist", "rnnprop-mnist",
                                                     "rnnprop-mnist-v4"}
    assert {"rnnprop-mnist-v3", "rnnprop-mnist-v2", "rnnprop-mix", "rnnprop-long",
            "rnnprop-mlp300"} <= \
        {n for n, r in race.items() if r}


def test_long_entry_trained_to_1000_steps():
    _, card = load_entry(shipped_root() / "rnnprop-long")
    assert card["training"]["max_horizon"] >= 1000
    assert max(h for _, h in card["training"]["curriculum"]) >= 1000


def test_pyproject_lists_every_subpackage():
    """Packages are listed explicitly (for the pretrained/ mapping): none may be forgotten."""
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(autol2o(?:\.[\w.]+)?)"', text.split("packages = [", 1)[1]
                            .split("]", 1)[0]))
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for p in (REPO / "autol2o").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "autol2o.pretrained" in listed


def test_non_editable_install_finds_the_zoo(tmp_path):
    """`pip install .` (no editable) ships pretrained/ as autol2o/pretrained/ package data."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "autol2o", src / "autol2o",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pretrained").mkdir()
    save_entry(RNNprop(), src / "pretrained" / "probe-entry", {"command": "autol2o zoo train"})
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--quiet", "--target", str(target), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    probe = ("import json, autol2o, autol2o.zoo as z; "
             "print(json.dumps([autol2o.__file__, str(z.shipped_root()), "
             "[e.name for e in z.list_entries()], z.load_entry('probe-entry')[1]['rule']]))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("AUTOL2O_ZOO", None)
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, cwd=tmp_path, env=env).stdout
    file, root, names, rule = json.loads(out)
    assert Path(file).is_relative_to(target)
    assert Path(root) == target / "autol2o" / "pretrained"
    assert names == ["probe-entry"] and rule == "rnnprop"
