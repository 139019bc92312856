"""RNNprop (Lv, Jiang & Li, ICML 2017, "Learning Gradient Descent: Better Generalization and
Longer Horizons").

Per coordinate, with gradient g at step t (moments start at zero, b1 = b2 = 0.95)::

    m_t = b1 m_{t-1} + (1 - b1) g            v_t = b2 v_{t-1} + (1 - b2) g^2
    m^_t = m_t / (1 - b1^t)                  v^_t = v_t / (1 - b2^t)
    s_t = sqrt(v^_t) + eps                   (eps = 1e-8, outside the square root)
    x_t = [g / s_t, m^_t / s_t]
    z_t = ELU(W_in x_t + b_in)               (Linear 2 -> 20)
    y_t, (h_t, c_t) = LSTM_2x20(z_t, (h_{t-1}, c_{t-1}))
    theta_t = theta_{t-1} - 0.1 tanh(W_out y_t + b_out)

so no coordinate moves by more than ``out_scale`` = 0.1 in one step.  State per coordinate:
m, v and the LSTM's h, c for 2 layers of 20 units: 2 + 2*2*20 = 82 floats.

``magnitude=True`` (not in the paper) adds a third input, the log of the gradient's RMS::

    x_t = [g / s_t, m^_t / s_t, log(s_t) / 10]

The paper's two inputs make the rule blind to gradient magnitudes, so it can express Adam-like
rules but not momentum SGD, whose step is proportional to the gradient; on the MNIST MLP tuned
NAG beats every Adam variant (``benchmarks/headroom.py``).  With log(s_t) the LSTM's gates can
form products such as s^a m^/s.  The price is the scale invariance below: the random-scaling
trick then teaches the rule to cope with unknown scales instead of ignoring them by design.

Scaling the loss by c > 0 scales g, m^_t and sqrt(v^_t) by c, so x_t is invariant up to eps: the
relative change is about eps / sqrt(v^_t).  The updates are therefore scale-invariant only while
gradients stay well above eps (|g| >> 1e-8); tiny ones (e.g. a loss scaled by 1e-5) change them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LearnedRule, State, register
from .lstm import CoordinateLSTM, truncated_normal_


def rnnprop_features(grad: Tensor, m: Tensor, v: Tensor, step: Tensor, beta1: float,
                     beta2: float, eps: float, magnitude: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Moment update and the input features. Returns ``(features (N, 2 or 3), m_t, v_t)``; the
    third feature, log(s_t) / 10, only with ``magnitude``.

    ``step`` is the new step count t (scalar or per coordinate). Pure: inputs are not modified.
    """
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - torch.pow(beta1, step))
    v_hat = v / (1.0 - torch.pow(beta2, step))
    if grad.requires_grad:  # second-order meta-training: d sqrt(v)/dv is inf at v = 0, and
        # inf * 0 = nan would poison the meta-gradient; same values, gradient 0 there instead
        zero = v_hat == 0
        s = torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, v_hat))) + eps
    else:
        s = torch.sqrt(v_hat) + eps
    feats = (grad / s, m_hat / s, torch.log(s) / 10.0) if magnitude else (grad / s, m_hat / s)
    return torch.stack(feats, dim=-1), m, v


@register
class RNNprop(LearnedRule):
    """RNNprop meta-weights; ``rule(grad, state) -> (update, new_state)``. See module docstring."""

    name = "rnnprop"
    state_layout = {"m": 0, "v": 0, "h": 1, "c": 1}

    def __init__(self, hidden: int = 20, layers: int = 2, preproc: int = 20, beta1: float = 0.95,
                 beta2: float = 0.95, eps: float = 1e-8, out_scale: float = 0.1,
                 magnitude: bool = False):
        super().__init__()
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {beta1}, {beta2}")
        if not (eps > 0 and out_scale > 0):  # written so that NaN is refused too
            raise ValueError(f"eps and out_scale must be positive, got {eps}, {out_scale}")
        if preproc < 1:  # checked here: nn.Linear would raise a RuntimeError the zoo does not expect
            raise ValueError(f"preproc must be positive, got {preproc}")
        self.hidden, self.layers, self.preproc = hidden, layers, preproc
        self.beta1, self.beta2, self.eps, self.out_scale = beta1, beta2, eps, out_scale
        self.magnitude = bool(magnitude)
        self.input = nn.Linear(3 if magnitude else 2, preproc)
        self.lstm = CoordinateLSTM(preproc, hidden, layers)
        self.output = nn.Linear(hidden, 1)
        for lin in (self.input, self.output):
            truncated_normal_(lin.weight, 0.1)
            nn.init.zeros_(lin.bias)

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "hidden": self.hidden, "layers": self.layers,
                "preproc": self.preproc, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "out_scale": self.out_scale,
                # only when set: the paper's rule keeps the config (and the cards) it always had
                **({"magnitude": True} if self.magnitude else {})}

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        z = torch.zeros(self.layers, n, self.hidden, device=device, dtype=dtype)
        return {"m": torch.zeros(n, device=device, dtype=dtype),
                "v": torch.zeros(n, device=device, dtype=dtype),
                "h": z, "c": z.clone(),
                "step": torch.zeros((), device=device, dtype=dtype)}

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        return rnnprop_update(self, grad, state)


def rnnprop_update(net: RNNprop, grad: Tensor, state: State, *,
                   reference: bool = False) -> tuple[Tensor, State]:
    """Functional core of RNNprop: ``(net, grad, state) -> (update, new_state)``.

    With autograd enabled the result is differentiable in the meta-weights and ``state`` is left
    untouched.  Under ``torch.no_grad()`` the state is updated in place (and returned) and the
    network runs chunk by chunk.  ``reference=True`` uses the plain LSTM equations instead of the
    fused fast path (ground truth for tests).
    """
    step = state["step"] + 1
    feats, m, v = rnnprop_features(grad, state["m"], state["v"], step, net.beta1, net.beta2,
                                   net.eps, net.magnitude)
    if reference or net.differentiable():
        x = F.elu(net.input(feats))
        lstm = net.lstm.reference if reference else net.lstm
        y, h, c = lstm(x, state["h"], state["c"])
        update = -net.out_scale * torch.tanh(net.output(y).squeeze(-1))
        return update, {"m": m, "v": v, "h": h, "c": c, "step": step}
    h, c = state["h"], state["c"]
    update = torch.empty_like(grad)
    fast = net.lstm.fast_weights()
    for rows in net._chunks(grad.shape[0], grad.device):
        x = F.elu(net.input(feats[rows]))
        y = net.lstm.forward_into(x, h[:, rows], c[:, rows], fast)
        update[rows] = net.output(y).squeeze(-1)
    update.tanh_().mul_(-net.out_scale)
    state["m"].copy_(m)
    state["v"].copy_(v)
    state["step"] = step
    return update, state
