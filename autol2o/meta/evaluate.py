"""The authors' evaluation protocol, for learned rules and ``torch.optim`` baselines alike.

For ``runs`` instances of a task (instance r seeded by ``mix_seed(seed, r)``, so every optimizer
sees the *same* initial parameters and the *same* minibatch at step t), run ``steps`` updates and
report the final loss::

    final_r = (1/N) sum_{t<N} f(theta_N^r; batch_t^r)        (N = steps)

i.e. the loss at the final parameters averaged over the N minibatches the run saw.  Instances are
batched: a learned rule gets one call for all of them (it is coordinatewise) and a baseline gets a
single ``(B, n)`` parameter tensor (Adam, SGD, RMSProp, NAG, Adagrad are elementwise, so this is
exactly B independent runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..optimizers.base import LearnedRule
from .tasks import Task, generators, mix_seed

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass
class EvalResult:
    """``final_losses`` (runs,), ``curves`` (steps, runs) = training loss f(theta_t; batch_t)."""

    final_losses: Tensor
    curves: Tensor
    diverged: int
    wall_time: float

    @property
    def final_loss(self) -> float:
        """Mean final loss over the runs that did not diverge (nan if all diverged)."""
        ok = self.final_losses[torch.isfinite(self.final_losses)]
        return float(ok.mean()) if ok.numel() else math.nan

    @property
    def final_loss_std(self) -> float:
        ok = self.final_losses[torch.isfinite(self.final_losses)]
        return float(ok.std()) if ok.numel() > 1 else 0.0


def baseline(name: str, lr: float, **kwargs) -> OptimizerFactory:
    """Factory for a hand-designed baseline: ``adam``, ``sgd``, ``nag``, ``momentum``, ``rmsprop``,
    ``adagrad`` (NAG/momentum use momentum 0.9 unless given)."""
    name = name.lower()
    if name == "adam":
        return lambda p: torch.optim.Adam(p, lr=lr, **kwargs)
    if name == "sgd":
        return lambda p: torch.optim.SGD(p, lr=lr, **kwargs)
    if name in ("nag", "momentum"):
        kw = {"momentum": 0.9, **kwargs}
        return lambda p: torch.optim.SGD(p, lr=lr, nesterov=name == "nag", **kw)
    if name == "rmsprop":
        return lambda p: torch.optim.RMSprop(p, lr=lr, **kwargs)
    if name == "adagrad":
        return lambda p: torch.optim.Adagrad(p, lr=lr, **kwargs)
    raise UserError(f"unknown baseline optimizer {name!r}; known: adam, sgd, nag, momentum, "
                    "rmsprop, adagrad")


def sqrt2_grid(lo: float = -12, hi: float = 0) -> list[float]:
    """The paper's learning-rate grid for tuning baselines: 2^lo, 2^(lo + 1/2), ..., 2^hi."""
    return [2.0 ** (k / 2) for k in range(round(2 * lo), round(2 * hi) + 1)]


def run_seeds(seed: int, runs: int) -> list[int]:
    """Instance seeds of the protocol: run r of evaluation seed ``seed``."""
    return [mix_seed(seed, 0xE7A1, r) for r in range(runs)]


