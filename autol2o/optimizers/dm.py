"""DMoptimizer: the coordinatewise LSTM optimizer of Andrychowicz et al. 2016 ("Learning to learn
by gradient descent by gradient descent"), as re-implemented by the RNNprop authors.

Per coordinate, with gradient g and p = 10 ("log and sign" preprocessing)::

    x_t = [max(log|g| / p, -1), clip(g e^p, -1, 1)]
    y_t, (h_t, c_t) = LSTM_2x20(x_t, (h_{t-1}, c_{t-1}))
    theta_t = theta_{t-1} + 0.1 (W_out y_t + b_out)

The step is *not* bounded by construction (unlike RNNprop's tanh); for weights W_out, b_out it
is at most ``out_scale * (||W_out||_1 + |b_out|)`` since |y| < 1.  State per coordinate: the
LSTM's h, c for 2 layers of 20 units = 80 floats.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import LearnedRule, State, register
from .lstm import CoordinateLSTM, truncated_normal_


def dm_features(grad: Tensor, p: float) -> Tensor:
    """Log-and-sign preprocessing, ``(N,) -> (N, 2)``; g = 0 gives ``[-1, 0]``."""
    if grad.requires_grad:  # second-order meta-training: log|g| at g = 0 would make the
        # meta-gradient nan (0 * inf); the same values, with gradient 0 there
        zero = grad == 0
        safe = torch.where(zero, 1.0, grad.abs())
        log_mag = torch.where(zero, -1.0, torch.clamp(torch.log(safe) / p, min=-1.0))
    else:
        log_mag = torch.clamp(torch.log(grad.abs()) / p, min=-1.0)
    sign = torch.clamp(grad * math.exp(p), -1.0, 1.0)
    return torch.stack((log_mag, sign), dim=-1)


@register
class DMOptimizer(LearnedRule):
    """DMoptimizer meta-weights; ``rule(grad, state) -> (update, new_state)``."""

    name = "dm"
    state_layout = {"h": 1, "c": 1}

    def __init__(self, hidden: int = 20, layers: int = 2, p: float = 10.0, out_scale: float = 0.1):
        super().__init__()
        if not (p > 0 and out_scale > 0):  # written so that NaN is refused too
            raise ValueError(f"p and out_scale must be positive, got {p}, {out_scale}")
        self.hidden, self.layers, self.p, self.out_scale = hidden, layers, p, out_scale
        self.lstm = CoordinateLSTM(2, hidden, layers)
        self.output = nn.Linear(hidden, 1)
        truncated_normal_(self.output.weight, 0.1)
        nn.init.zeros_(self.output.bias)

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "hidden": self.hidden, "layers": self.layers, "p": self.p,
                "out_scale": self.out_scale}

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        z = torch.zeros(self.layers, n, self.hidden, device=device, dtype=dtype)
        return {"h": z, "c": z.clone(), "step": torch.zeros((), device=device, dtype=dtype)}

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        return dm_update(self, grad, state)


def dm_update(net: DMOptimizer, grad: Tensor, state: State, *,
              reference: bool = False) -> tuple[Tensor, State]:
    """Functional core of DMoptimizer: ``(net, grad, state) -> (update, new_state)``.

    Same two modes as :func:`autol2o.optimizers.rnnprop.rnnprop_update`.
    """
    feats = dm_features(grad, net.p)
    step = state["step"] + 1
    if reference or net.differentiable():
        lstm = net.lstm.reference if reference else net.lstm
        y, h, c = lstm(feats, state["h"], state["c"])
        update = net.out_scale * net.output(y).squeeze(-1)
        return update, {"h": h, "c": c, "step": step}
    h, c = state["h"], state["c"]
    update = torch.empty_like(feats[:, 0])
    fast = net.lstm.fast_weights()
    for rows in net._chunks(feats.shape[0], feats.device):
        y = net.lstm.forward_into(feats[rows], h[:, rows], c[:, rows], fast)
        update[rows] = net.output(y).squeeze(-1)
    update.mul_(net.out_scale)
    state["step"] = step
    return update, state
