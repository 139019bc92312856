"""The user's model: loading ``MODEL.py``, fresh seeded copies, the loss, and shape checks.

``MODEL.py`` is run as a module.  Its entry point is, in this order:

1. ``build_model()`` -- called once per seed after ``torch.manual_seed(seed)``;
2. a module-level ``model`` (an ``nn.Module``) -- used as given for seed 0; other seeds re-draw
   its weights with every sub-module's ``reset_parameters()`` under ``torch.manual_seed(seed)``;
3. a class ``Model`` with a no-argument constructor (like ``build_model``).

Optional names: ``task = "classification" | "regression"`` and ``loss_fn(output, target)``.
Default losses: cross-entropy for classification, mean squared error for regression.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autol2o.errors import UserError

from .data import FitData

LossFn = Callable[[Tensor, Tensor], Tensor]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _as_scalar(loss):
    """A one-element tensor as 0-d (anything else unchanged, for :meth:`Problem.check` to judge)."""
    return loss.reshape(()) if isinstance(loss, Tensor) and loss.numel() == 1 else loss


@dataclass
class UserModel:
    """How to build fresh copies of the user's model, plus its optional ``task``/``loss_fn``."""

    name: str
    source: str                          # path of MODEL.py, or "<api>"
    entry: str                           # "build_model" | "model" | "Model" | "module" | "callable"
    factory: Callable[[], nn.Module] | None = None
    instance: nn.Module | None = None
    task: str | None = None
    loss_fn: LossFn | None = None

    def build(self, seed: int) -> nn.Module:
        """A model with seed-determined initial weights (same seed -> same weights)."""
        try:
            if self.instance is not None:
                m = copy.deepcopy(self.instance)
                if seed != 0:
                    torch.manual_seed(seed)
                    for sub in m.modules():
                        if hasattr(sub, "reset_parameters"):
                            sub.reset_parameters()
            else:
                torch.manual_seed(seed)
                m = self.factory()
        except (Exception, SystemExit) as e:  # a sys.exit() in user code must not end autol2o
            raise UserError(f"{self.source}: building the model failed: {_one_line(e)}") from e
        if not isinstance(m, nn.Module):
            raise UserError(f"{self.source}: {self.entry} returned {type(m).__name__}, "
                            "not a torch.nn.Module")
        return m

    def fresh(self) -> nn.Module:
        """A model with random initial weights drawn from the global RNG (for meta-training)."""
        if self.instance is None:
            return self.factory()
        m = copy.deepcopy(self.instance)
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        return m


