"""A coordinatewise stacked LSTM shared by the learned update rules.

Every scalar coordinate of the optimizee is one row of the batch, so the cell is applied to an
``(N, features)`` matrix where N is the total number of coordinates.  Two code paths compute the
same function:

* :meth:`CoordinateLSTM.reference` spells the textbook equations out, one matmul per operand;
  it is the ground truth in the tests.
* :meth:`CoordinateLSTM.forward` is the fast path: the input and recurrent weights are stored
  fused as one ``(4H, in + H)`` matrix, so each layer costs one ``addmm`` over ``[x, h]``.

For one layer with input x, hidden state h and cell state c::

    [i, f, g, o] = W [x; h] + b
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CoordinateLSTM(nn.Module):
    """``layers`` stacked LSTM cells of ``hidden`` units applied row-wise to ``(N, in)`` input.

    State is a pair ``(h, c)`` of tensors shaped ``(layers, N, hidden)``.
    """

    def __init__(self, input_size: int, hidden: int = 20, layers: int = 2, forget_bias: float = 1.0):
        super().__init__()
        if input_size < 1 or hidden < 1 or layers < 1:
            raise ValueError("input_size, hidden and layers must be positive")
        self.input_size, self.hidden, self.layers = input_size, hidden, layers
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer in range(layers):
            fan_in = input_size if layer == 0 else hidden
            bound = 1.0 / math.sqrt(hidden)
            w = torch.empty(4 * hidden, fan_in + hidden).uniform_(-bound, bound)
            b = torch.zeros(4 * hidden)
            # A positive forget-gate bias keeps the cell state alive early in meta-training
            # (the TensorFlow cells the reference implementations used add 1.0 here).
            b[hidden : 2 * hidden] = forget_bias
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    @staticmethod
    def _cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new, c_new

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fast path: one fused ``addmm`` per layer. Returns ``(output, h', c')``."""
        hs, cs = [], []
        for layer in range(self.layers):
            xh = torch.cat((x, h[layer]), dim=-1)
            gates = torch.addmm(self.biases[layer], xh, self.weights[layer].t())
            x, c_l = self._cell(gates, c[layer])
            hs.append(x)
            cs.append(c_l)
        return x, torch.stack(hs), torch.stack(cs)

    def forward_into(self, x: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """Fast path without autograd: updates ``h`` and ``c`` in place, returns the output.

        Only valid under ``torch.no_grad()``; it saves the two ``torch.stack`` copies of
        :meth:`forward`, which matter when N is large.
        """
        for layer in range(self.layers):
            xh = torch.cat((x, h[layer]), dim=-1)
            gates = torch.addmm(self.biases[layer], xh, self.weights[layer].t())
            x, c_l = self._cell(gates, c[layer])
            h[layer].copy_(x)
            c[layer].copy_(c_l)
        return x

    def reference(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Plain per-gate equations with separate input/recurrent matmuls (ground truth)."""
        hs, cs = [], []
        hid = self.hidden
        for layer in range(self.layers):
            w, b = self.weights[layer], self.biases[layer]
            n_in = w.shape[1] - hid
            w_ih, w_hh = w[:, :n_in], w[:, n_in:]
            pre = x @ w_ih.t() + h[layer] @ w_hh.t() + b
            i = torch.sigmoid(pre[:, 0 * hid : 1 * hid])
            f = torch.sigmoid(pre[:, 1 * hid : 2 * hid])
            g = torch.tanh(pre[:, 2 * hid : 3 * hid])
            o = torch.sigmoid(pre[:, 3 * hid : 4 * hid])
            c_new = f * c[layer] + i * g
            x = o * torch.tanh(c_new)
            hs.append(x)
            cs.append(c_new)
        return x, torch.stack(hs), torch.stack(cs)

    def flops_per_row(self) -> int:
        """Multiply-adds x2 of the matmuls per coordinate (the elementwise work is extra)."""
        total = 0
        for layer in range(self.layers):
            fan_in = self.input_size if layer == 0 else self.hidden
            total += 2 * (fan_in + self.hidden) * 4 * self.hidden
        return total


def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """Normal(0, std^2) truncated at two standard deviations, as TensorFlow's initializer."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)
