"""``LearnedOptimizer``: any learned rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .base import LearnedRule

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is kept in float32 for half-precision parameters, else in their dtype."""
    if not param_dtype.is_floating_point:
        raise ValueError(f"learned optimizers need floating-point parameters, got {param_dtype}")
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a learned update rule (RNNprop, DMoptimizer, ...) to ordinary parameters.

    Args:
        params: iterable of tensors or of dicts (param groups).
        rule: a :class:`~autol2o.optimizers.base.LearnedRule` (its meta-weights are copied and
            frozen, so later meta-training of ``rule`` does not change this optimizer), or the name
            of a zoo entry / path to one.
        lr: multiplier on the learned update (1.0 = the step the rule was trained to take).
            Per group.
        weight_decay: decoupled weight decay, ``theta -= lr * weight_decay * theta``. Per group.

    Every step, all coordinates of all parameters that have a gradient go through the network as
    one batch per (device, state dtype).  Parameters whose ``grad`` is ``None`` are skipped and
    their state does not advance.

    Memory: for ``rule.state_floats_per_coordinate()`` = k floats per coordinate (RNNprop: m, v
    and 2x2x20 LSTM state = 82; DMoptimizer: 80), the state costs ``4k`` bytes per float32
    parameter (328 B for RNNprop, i.e. 82x the parameter itself; ``8k`` for float64).  Half
    precision parameters keep float32 state.  A step additionally needs transient activations of
    about ``chunk_size * 400`` floats (the network runs in chunks of ``rule.chunk_size`` rows).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 rule: LearnedRule | str, lr: float = 1.0, weight_decay: float = 0.0):
        if isinstance(rule, str):
            from autol2o.zoo import load_rule  # local import: the zoo imports this package

            rule = load_rule(rule)
        if not isinstance(rule, LearnedRule):
            raise ValueError(f"rule must be a LearnedRule or a zoo name, got {type(rule).__name__}")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate multiplier: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.rule = copy.deepcopy(rule).requires_grad_(False).eval()
        self._nets: dict[tuple[torch.device, torch.dtype], LearnedRule] = {}
        # (device, dtype) -> (params, flat state); per-parameter state entries are views into it
        self._flat: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], dict[str, Tensor]]] = {}

    # -- helpers -----------------------------------------------------------------------------
    def _net(self, device: torch.device, dtype: torch.dtype) -> LearnedRule:
        key = (device, dtype)
        if key not in self._nets:
            self._nets[key] = copy.deepcopy(self.rule).to(device=device, dtype=dtype)
        return self._nets[key]

    def _flat_state(self, key: tuple[torch.device, torch.dtype], params: list[Tensor]) -> dict[str, Tensor]:
        """The bucket's state as flat tensors; per-parameter state becomes views into them.

        Steady state (same parameters as last step, state untouched) costs no copy at all.
        """
        layout = self.rule.state_layout
        cached = self._flat.get(key)
        if cached is not None and len(cached[0]) == len(params) and all(
            a is b for a, b in zip(cached[0], params)
        ):
            flat = cached[1]
            if all(self._is_view(flat, self.state[p], off, p.numel())
                   for p, off in zip(params, _offsets(params))):
                return flat
        flat = {k: torch.cat([self.state[p][k] for p in params], dim=dim)
                for k, dim in layout.items()}
        for p, off in zip(params, _offsets(params)):
            for k, dim in layout.items():
                self.state[p][k] = flat[k].narrow(dim, off, p.numel())
        self._flat[key] = (list(params), flat)
        return flat

    def _is_view(self, flat: dict[str, Tensor], st: dict[str, Tensor], off: int, n: int) -> bool:
        for k, dim in self.rule.state_layout.items():
            view = flat[k].narrow(dim, off, n)
            t = st[k]
            if t.data_ptr() != view.data_ptr() or t.shape != view.shape or t.stride() != view.stride():
                return False
        return True

    # -- torch.optim API ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                sdtype = state_dtype_for(p.dtype)
                st = self.state[p]
                if not st:
                    fresh = self.rule.init_state(p.numel(), device=p.device, dtype=sdtype)
                    st.update({k: v for k, v in fresh.items() if k != "step"})
                    st["step"] = torch.zeros((), dtype=torch.float32)
                buckets.setdefault((p.device, sdtype), []).append((p, group))
        for (device, sdtype), items in buckets.items():
            params = [p for p, _ in items]
            flat = self._flat_state((device, sdtype), params)
            grad = torch.cat([p.grad.reshape(-1).to(sdtype) for p in params])
            steps = [self.state[p]["step"] for p in params]
            if all(bool(s == steps[0]) for s in steps):
                step = steps[0].to(device=device, dtype=sdtype)
            else:
                step = torch.cat([s.to(device=device, dtype=sdtype).expand(p.numel())
                                  for s, p in zip(steps, params)])
            state = dict(flat, step=step)
            update, _ = self._net(device, sdtype)(grad, state)  # updates `flat` in place
            for (p, group), u in zip(items, update.split([p.numel() for p in params])):
                self.state[p]["step"] += 1
                if group["weight_decay"] != 0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(u.view_as(p).to(p.dtype), alpha=group["lr"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; tensors keep the state dtype (float32 for half-precision parameters).

        ``torch.optim`` casts state to the parameter dtype, which would round float32 state of
        bf16 parameters; the saved tensors are therefore restored exactly afterwards.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                sdtype = state_dtype_for(p.dtype)
                self.state[p] = {
                    k: (v.to(device=p.device, dtype=sdtype).clone() if k != "step"
                        else v.to(dtype=torch.float32).clone())
                    for k, v in saved[i].items()
                }
        self._flat.clear()


def _offsets(params: list[Tensor]) -> list[int]:
    out, off = [], 0
    for p in params:
        out.append(off)
        off += p.numel()
    return out