def load_model_file(path: str | Path) -> UserModel:
    """Run ``MODEL.py`` and find its entry point; any failure is one :class:`UserError` line."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: model file not found")
    if not p.is_file():
        raise UserError(f"{p}: model path is not a file")
    mod_name = f"autol2o_user_model_{abs(hash(str(p.resolve())))}"
    try:
        source = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read model file ({_one_line(e)})") from e
    try:
        code = compile(source, str(p), "exec")
    except SyntaxError as e:
        raise UserError(f"{p}: syntax error at line {e.lineno}: {e.msg}") from e
    # An explicit source loader: importlib infers one from the suffix only for *.py, and the
    # file is compiled above whatever its name (model.txt, a script without a suffix).
    loader = importlib.machinery.SourceFileLoader(mod_name, str(p))
    spec = importlib.util.spec_from_file_location(mod_name, p, loader=loader)
    module = importlib.util.module_from_spec(spec)
    # Let MODEL.py import its neighbours, as `python MODEL.py` would; an argparse at import time
    # sees no arguments (autol2o's own are not the model's).
    sys.path.insert(0, str(p.parent.resolve()))
    sys.modules[mod_name] = module
    argv, sys.argv = sys.argv, [str(p)]
    try:
        exec(code, module.__dict__)
    except SystemExit as e:  # sys.exit() or a failing argparse must not end autol2o quietly
        sys.modules.pop(mod_name, None)
        raise UserError(f"{p}: called sys.exit({e.code!r}) while loading") from e
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise UserError(f"{p}: raised {_one_line(e)} while loading") from e
    finally:
        sys.argv = argv
        sys.path.pop(0)
    ns = module.__dict__
    name = p.stem
    task = ns.get("task")
    if task is not None and task not in ("classification", "regression"):
        raise UserError(f"{p}: task must be 'classification' or 'regression', got {task!r}")
    loss_fn = ns.get("loss_fn")
    if loss_fn is not None and not callable(loss_fn):
        raise UserError(f"{p}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if callable(ns.get("build_model")):
        um = UserModel(name, str(p), "build_model", factory=ns["build_model"])
    elif isinstance(ns.get("model"), nn.Module):
        um = UserModel(name, str(p), "model", instance=ns["model"])
    elif isinstance(ns.get("Model"), type) and issubclass(ns["Model"], nn.Module):
        um = UserModel(name, str(p), "Model", factory=ns["Model"])
    else:
        raise UserError(f"{p}: no entry point: define build_model(), a module-level `model` "
                        "(an nn.Module) or a class `Model`")
    um.task, um.loss_fn = task, loss_fn
    return um


def from_object(model: nn.Module | Callable[[], nn.Module], *, task: str | None = None,
                loss_fn: LossFn | None = None) -> UserModel:
    """Wrap an ``nn.Module`` instance or a zero-argument factory (the Python API)."""
    if isinstance(model, nn.Module):
        return UserModel(type(model).__name__.lower(), "<api model>", "module", instance=model,
                         task=task, loss_fn=loss_fn)
    if callable(model):
        name = getattr(model, "__name__", type(model).__name__).lower()
        return UserModel(name, "<api model>", "callable", factory=model, task=task,
                         loss_fn=loss_fn)
    raise UserError(f"model must be an nn.Module or a callable returning one, got "
                    f"{type(model).__name__}")


# -- losses and checks -------------------------------------------------------------------------
def default_loss(task: str) -> LossFn:
    if task == "classification":
        return F.cross_entropy

    def mse(out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out.reshape(y.shape), y)

    return mse


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(dim=1) == y).float().mean()


@dataclass
class Problem:
    """Everything a training run needs: the model recipe, the data on its device, the loss."""

    model: UserModel
    data: FitData
    device: torch.device
    loss_fn: LossFn = field(init=False)
    task: str = field(init=False)
    n_params: int = 0

    def __post_init__(self) -> None:
        self.task = self.model.task or self.data.task
        if self.task != self.data.task:
            if self.task == "classification" and self.data.y_train.dtype != torch.int64:
                raise UserError(f"{self.model.source}: task = 'classification' but the targets "
                                f"in {self.data.source} are not integer labels")
            if self.task == "regression":
                self.data.y_train = self.data.y_train.float()
                self.data.y_val = self.data.y_val.float()
        user_loss = self.model.loss_fn
        # a user loss of shape (1,) (e.g. ``.mean(0)`` over (N, 1) outputs) is the scalar it
        # holds: reshaped here once, so every caller (training, tuning, fine-tuning) gets a 0-d loss
        self.loss_fn = (default_loss(self.task) if user_loss is None else
                        lambda out, y: _as_scalar(user_loss(out, y)))
        d = self.device
        self.data.x_train, self.data.y_train = self.data.x_train.to(d), self.data.y_train.to(d)
        self.data.x_val, self.data.y_val = self.data.x_val.to(d), self.data.y_val.to(d)
        self._templates: dict[int, nn.Module] = {}

    def initial(self, seed: int) -> nn.Module:
        """A fresh copy of the seed's initial model (identical for every contender)."""
        if seed not in self._templates:
            self._templates[seed] = self.model.build(seed).to(self.device)
        return copy.deepcopy(self._templates[seed])

    def check(self, batch_size: int | None = None) -> None:
        """Run the model on a few examples and verify output shape and loss (before any work);
        with ``batch_size``, also one training batch of that size."""
        m = self.initial(0)
        src = self.model.source
        self.n_params = sum(p.numel() for p in m.parameters() if p.requires_grad)
        if self.n_params == 0:
            raise UserError(f"{src}: the model has no trainable parameters")
        if any(not p.is_floating_point() for p in m.parameters()):
            raise UserError(f"{src}: the model has non-floating-point parameters")
        x, y = self.data.x_train[:8], self.data.y_train[:8]
        try:
            out = m(x)
        except Exception as e:
            raise UserError(f"{src}: forward pass failed on inputs of shape "
                            f"{tuple(x.shape)}: {_one_line(e)}") from e
        if not isinstance(out, Tensor):
            raise UserError(f"{src}: the model returned {type(out).__name__}, not a Tensor")
        b = x.shape[0]
        if self.task == "classification" and self.model.loss_fn is None:
            k = self.data.n_classes or int(y.max()) + 1
            if out.ndim != 2 or out.shape[0] != b or out.shape[1] < k:
                raise UserError(f"{src}: model output shape {tuple(out.shape)} does not match the "
                                f"labels: expected ({b}, {k}) for {k} classes")
        elif self.task == "regression" and self.model.loss_fn is None:
            if out.shape[0] != b or out[0].numel() != y[0].numel():
                want = (b,) + tuple(y.shape[1:]) if y.ndim > 1 else f"({b},) or ({b}, 1)"
                # class labels saved as floats (1.0, 2.0: pandas does so) read as regression
                hint = ("; the targets are floats, so the task was taken as regression: if they "
                        "are class labels, set task = \"classification\" in the model file"
                        if self.model.task is None and y.ndim == 1 and out.ndim == 2
                        and out.shape[1] > 1 else "")
                raise UserError(f"{src}: model output shape {tuple(out.shape)} does not match "
                                f"the regression targets: expected {want}{hint}")
        try:
            loss = self.loss_fn(out, y)
        except Exception as e:
            raise UserError(f"{src}: the loss failed on the model output of shape "
                            f"{tuple(out.shape)}: {_one_line(e)}") from e
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise UserError(f"{src}: loss_fn must return a scalar tensor, got "
                            + (f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                               else type(loss).__name__))
        if not loss.requires_grad:  # .item(), float() or torch.tensor(...) cut the graph
            raise UserError(f"{src}: the loss does not depend on the model's parameters (no "
                            "gradient); compute it with torch operations on the output, without "
                            ".item(), float() or .detach()")
        xb, yb = self.data.x_train[:batch_size or b], self.data.y_train[:batch_size or b]
        if len(xb) != b:  # e.g. a model hard-wired to 8 examples fails here, not mid-run
            try:
                with torch.no_grad():
                    self.loss_fn(m(xb), yb)
            except Exception as e:
                raise UserError(f"{src}: forward/loss failed on a training batch of shape "
                                f"{tuple(xb.shape)}: {_one_line(e)}") from e

    def summary(self) -> dict[str, Any]:
        return {"model": self.model.source, "model_name": self.model.name,
                "entry_point": self.model.entry, "task": self.task, "n_params": self.n_params,
                "loss": "loss_fn (user)" if self.model.loss_fn else
                ("cross_entropy" if self.task == "classification" else "mse")}
