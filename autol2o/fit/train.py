"""One training run: a model, an optimizer, ``steps`` minibatch steps, periodic validation.

Every contender (zoo optimizer, Adam trial, SGD trial, final) trains through :func:`train_run`,
so they see the same things: for a given ``seed`` the same initial weights
(:meth:`Problem.initial`) and the same minibatch sequence (epochs of a permutation drawn from a
``torch.Generator`` seeded with ``seed``).

A run *diverges* when a validation or mean training loss is not finite, or when the validation
loss exceeds ``1000 x`` its initial value; it then stops and is reported as diverged.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from autol2o.errors import UserError
from autol2o.optimizers import LearnedOptimizer, LearnedRule

from .problem import Problem, _one_line, accuracy

BLOWUP = 1000.0

#: Set by the pipeline's SIGINT handler; runs stop at the next step boundary with
#: KeyboardInterrupt.  (An asynchronous KeyboardInterrupt can land inside a finaliser, where
#: Python swallows it; checking a flag from ordinary code cannot be lost.)
STOP = threading.Event()


@dataclass
class OptSpec:
    """What optimizer a run uses: ``kind`` is ``"learned"``, ``"adam"`` or ``"sgd"``."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)   # lr, momentum, nesterov
    rule: LearnedRule | None = None

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        ps = [p for p in model.parameters() if p.requires_grad]
        if self.kind == "learned":
            return LearnedOptimizer(ps, self.rule)
        if self.kind == "adam":
            return torch.optim.Adam(ps, lr=self.params["lr"])
        if self.kind == "sgd":
            mom = self.params.get("momentum", 0.0)
            return torch.optim.SGD(ps, lr=self.params["lr"], momentum=mom,
                                   nesterov=bool(self.params.get("nesterov")) and mom > 0)
        raise ValueError(f"unknown optimizer kind {self.kind!r}")