def loss_and_grad(task_loss: Callable[[Tensor, object], Tensor], theta: Tensor,
                  batch: object) -> tuple[Tensor, Tensor]:
    """Per-instance loss ``(B,)`` and its gradient ``(B, n)``, both detached."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        loss = task_loss(th, batch)
        (g,) = torch.autograd.grad(loss.sum(), th)
    return loss.detach(), g


def run_learned(rule: LearnedRule, task: Task, theta: Tensor, plan: object, steps: int,
                curve: Tensor | None = None) -> Tensor:
    """``steps`` updates of the instances ``theta`` (B, n) by ``rule`` from a fresh state, on the
    minibatches of ``plan``; the training loss of step t goes to ``curve[t]`` (if given).  One
    rule call serves all B instances: the rule is coordinatewise."""
    state = rule.init_state(theta.numel(), device=theta.device, dtype=theta.dtype)
    for t in range(steps):
        loss, g = loss_and_grad(task.loss, theta, task.batch(plan, t))
        with torch.no_grad():
            update, state = rule(g.reshape(-1), state)
            theta = theta + update.view_as(theta)
        if curve is not None:
            curve[t] = loss.cpu()
    return theta


def evaluate(optimizer: LearnedRule | OptimizerFactory, task: Task, steps: int = 100,
             runs: int = 20, seed: int = 0, *, max_batch: int = 32,
             final: str = "train") -> EvalResult:
    """Run ``optimizer`` (a learned rule or a ``torch.optim`` factory, see :func:`baseline`) on
    ``runs`` instances of ``task`` for ``steps`` steps under the authors' protocol (module doc).

    ``final="heldout"`` scores the final parameters on every held-out example
    (:meth:`Task.heldout_loss`) instead of the run's training minibatches."""
    if steps < 1 or runs < 1:
        raise UserError(f"evaluate needs steps >= 1 and runs >= 1, got {steps}, {runs}")
    if final not in ("train", "heldout"):
        raise UserError(f"final must be 'train' or 'heldout', got {final!r}")
    t0 = time.perf_counter()
    seeds = run_seeds(seed, runs)
    finals, curves = [], []
    for lo in range(0, runs, max_batch):
        gens = generators(seeds[lo:lo + max_batch])
        theta = task.init_params(gens)
        plan = task.make_plan(gens)
        curve = torch.empty(steps, theta.shape[0])
        if isinstance(optimizer, LearnedRule):
            theta = run_learned(optimizer, task, theta, plan, steps, curve)
        else:
            theta = theta.clone().requires_grad_(True)
            opt = optimizer([theta])
            for t in range(steps):
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = task.loss(theta, task.batch(plan, t))
                    loss.sum().backward()
                opt.step()
                curve[t] = loss.detach().cpu()
        with torch.no_grad():
            if final == "heldout":
                finals.append(task.heldout_loss(theta.detach(), plan).cpu())
            else:
                total = sum(task.loss(theta.detach(), task.batch(plan, t)) for t in range(steps))
                finals.append((total / steps).cpu())
        curves.append(curve)
    final_losses = torch.cat(finals)
    diverged = int((~torch.isfinite(final_losses)).sum())
    return EvalResult(final_losses, torch.cat(curves, 1), diverged, time.perf_counter() - t0)


def tuning_score(result: EvalResult) -> float:
    """What learning-rate tuning minimises: the mean final loss, or inf if any run diverged (a
    rate that blows up one run in twenty is not one a user could rely on)."""
    return result.final_loss if result.diverged == 0 else math.inf


def tune_lr(make: Callable[[float], OptimizerFactory], task: Task, steps: int, grid: list[float],
            runs: int, seed: int = 1,
            log: Callable[[str], None] | None = None) -> tuple[float, dict[float, EvalResult]]:
    """Grid search: ``make(lr)`` evaluated at every rate of ``grid`` on ``runs`` runs of evaluation
    seed ``seed``; returns the rate with the lowest :func:`tuning_score` (the smaller rate on a
    tie) and every rate's result.  Tune on other seeds than the final evaluation's (the default
    1 vs :func:`evaluate`'s 0) so the winner's reported loss is not the luckiest draw."""
    if not grid:
        raise UserError("tune_lr needs a non-empty learning-rate grid")
    results: dict[float, EvalResult] = {}
    for lr in grid:
        results[lr] = res = evaluate(make(lr), task, steps, runs, seed=seed)
        if log is not None:
            log(f"    lr {lr:.4g}: {res.final_loss:.4f} (diverged {res.diverged}) "
                f"{res.wall_time:.1f}s")
    best = min(sorted(results), key=lambda lr: tuning_score(results[lr]))
    return best, results
