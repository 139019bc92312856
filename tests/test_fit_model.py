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
