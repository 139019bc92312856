"""MODEL.py entry points, seeded initial weights and the model/data checks."""

from __future__ import annotations

import pytest
import torch
from test_fit_support import blobs

from autol2o.errors import UserError
from autol2o.fit import Problem, load_model_file
from autol2o.fit.data import from_tensors

ALL_THREE = """
import torch
from torch import nn
task = "classification"
def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y) * 2
def build_model():
    return nn.Linear(6, 3)
model = nn.Linear(6, 4)
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 5)
    def forward(self, x):
        return self.l(x)
"""


def weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_entry_point_order(tmp_path):
    src = ALL_THREE
    (tmp_path / "a.py").write_text(src)
    um = load_model_file(tmp_path / "a.py")
    assert um.entry == "build_model" and um.build(0).out_features == 3
    assert um.task == "classification" and um.loss_fn is not None
    (tmp_path / "b.py").write_text(src.replace("def build_model", "def _unused"))
    um = load_model_file(tmp_path / "b.py")
    assert um.entry == "model" and um.build(0).out_features == 4
    (tmp_path / "c.py").write_text(src.replace("def build_model", "def _unused")
                                   .replace("model = ", "_m = "))
    um = load_model_file(tmp_path / "c.py")
    assert um.entry == "Model" and um.build(0).l.out_features == 5


def test_seeded_initial_weights(tmp_path):
    (tmp_path / "f.py").write_text("from torch import nn\ndef build_model():\n"
                                   "    return nn.Linear(6, 3)\n")
    um = load_model_file(tmp_path / "f.py")
    assert torch.equal(weights(um.build(1)), weights(um.build(1)))
    assert not torch.equal(weights(um.build(1)), weights(um.build(2)))
    # a module-level instance: seed 0 is exactly the user's weights, other seeds re-draw them
    (tmp_path / "g.py").write_text("import torch\nfrom torch import nn\ntorch.manual_seed(123)\n"
                                   "model = nn.Linear(6, 3)\n")
    um = load_model_file(tmp_path / "g.py")
    given = weights(um.instance)
    assert torch.equal(weights(um.build(0)), given)
    assert not torch.equal(weights(um.build(1)), given)
    assert torch.equal(weights(um.build(1)), weights(um.build(1)))


def test_dropout_masks_follow_the_run_seed(tmp_path):
    """Model randomness (dropout) is seeded per run: the same seed and optimizer give the same
    run whatever happened to the global generator before, and the global state is restored."""
    from autol2o.fit.train import OptSpec, train_run

    (tmp_path / "d.py").write_text(
        "from torch import nn\ndef build_model():\n"
        "    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))\n")
    x, y = blobs(60)
    p = Problem(load_model_file(tmp_path / "d.py"),
                from_tensors(torch.tensor(x, dtype=torch.float32), torch.tensor(y)), "cpu")
    p.check()
    adam = OptSpec("adam", "adam", {"lr": 0.01})
    runs = []
    for junk in (1, 7):
        torch.rand(junk)  # disturb the global generator differently before each run
        before = torch.random.get_rng_state()
        runs.append(train_run(p, adam, steps=10, seed=3, batch_size=16, eval_every=5))
        assert torch.equal(torch.random.get_rng_state(), before)
    assert runs[0].val_loss == runs[1].val_loss and runs[0].train_loss == runs[1].train_loss
    other = train_run(p, adam, steps=10, seed=4, batch_size=16, eval_every=5)
    assert other.train_loss != runs[0].train_loss


def test_bad_task_and_loss(tmp_path):
    (tmp_path / "t.py").write_text("task = 'ranking'\nfrom torch import nn\nmodel = nn.Linear(2, 2)\n")
    with pytest.raises(UserError, match="t.py: task must be"):
        load_model_file(tmp_path / "t.py")
    x, y = blobs(40)
    data = from_tensors(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    (tmp_path / "l.py").write_text("from torch import nn\nmodel = nn.Linear(6, 3)\n"
                                   "def loss_fn(out, y):\n    return out.sum(1)\n")
    p = Problem(load_model_file(tmp_path / "l.py"), data, torch.device("cpu"))
    with pytest.raises(UserError, match="loss_fn must return a scalar"):
        p.check()
    # regression targets vs a 2-output model
    reg = from_tensors(torch.tensor(x, dtype=torch.float32), torch.tensor(x[:, 0]))
    (tmp_path / "r.py").write_text("from torch import nn\nmodel = nn.Linear(6, 2)\n")
    p = Problem(load_model_file(tmp_path / "r.py"), reg, torch.device("cpu"))
    with pytest.raises(UserError, match=r"r.py: model output shape \(8, 2\) does not match"):
        p.check()