@dataclass
class RunResult:
    """Outcome of one run; curves are sampled at the validation steps (step 0 included)."""

    name: str
    seed: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)   # mean since the last eval
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float | None] = field(default_factory=list)
    steps_run: int = 0
    diverged: bool = False
    wall_time: float = 0.0
    state: dict[str, Tensor] | None = None     # final weights (CPU) when asked for

    @property
    def final_val_loss(self) -> float:
        return math.inf if self.diverged or not self.val_loss else self.val_loss[-1]

    @property
    def final_val_acc(self) -> float | None:
        return None if self.diverged or not self.val_acc else self.val_acc[-1]

    @property
    def final_train_loss(self) -> float | None:
        return None if self.diverged or not self.train_loss else self.train_loss[-1]

    def steps_to_reach(self, target: float) -> int | None:
        """First validation step whose loss is <= target (None if never)."""
        for s, v in zip(self.steps, self.val_loss):
            if v <= target:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "steps": self.steps,
                "train_loss": self.train_loss, "val_loss": [_finite(v) for v in self.val_loss],
                "val_acc": self.val_acc, "steps_run": self.steps_run, "diverged": self.diverged,
                "wall_time": self.wall_time}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict` (a non-finite validation loss was saved as null)."""
        return cls(d["name"], d["seed"], list(d["steps"]), list(d["train_loss"]),
                   [math.inf if v is None else v for v in d["val_loss"]], list(d["val_acc"]),
                   d["steps_run"], d["diverged"], d["wall_time"])


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem, chunk: int = 2048) -> tuple[float, float | None]:
    """Validation loss (example-weighted mean over chunks) and accuracy for classification."""
    model.eval()
    x, y = problem.data.x_val, problem.data.y_val
    total, correct = 0.0, 0.0
    # accuracy = argmax over class scores; an output that is not (N, classes >= 2) (possible
    # with a custom loss_fn, e.g. one logit for BCE) has no argmax meaning: reported as null
    scored = problem.task == "classification"
    for i in range(0, len(x), chunk):
        out = model(x[i:i + chunk])
        yb = y[i:i + chunk]
        total += float(problem.loss_fn(out, yb)) * len(yb)
        scored = scored and out.ndim == 2 and out.shape[1] >= 2
        if scored:
            correct += float(accuracy(out, yb)) * len(yb)
    model.train()
    acc = correct / len(x) if scored else None
    return total / len(x), acc


@contextmanager
def user_code(problem: Problem) -> Iterator[None]:
    """Errors from the model or its loss mid-run (a batch or validation chunk of a size the
    8-example check did not try, say) are the user's to fix: one line naming MODEL.py."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise _user_error(problem, e) from e


def _user_error(problem: Problem, e: Exception) -> UserError:
    return UserError(f"{problem.model.source}: forward/loss failed during training: {_one_line(e)}")


def default_eval_every(steps: int) -> int:
    """About 20 validation points per run (and pruning decisions for Optuna)."""
    return max(1, steps // 20)


def train_run(problem: Problem, opt: OptSpec, *, steps: int, seed: int, batch_size: int,
              eval_every: int | None = None, on_eval: Callable[[int, float], None] | None = None,
              keep_state: bool = False) -> RunResult:
    """Train a fresh copy of the seed's initial model with ``opt`` for ``steps`` steps.

    ``on_eval(step, val_loss)`` is called after every validation (Optuna reports and prunes
    there; it may raise).  Returns the curves; ``state`` holds the final weights when
    ``keep_state``.

    Randomness inside the model (dropout, noise layers) draws from torch's global generator,
    which is seeded from ``seed`` for the run and restored afterwards: every contender and trial
    with a seed sees the same masks, and a resumed run repeats an uninterrupted one.  (Trials
    run in parallel threads, ``--n-jobs > 1``, share that generator, so their masks interleave.)
    """
    run = Run(problem, opt, seed=seed, batch_size=batch_size,
              eval_every=eval_every or default_eval_every(steps))
    return run.advance(steps, on_eval=on_eval, keep_state=keep_state)


#: the run's model-randomness stream is seed + this, apart from the seed's weight init
MODEL_RNG_OFFSET = 0x5EED


class Run:
    """A run that can pause at any step and continue later (the race's successive halving).

    ``advance(a)`` then ``advance(b)`` reaches the same weights, optimizer state, minibatches
    and model randomness as ``advance(b)`` alone: the run keeps its own generator states and
    swaps them in around each advance.  The pause adds one validation point at step ``a``.
    """

    def __init__(self, problem: Problem, opt: OptSpec, *, seed: int, batch_size: int,
                 eval_every: int):
        self.problem, self.eval_every = problem, eval_every
        dev = torch.device(problem.device)
        self._cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        self.result = res = RunResult(opt.name, seed)
        with torch.random.fork_rng(devices=self._cuda):
            self.model = problem.initial(seed)  # may draw the seed's weights: before seeding
            t0 = time.perf_counter()            # (building the seed's template is not training)
            torch.manual_seed(seed + MODEL_RNG_OFFSET)
            self.model.train()
            self.optimizer = opt.build(self.model)
            with user_code(problem):  # in the run's stream: a model may draw even in eval mode
                v0, a0 = evaluate(self.model, problem)
            self._rng = self._rng_state()
        n = len(problem.data.x_train)
        self._bs = min(batch_size, n)
        self._gen = torch.Generator().manual_seed(seed)
        self._perm, self._pos = torch.randperm(n, generator=self._gen), 0
        self._run_loss = torch.zeros((), device=problem.device)
        self._since = 0
        res.steps.append(0)
        res.train_loss.append(None)
        res.val_loss.append(v0)
        res.val_acc.append(a0)
        self._limit = BLOWUP * abs(v0) if math.isfinite(v0) and v0 != 0 else math.inf
        res.wall_time = time.perf_counter() - t0

    def _rng_state(self) -> list[Tensor]:
        return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in self._cuda]

    def _set_rng_state(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        for d, st in zip(self._cuda, states[1:], strict=True):
            torch.cuda.set_rng_state(st, d)

    def advance(self, steps: int, *, on_eval: Callable[[int, float], None] | None = None,
                keep_state: bool = False) -> RunResult:
        """Train on to step ``steps`` (validating every ``eval_every`` steps and at the end)."""
        with torch.random.fork_rng(devices=self._cuda):
            self._set_rng_state(self._rng)
            try:
                return self._advance(steps, on_eval, keep_state)
            finally:
                self._rng = self._rng_state()

    def _advance(self, steps: int, on_eval: Callable[[int, float], None] | None,
                 keep_state: bool) -> RunResult:
        problem, model, optimizer, res = self.problem, self.model, self.optimizer, self.result
        if res.diverged:  # a diverged run stays where it stopped
            return res
        t0 = time.perf_counter()
        x, y = problem.data.x_train, problem.data.y_train
        n, bs = len(x), self._bs
        try:
            for step in range(res.steps_run + 1, steps + 1):
                if STOP.is_set():
                    raise KeyboardInterrupt
                if self._pos + bs > n:  # next epoch: a fresh permutation (drop the ragged tail)
                    self._perm, self._pos = torch.randperm(n, generator=self._gen), 0
                idx = self._perm[self._pos:self._pos + bs].to(problem.device)
                self._pos += bs
                optimizer.zero_grad(set_to_none=True)
                try:  # inline, not user_code(): no generator per step on the hot path
                    loss = problem.loss_fn(model(x[idx]), y[idx])
                    loss.backward()
                except UserError:
                    raise
                except Exception as e:
                    raise _user_error(problem, e) from e
                optimizer.step()
                self._run_loss += loss.detach()
                self._since += 1
                res.steps_run = step
                if step % self.eval_every == 0 or step == steps:
                    train_mean = float(self._run_loss) / self._since
                    self._run_loss.zero_()
                    self._since = 0
                    with user_code(problem):
                        v, a = evaluate(model, problem)
                    res.steps.append(step)
                    res.train_loss.append(train_mean if math.isfinite(train_mean) else None)
                    res.val_loss.append(v if math.isfinite(v) else math.inf)
                    res.val_acc.append(a)
                    if not (math.isfinite(v) and math.isfinite(train_mean)) or v > self._limit:
                        res.diverged = True
                        break
                    if on_eval is not None:
                        res.wall_time += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        on_eval(step, v)
        finally:
            res.wall_time += time.perf_counter() - t0
        if keep_state and not res.diverged:
            res.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return res
