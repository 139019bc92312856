"""What every learned update rule shares: meta-weights, per-coordinate state, a config.

A rule is an ``nn.Module`` holding only meta-weights.  Its optimizer state is kept apart, in a
plain dict of tensors whose *coordinate* axis is given by :attr:`LearnedRule.state_layout`, so the
same rule serves a ``torch.optim`` adapter (state per parameter), the meta-trainer (state for B
optimizee instances at once) and the zoo (weights only).  The update contract is::

    update, new_state = rule(grad, state)      # grad: flat (N,)
    theta_new = theta + update

Two modes, one code path:

* **differentiable** (autograd on): new state tensors are returned and the graph reaches the
  meta-weights through the update and the recurrent state, and through ``grad`` if the caller
  gave it a graph: the meta-trainer passes detached gradients (second derivatives dropped, as in
  both papers) unless ``TrainConfig.second_order`` asks for the exact meta-gradient;
* **inference** (``torch.no_grad()``): state tensors are updated in place, and the network is
  evaluated in row chunks (:meth:`LearnedRule.chunk_rows`: small on the CPU, so activations
  stay in cache; large on a GPU, where each call costs kernel launches).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

State = dict[str, Tensor]


class LearnedRule(nn.Module):
    """Base class of learned update rules (see module docstring for the contract)."""

    #: registry key, e.g. ``"rnnprop"``
    name: ClassVar[str] = ""
    #: coordinate axis of each state tensor (``step`` is special: scalar or ``(N,)``)
    state_layout: ClassVar[dict[str, int]] = {}
    #: rows per network call in inference mode on the CPU, where small chunks keep the
    #: activations in cache; ``0`` means all rows at once
    chunk_size: int = 8192
    #: the same on a GPU: each call is ~60 kernel launches, so CPU-sized chunks make a large step
    #: launch-bound (an H200 at 1e6 parameters: 59 ms with 8192 rows, 5.7 ms with all rows); a
    #: million rows keep the launches negligible and the activations near 2 GB
    gpu_chunk_size: int = 1 << 20

    def init_state(self, n: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> State:
        """Zero state for ``n`` coordinates."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments plus ``rule``: enough to rebuild the module with :func:`build_rule`."""
        raise NotImplementedError

    def state_floats_per_coordinate(self) -> int:
        """Optimizer-state floats stored per parameter coordinate (excluding the step counter)."""
        st = self.init_state(1)
        return sum(t.numel() for k, t in st.items() if k != "step")

    @staticmethod
    def differentiable() -> bool:
        return torch.is_grad_enabled()

    def chunk_rows(self, device: torch.device | str) -> int:
        """Rows per network call on ``device`` (``0``: all at once)."""
        return self.chunk_size if torch.device(device).type == "cpu" else self.gpu_chunk_size

    def _chunks(self, n: int, device: torch.device | str = "cpu") -> list[slice]:
        rows = self.chunk_rows(device)
        size = rows if rows > 0 else n
        return [slice(s, min(s + size, n)) for s in range(0, n, max(size, 1))]


RULES: dict[str, type[LearnedRule]] = {}


def register(cls: type[LearnedRule]) -> type[LearnedRule]:
    RULES[cls.name] = cls
    return cls


def build_rule(config: dict[str, Any]) -> LearnedRule:
    """Rebuild a rule (random meta-weights) from :meth:`LearnedRule.config` output."""
    cfg = dict(config)
    name = cfg.pop("rule", None)
    if name not in RULES:
        raise ValueError(f"unknown learned rule {name!r}; known: {', '.join(sorted(RULES))}")
    return RULES[name](**cfg)
