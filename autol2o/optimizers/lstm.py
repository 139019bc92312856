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

    def fast_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer, ``(W', b')`` for :meth:`forward_into`: transposed, gates reordered to
        ``[i, f, o, g]`` and the sigmoid gates' rows halved, because
        ``sigmoid(z) = 0.5 * tanh(z / 2) + 0.5`` lets one ``tanh`` serve all four gates."""
        out = []
        hid = self.hidden
        order = [slice(0, hid), slice(hid, 2 * hid), slice(3 * hid, 4 * hid), slice(2 * hid, 3 * hid)]
        for w, b in zip(self.weights, self.biases):
            w2 = torch.cat([w[s] for s in order])
            b2 = torch.cat([b[s] for s in order])
            w2[: 3 * hid] *= 0.5
            b2[: 3 * hid] *= 0.5
            out.append((w2.t().contiguous(), b2))
        return out

    def forward_into(self, x: Tensor, h: Tensor, c: Tensor,
                     fast: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Fast path without autograd: updates ``h`` and ``c`` in place, returns the output.

        Only valid under ``torch.no_grad()``, with ``fast = self.fast_weights()``.  Per layer it
        costs one ``addmm``, one ``tanh`` over all gates and four in-place elementwise passes,
        against ~10 separate kernels (and their temporaries) for :meth:`forward`.
        """
        hid = self.hidden
        for layer, (w_t, b) in enumerate(fast):
            h_l, c_l = h[layer], c[layer]
            gates = torch.addmm(b, torch.cat((x, h_l), dim=-1), w_t).tanh_()
            sig = gates[:, : 3 * hid].mul_(0.5).add_(0.5)
            i, f, o = sig[:, :hid], sig[:, hid : 2 * hid], sig[:, 2 * hid :]
            g = gates[:, 3 * hid :]
            c_l.mul_(f).addcmul_(i, g)
            x = torch.mul(torch.tanh(c_l), o, out=h_l)  # h' written straight into the state
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
