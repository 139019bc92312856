"""``LearnedOptimizer``: any learned rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .base import LearnedRule

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_Item = tuple[Tensor, dict[str, Any]]  # (parameter, its param group)
#: parameters with at least this many coordinates are stepped alone, on their own state in place;
#: for smaller ones a network call costs more than copying their state into a batch and back
_ALONE = 2048
#: on a GPU copying state in and out is cheap and each network call costs kernel launches: only
#: large parameters go alone there
_ALONE_GPU = 1 << 18


def state_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is kept in float32 for half-precision parameters, else in their dtype."""
    if not param_dtype.is_floating_point:
        raise ValueError(f"learned optimizers need floating-point parameters, got {param_dtype}")
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a learned update rule (RNNprop, DMoptimizer, ...) to ordinary parameters.

    Args:
        params: iterable of floating-point tensors or of dicts (param groups).
        rule: a :class:`~autol2o.optimizers.base.LearnedRule` (its meta-weights are copied and
            frozen, so later meta-training of ``rule`` does not change this optimizer), or the name
            of a zoo entry / path to one.
        lr: multiplier on the learned update (1.0 = the step the rule was trained to take).
            Per group.
        weight_decay: decoupled weight decay, ``theta -= lr * weight_decay * theta``. Per group.

    Each parameter owns its state (``self.state[p]``, allocated at its first step).  A parameter
    of at least 2048 coordinates on the CPU (2^18 on a GPU; or the rule's chunk,
    ``rule.chunk_rows(device)``, if smaller: 8192 rows on the CPU, 2^20 on a GPU) goes through the
    network alone, its state updated in place; smaller ones are batched, per (device, state
    dtype), into runs of at most one chunk whose state is copied in and back out.  Parameters
    whose ``grad`` is ``None`` are skipped and their state does not advance.

    Memory: for ``rule.state_floats_per_coordinate()`` = k floats per coordinate (RNNprop: m, v
    and 2x2x20 LSTM state = 82; DMoptimizer: 80), the state costs ``4k`` bytes per float32
    parameter (328 B for RNNprop, i.e. 82x the parameter itself; ``8k`` for float64).  Half
    precision parameters keep float32 state.  A step additionally needs about
    ``chunk * (400 + 2k)`` floats of activations and batched state, plus a few floats per
    coordinate of the largest parameter for the input features.
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
        self._nets: dict[tuple[torch.device, torch.dtype], tuple[tuple, LearnedRule]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``; non-floating-point parameters are refused (``ValueError``)."""
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                state_dtype_for(p.dtype)
        except ValueError:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles (and deep-copies) only defaults, state and param_groups; the rule is
        # part of this optimizer.  The per-device copies in ``_nets`` are a cache, rebuilt lazily.
        return {**super().__getstate__(), "rule": self.rule}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._nets = {}

    # -- helpers -----------------------------------------------------------------------------
    def _rule_version(self) -> tuple:
        """Changes whenever ``self.rule`` is replaced, its weights are written (``_version``
        counts in-place writes, ``load_state_dict`` included) or a chunk size is set."""
        return (id(self.rule), self.rule.chunk_size, self.rule.gpu_chunk_size,
                tuple(t._version for t in self.rule.state_dict().values()))

    def _net(self, device: torch.device, dtype: torch.dtype) -> LearnedRule:
        """``self.rule`` on ``device`` in ``dtype``: a cached copy, re-made when the rule changed
        (so ``opt.rule.load_state_dict(...)`` or ``opt.rule.chunk_size = n`` take effect)."""
        key, version = (device, dtype), self._rule_version()
        cached = self._nets.get(key)
        if cached is None or cached[0] != version:
            self._nets[key] = cached = (version, copy.deepcopy(self.rule).to(device=device,
                                                                              dtype=dtype))
        return cached[1]

    def _update(self, items: list[_Item], sdtype: torch.dtype, net: LearnedRule) -> None:
        """One call of ``net`` for ``items`` (parameter, group), then the parameter updates.

        A single parameter's own state tensors are passed, and updated in place; for several,
        their state is concatenated for the call and copied back afterwards.
        """
        params = [p for p, _ in items]
        device = params[0].device
        layout = self.rule.state_layout
        states = [self.state[p] for p in params]
        flat = {k: _cat([s[k] for s in states], dim) for k, dim in layout.items()}
        grad = _cat([p.grad.reshape(-1).to(sdtype) for p in params])
        steps = [s["step"] for s in states]
        # a lone parameter (the common case for large ones) needs no comparison: on a GPU each
        # bool() of a device tensor would wait for the device
        if len(steps) == 1 or all(bool(s == steps[0]) for s in steps):
            step = steps[0].to(device=device, dtype=sdtype)
        else:
            step = torch.cat([s.to(device=device, dtype=sdtype).expand(p.numel())
                              for s, p in zip(steps, params)])
        update, _ = net(grad, dict(flat, step=step))  # updates `flat`
        sizes = [p.numel() for p in params]
        for (p, group), st, u, off in zip(items, states, update.split(sizes), _offsets(params)):
            if len(states) > 1:
                for k, dim in layout.items():
                    st[k].copy_(flat[k].narrow(dim, off, p.numel()))
            st["step"] += 1
            if group["weight_decay"] != 0:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(u.view_as(p).to(p.dtype), alpha=group["lr"])

    # -- torch.optim API ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple[torch.device, torch.dtype], list[_Item]] = {}
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
            net = self._net(device, sdtype)  # once per step: its version check is not free
            rows = self.rule.chunk_rows(device) or math.inf
            alone = _ALONE if device.type == "cpu" else _ALONE_GPU
            for batch in _batches(items, min(alone, rows), rows):
                self._update(batch, sdtype, net)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; tensors keep the state dtype (float32 for half-precision parameters).

        State that does not fit the rule (other keys, e.g. another rule's or Adam's) or the
        parameter (shape) raises ``ValueError`` and leaves the optimizer unchanged.
        ``torch.optim`` casts state to the parameter dtype, which would round float32 state of
        bf16 parameters; the saved tensors are therefore restored exactly afterwards.
        """
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        # groups that do not match: torch.optim raises its own ValueError, naming the real problem
        if sizes == [len(g["params"]) for g in self.param_groups]:
            for n, (i, p) in enumerate(zip(ids, params)):
                if i in saved:
                    self._check_state(n, p, saved[i])
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            if i in saved:
                sdtype = state_dtype_for(p.dtype)
                self.state[p] = {
                    k: (v.to(device=p.device, dtype=sdtype).clone() if k != "step"
                        else v.to(dtype=torch.float32).clone())
                    for k, v in saved[i].items()
                }

    def _check_state(self, n: int, p: Tensor, st: dict[str, Any]) -> None:
        want = self.rule.init_state(p.numel(), device="meta")
        if set(st) != set(want):
            raise ValueError(f"loaded state of parameter {n} has keys {sorted(st)}, but rule "
                             f"{self.rule.name!r} keeps {sorted(want)}")
        for k, t in want.items():
            shape = tuple(st[k].shape) if isinstance(st[k], Tensor) else None
            if shape != tuple(t.shape):
                raise ValueError(f"loaded state {k!r} of parameter {n} has shape {shape}, expected "
                                 f"{tuple(t.shape)} for a parameter of {p.numel()} elements")


def _batches(items: list[_Item], alone: float, rows: float) -> Iterator[list[_Item]]:
    """Parameters of ``alone`` coordinates or more one by one, smaller ones in runs of at most
    ``rows`` coordinates (``alone <= rows``)."""
    batch: list[_Item] = []
    n = 0
    for item in items:
        size = item[0].numel()
        if size >= alone:
            yield [item]
            continue
        if n + size > rows:
            yield batch
            batch, n = [], 0
        batch.append(item)
        n += size
    if batch:
        yield batch


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` that returns a lone tensor itself rather than a copy."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _offsets(params: list[Tensor]) -> list[int]:
    out, off = [], 0
    for p in params:
        out.append(off)
        off += p.numel()
    return out
