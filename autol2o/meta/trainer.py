"""Meta-training: truncated backpropagation through time over batched optimizee runs.

One *run* optimizes B fresh instances of a task for ``horizon`` steps with the learned rule.
Every ``unroll`` = T steps the run is cut: the meta-loss of those T steps is backpropagated into
the rule's meta-weights (one *meta-iteration*, one Adam step), then parameters and rule state are
detached and the run goes on.  With theta_{t+1} = theta_t + rule(g_t, s_t):

    "last" (RNNprop):  L = f(theta_{t0+T})                 (loss at the last step of the unroll)
    "mean" (DM):       L = (1/T) sum_{k=1..T} f(theta_{t0+k})

averaged over the B instances.  Both score the parameters *after* each update, so every update
of a segment gets a meta-gradient; the RNNprop authors' code scores the loss before each update
(f(theta_{t0+T-1}) for "last"), where a segment's final update gets none.  Gradients g_t are
computed without a graph (second derivatives dropped, as in both papers): the meta-gradient then
treats every g_t as a constant, ignoring that an update changes the gradients that follow.
``second_order=True`` keeps that path (g_t = grad f(theta_t) with ``create_graph``, so
Hessian-vector products flow back through the segment): the exact gradient of the segment's
meta-loss (a whole 100-step MNIST unroll took ~5 s either way on the development CPU).
Tricks (Lv et al. 2017):

* random scaling: per run and coordinate c = exp(U(-r, r)); the optimizee is f(c * theta) started
  from theta0 / c (same values, gradient scales spread over e^{2r});
* convex combination: append k = 20 parameters x (start 0) and add
  mean(clip((c_x * x - a)^2, 0, 10)) with a ~ U(-1, 1)^k and c_x = exp(U(-1, 1)) per run.

Determinism: every random draw comes from a generator seeded from ``config.seed`` (the run
sampler) or from per-instance seeds, all saved in checkpoints, so ``resume=True`` after a kill
continues bit-for-bit like an uninterrupted run (``iterations`` may be raised on resume, except
under a cosine schedule, whose shape depends on it).  Under ``torchrun`` each rank runs its own
instances (sampler seed offset by rank) and meta-gradients are averaged with ``all_reduce``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError
from ..optimizers.base import LearnedRule, State
from .evaluate import evaluate, loss_and_grad
from .tasks import HELDOUT_DEFAULT, Task, convex_term, generators, mix_seed

CHECKPOINT = "checkpoint.pt"


def paper_recipe(rule_name: str) -> dict[str, Any]:
    """The :class:`TrainConfig` fields that depend on the rule in its paper's setup.

    RNNprop (Lv et al. 2017) is trained on the loss at the last step of each unroll, with both
    tricks (random scaling r = 3 and the convex term); DMoptimizer (Andrychowicz et al. 2016) on
    the mean loss over the unroll, with neither.  ``zoo train`` and ``meta.launch`` default to
    this; fine-tuning in ``autol2o fit`` takes the meta-loss from it."""
    paper = rule_name == "rnnprop"
    return {"meta_loss": "mean" if rule_name == "dm" else "last",
            "random_scaling": 3.0 if paper else 0.0, "convex_combination": paper}


@dataclass
class TrainConfig:
    """Meta-training hyperparameters: the paper's horizon, unroll and meta-optimizer.  The fields
    that depend on the rule (meta-loss, tricks) default to off / "last": see :func:`paper_recipe`."""

    horizon: int = 100            #: optimizee steps per run
    unroll: int = 20              #: steps per truncated-BPTT segment (one meta-update)
    iterations: int = 1000        #: meta-updates in total
    meta_lr: float = 1e-4         #: Adam learning rate on the meta-weights
    #: "constant", or "cosine": lr_i = meta_lr * (1 + cos(pi * i / iterations)) / 2, which lets a
    #: long run (or a warm start from a zoo entry) settle instead of hovering at the noise floor
    lr_schedule: str = "constant"
    #: linear warmup over the first iterations: a warm start (``--init``) with a fresh Adam state
    #: otherwise takes full-size, sign-like first steps on every meta-weight and loses ground
    warmup: int = 0
    #: Polyak averaging of the meta-weights: after every update w_avg <- ema * w_avg +
    #: (1 - ema) * w (w_avg starts at the initial weights); validation, the best checkpoint and
    #: the result use w_avg.  Meant for noisy iterates (one optimizee run per update makes
    #: validation swing by ~10%): if they wander around a good point, their mean sits nearer to
    #: it.  On MNIST it did not stop the drift (benchmarks/README.md).  0: off
    ema: float = 0.0
    batch: int = 8                #: optimizee instances per run (B), served by one rule call
    meta_loss: str = "last"       #: "last" (RNNprop) or "mean" (DMoptimizer)
    #: examples the meta-loss is scored on, drawn apart from the training minibatches (0: the
    #: step's own minibatch, as in both papers).  With second derivatives dropped the
    #: meta-gradient is d f / d theta_T at the scored step pushed back through the updates, so
    #: scoring on a 128-example minibatch feeds its sampling noise straight into the
    #: meta-gradient; a large batch (e.g. 2048) removes most of it for one extra
    #: forward/backward of the optimizee per scored step.  The optimizee still trains on its
    #: minibatches.  Tasks without sampled data (the quadratic) ignore it
    meta_batch_size: int = 0
    #: what the meta-loss is scored on: "train" (the training split, as in both papers: the rule
    #: learns to minimise the training loss fast) or "heldout" (examples the optimizee does not
    #: train on: the first half of the dataset's test split, fresh sin-LSTM waves, or a
    #: ModuleTask's per-run held-out part: the rule learns to minimise the loss on unseen
    #: examples, which is what ``autol2o fit`` selects and reports on; a rule that drives the
    #: training loss to 0 overfits small datasets).  With "heldout", ``meta_batch_size`` examples
    #: (0: tasks.HELDOUT_DEFAULT, or all if there are fewer) are scored per instance, and
    #: validation scores the held-out loss at the final parameters on other held-out examples
    #: (the test split's second half; fresh waves; the validation runs' own held-out parts)
    meta_data: str = "train"
    #: meta-train on log(loss) instead of the loss: with several tasks, one whose loss is 50x
    #: larger (an MLP's cross-entropy beside a regression's MSE) otherwise dominates the
    #: meta-gradient; on the log scale every task's *relative* progress weighs the same
    log_loss: bool = False
    #: meta-train on loss / (the run's loss at step 0 on its first minibatch, a constant): like
    #: ``log_loss`` every task's relative progress weighs alike, but bounded: d log L = dL / L
    #: grows without limit as one task's loss nears 0 (a digits CNN reaching 1e-3 outweighs the
    #: rest 1000-fold, and multi-task training with ``log_loss`` derailed), 1 / L_0 is fixed
    relative_loss: bool = False
    #: keep second derivatives: the exact meta-gradient of each segment (the first-order one
    #: the papers use is biased, since each g_t depends on the earlier updates; see module doc)
    second_order: bool = False
    random_scaling: float = 0.0   #: r of the random scaling trick; 0 disables it (paper: 3)
    convex_combination: bool = False  #: add the convex-combination term
    convex_dim: int = 20          #: extra parameters of the convex term
    grad_clip: float | None = None    #: max global norm of the meta-gradient (None: no clipping)
    #: curriculum over horizons: ``(from_iteration, horizon)`` pairs (a new run uses the last
    #: pair that has started; before the first, ``horizon``), or plain horizons ``[h1, h2, ...]``
    #: given equal iteration shares.  A stage shorter than ``unroll`` is unrolled whole.
    curriculum: tuple[tuple[int, int], ...] | list[int] | None = ()
    seed: int = 0
    validate_every: int = 0       #: meta-iterations between validations (0: never)
    val_runs: int = 8
    #: optimizee steps of a validation run (default: the longest horizon, so that every
    #: validation of a curriculum run, and of the starting weights, is the same measurement)
    val_steps: int | None = None
    val_seed: int = 10_000        #: same validation instances every time
    checkpoint_every: int = 0     #: meta-iterations between checkpoints (0: only at the end)

    def __post_init__(self):
        # messages name the command-line option: ``zoo train`` and ``meta.launch`` share them
        if self.meta_loss not in ("last", "mean"):
            raise UserError(f"meta_loss must be 'last' or 'mean', got {self.meta_loss!r}")
        if self.meta_data not in ("train", "heldout"):
            raise UserError(f"--meta-data must be 'train' or 'heldout', got {self.meta_data!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name, low in (("horizon", 1), ("unroll", 1), ("iterations", 1), ("batch", 1),
                          ("val_runs", 1), ("warmup", 0), ("validate_every", 0),
                          ("checkpoint_every", 0), ("meta_batch_size", 0)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, "
                                f"got {getattr(self, name)}")
        if self.log_loss and self.relative_loss:
            raise UserError("--log-loss and --relative-loss exclude each other (pick one scale)")
        if self.val_steps is not None and self.val_steps < 1:
            raise UserError(f"val_steps must be >= 1, got {self.val_steps}")
        if not (math.isfinite(self.meta_lr) and self.meta_lr > 0):  # Adam takes nan silently
            raise UserError(f"--meta-lr must be a finite number > 0, got {self.meta_lr}")
        if not (math.isfinite(self.random_scaling) and self.random_scaling >= 0):
            raise UserError(f"--random-scaling must be a finite number >= 0, "
                            f"got {self.random_scaling}")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--ema must lie in [0, 1), got {self.ema}")
        if self.convex_combination and self.convex_dim < 1:  # 0 would silently drop the term
            raise UserError(f"convex_dim must be >= 1 with convex_combination, "
                            f"got {self.convex_dim}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 (or None), got {self.grad_clip}")
        cur = list(self.curriculum or ())
        if cur and all(isinstance(h, int) for h in cur):
            cur = even_stages(cur, self.iterations)
        self.curriculum = tuple((int(a), int(b)) for a, b in cur)
        self._check_curriculum()

    def _check_curriculum(self) -> None:
        starts = [a for a, _ in self.curriculum]
        for a, h in self.curriculum:
            if h < 1 or a < 0:
                raise UserError(f"--curriculum: stage {a}:{h} needs an iteration >= 0 and a "
                                "horizon >= 1")
            if a >= self.iterations:  # a stage that never runs is a typo, not a plan
                raise UserError(f"--curriculum: stage {a}:{h} starts at or after --iterations "
                                f"{self.iterations}, so it never runs")
            if starts.count(a) > 1:
                raise UserError(f"--curriculum: two stages start at iteration {a}")
        # a curriculum stage shorter than the unroll is unrolled whole (one meta-update per
        # run: deliberate in a curriculum that starts short); an unroll no run reaches is a typo
        used = [h for _, h in self.curriculum]
        if not self.curriculum or min(starts) > 0:  # ``horizon`` runs before the first stage
            used.append(self.horizon)
        longest = max(used)
        if self.unroll > longest:
            raise UserError(f"--unroll {self.unroll} must be <= the horizon ({longest})")

    def horizon_at(self, iteration: int) -> int:
        h = self.horizon
        for start, hor in self.curriculum:
            if iteration >= start:
                h = hor
        return h

    @property
    def max_horizon(self) -> int:
        return max([self.horizon] + [h for _, h in self.curriculum])

    @property
    def validation_steps(self) -> int:
        return self.val_steps or self.max_horizon

    def lr_at(self, iteration: int) -> float:
        """Meta learning rate for the update made at ``iteration`` (0-based)."""
        lr = self.meta_lr
        if self.lr_schedule == "cosine" and self.iterations > 0:
            lr *= 0.5 * (1.0 + math.cos(math.pi * iteration / self.iterations))
        if iteration < self.warmup:
            lr *= (iteration + 1) / (self.warmup + 1)
        return lr

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curriculum"] = [list(p) for p in self.curriculum]
        return d


def even_stages(horizons: list[int], iterations: int) -> list[tuple[int, int]]:
    """Bare curriculum horizons as ``(from_iteration, horizon)`` pairs with equal shares of the
    iterations: stage i starts at ``i * iterations // len(horizons)`` (``zoo train`` uses it too,
    so the CLI and the Python API lay a curriculum out alike)."""
    return [(i * iterations // len(horizons), h) for i, h in enumerate(horizons)]


@dataclass
class MetaTrainResult:
    rule: LearnedRule             #: best meta-weights by validation, the starting ones included
                                  #: (the final ones without validation); with ``config.ema``
                                  #: the averaged weights throughout
    history: list[dict[str, Any]]
    diverged: int                 #: runs dropped because the loss or meta-gradient was not finite
                                  #: (under ``torchrun``: on all ranks together)
    wall_time: float
    card_fields: dict[str, Any] = field(default_factory=dict)
    best_val: float | None = None
    best_iteration: int | None = None


class Objective:
    """A task with the tricks applied, for one run of B instances (see module docstring)."""

    def __init__(self, task: Task, gens: list[torch.Generator], config: TrainConfig):
        self.task, self.n_task = task, task.n_params
        dev = task.device
        r = config.random_scaling
        self.scale = None
        if r > 0:
            self.scale = torch.stack([torch.exp((torch.rand(self.n_task, generator=g) * 2 - 1) * r)
                                      for g in gens]).to(dev)
        self.k = config.convex_dim if config.convex_combination else 0
        if self.k:
            self.a = torch.stack([torch.rand(self.k, generator=g) * 2 - 1 for g in gens]).to(dev)
            self.c_x = torch.stack([torch.exp(torch.rand(self.k, generator=g) * 2 - 1)
                                    for g in gens]).to(dev)
        self.n_params = self.n_task + self.k

    def initial(self, theta0: Tensor) -> Tensor:
        theta = theta0 / self.scale if self.scale is not None else theta0
        if self.k:
            theta = torch.cat((theta, theta.new_zeros(theta.shape[0], self.k)), 1)
        return theta

    def loss(self, theta: Tensor, batch: Any) -> Tensor:
        th = theta[:, :self.n_task] if self.k else theta
        if self.scale is not None:
            th = th * self.scale
        loss = self.task.loss(th, batch)
        if self.k:
            loss = loss + convex_term(self.c_x * theta[:, self.n_task:], self.a)
        return loss


class _Run:
    """An optimizee run in progress: B instances of one task, their rule state and position."""

    def __init__(self, tasks: list[Task], rule: LearnedRule, config: TrainConfig,
                 task_index: int, seeds: list[int], horizon: int):
        self.task_index, self.seeds, self.horizon = task_index, seeds, horizon
        task = tasks[task_index]
        gens = generators(seeds)
        theta0 = task.init_params(gens)
        self.plan = task.make_plan(gens)
        self.objective = Objective(task, gens, config)
        self.task = task
        self.theta = self.objective.initial(theta0)
        self.state: State = rule.init_state(self.theta.numel(), device=self.theta.device,
                                            dtype=self.theta.dtype)
        self.t = 0
        self.loss, self.grad = loss_and_grad(self.objective.loss, self.theta,
                                             task.batch(self.plan, 0))
        self.loss0 = self.loss  # (B,) detached; restore() rebuilds it from the same seeds

    def snapshot(self) -> dict[str, Any]:
        return {"task_index": self.task_index, "seeds": list(self.seeds),
                "horizon": self.horizon, "t": self.t, "theta": self.theta.cpu(),
                "state": {k: v.cpu() for k, v in self.state.items()},
                "loss": self.loss.cpu(), "grad": self.grad.cpu()}

    @classmethod
    def restore(cls, snap, tasks, rule, config) -> _Run:
        run = cls(tasks, rule, config, snap["task_index"], snap["seeds"], snap["horizon"])
        dev = run.theta.device
        run.t = snap["t"]
        run.theta, run.loss, run.grad = (snap[k].to(dev) for k in ("theta", "loss", "grad"))
        run.state = {k: v.to(dev) for k, v in snap["state"].items()}
        return run

    @property
    def done(self) -> bool:
        return self.t >= self.horizon

    def unroll(self, rule: LearnedRule, steps: int, meta_loss: str,
               meta_batch_size: int = 0, meta_data: str = "train",
               second_order: bool = False) -> Tensor:
        """Advance ``steps`` optimizee steps with a graph to the meta-weights; return the
        per-instance meta-loss ``(B,)``, scored on the step's minibatch or, with
        ``meta_batch_size``, on a separate batch of that many training examples, or with
        ``meta_data="heldout"`` on held-out examples.  With ``second_order`` every gradient
        fed to the rule inside the segment keeps its graph to theta_t (module doc).  The run's
        tensors are left detached."""
        theta, state, grad = self.theta, self.state, self.grad
        terms = []
        for i in range(steps):
            update, state = rule(grad.reshape(-1), state)
            theta = theta + update.view_as(theta)
            self.t += 1
            batch = self.task.batch(self.plan, self.t)
            if meta_loss == "mean" or i == steps - 1:
                loss = self.objective.loss(theta, batch)
                # d loss / d theta only (not through the rule): the gradient fed to the rule;
                # second order keeps its graph where a later step of this segment uses it
                (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True,
                                              create_graph=second_order and i < steps - 1)
                if meta_data == "heldout":
                    size = meta_batch_size or HELDOUT_DEFAULT  # bounded: see HELDOUT_DEFAULT
                    terms.append(self.objective.loss(
                        theta, self.task.heldout_batch(self.plan, self.t, size)))
                elif meta_batch_size:
                    terms.append(self.objective.loss(
                        theta, self.task.meta_batch(self.plan, self.t, meta_batch_size)))
                else:
                    terms.append(loss)
            elif second_order:
                loss = self.objective.loss(theta, batch)
                (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=True)
            else:
                loss, grad = loss_and_grad(self.objective.loss, theta, batch)
        self.theta = theta.detach()
        self.state = {k: v.detach() for k, v in state.items()}
        self.grad, self.loss = grad.detach(), loss.detach()
        return terms[-1] if meta_loss == "last" else torch.stack(terms).mean(0)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    # the GPUs' generators too (a user model with dropout on CUDA draws from them), once in use
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *[float(v) if isinstance(v, float) else int(v) for v in np_state[2:]]]}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))


def hardware_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info = {"torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync_grads(rule: LearnedRule, ok: bool, world: int) -> int:
    """Average meta-gradients over ranks that produced a finite one; returns how many did."""
    params = [p for p in rule.parameters()]
    if world == 1:
        return int(ok)
    flat = torch.cat([(p.grad if ok and p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params] + [torch.ones(1, device=params[0].device) * float(ok)])
    dist.all_reduce(flat)
    count = round(float(flat[-1]))
    if count == 0:
        return 0
    pos = 0
    for p in params:
        n = p.numel()
        p.grad = (flat[pos:pos + n] / count).view_as(p).clone()
        pos += n
    return count


def _validate(rule: LearnedRule, val_tasks: list[Task], config: TrainConfig) -> float:
    """Validation score: the geometric mean over tasks of each task's mean final loss.

    With one task that is its loss.  Across tasks, losses live on unrelated scales (an MLP's
    cross-entropy near 2, a regression MSE near 0.01); an arithmetic mean would let the largest
    decide the best checkpoint alone, whereas a geometric mean weighs every task's *relative*
    improvement equally.  A validation run that diverges (NaN/inf) makes the score inf, never
    the best: ``final_loss`` averages only the runs that stayed finite, so weights that blow up
    on 7 of 8 runs would otherwise be scored, and maybe kept, on the one survivor."""
    losses = []
    for t in val_tasks:
        res = evaluate(rule, t, config.validation_steps, config.val_runs, config.val_seed,
                       final=config.meta_data)
        if res.diverged:
            return math.inf
        losses.append(res.final_loss)
    return float(np.exp(np.mean(np.log(np.maximum(losses, 1e-30)))))


def meta_train(rule: LearnedRule, tasks: Task | list[Task], config: TrainConfig, *,
               device: torch.device | str = "cpu", checkpoint_dir: Path | None = None,
               resume: bool = False, progress: bool = True,
               val_tasks: list[Task] | None = None) -> MetaTrainResult:
    """Meta-train ``rule`` in place on ``tasks`` (see module docstring).

    Returns the best meta-weights by validation (``val_tasks``, default: the training tasks on
    held-out instance seeds, every validation ``config.validation_steps`` long) when
    ``config.validate_every > 0``, else the final ones.  The starting weights are validated too
    and are a candidate (iteration 0), so a warm start never comes back worse on validation.  With
    ``checkpoint_dir``, a checkpoint is written every ``config.checkpoint_every`` iterations and at
    the end (rank 0 only); ``resume=True`` continues from it exactly (or starts fresh if there
    is none), refusing a checkpoint made with other tasks, data, rule or settings.
    """
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if not tasks:
        raise UserError("meta_train needs at least one task")
    device = torch.device(device)
    rank, world = _world()
    rule.to(device)
    for t in tasks:
        t.to(device)
    val_tasks = [t.to(device) for t in (val_tasks if val_tasks is not None else tasks)]
    if world > 1:  # every rank starts from rank 0's meta-weights
        for p in rule.parameters():
            dist.broadcast(p.data, 0)
    meta_opt = torch.optim.Adam(rule.parameters(), lr=config.meta_lr)
    # the averaged weights (config.ema > 0): what is validated, kept as best and returned
    averaged = copy.deepcopy(rule).requires_grad_(False) if config.ema else rule
    sampler = torch.Generator().manual_seed(mix_seed(config.seed, 0x5A3, rank))
    iteration, diverged, elapsed = 0, 0, 0.0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val": None, "iteration": None, "weights": None}
    run: _Run | None = None

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    # what the run trains, saved with every checkpoint so that a resume cannot swap it
    ident = _identity(rule, tasks, val_tasks) if ckpt_path is not None else {}
    if resume and ckpt_path is not None and ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
            raise UserError(f"{ckpt_path}: cannot load checkpoint ({exc})") from None
        _check_resume(ck, ckpt_path, config, ident, world)
        rule.load_state_dict(ck["rule"])
        if config.ema:
            averaged.load_state_dict(ck["averaged"])
        meta_opt.load_state_dict(ck["meta_opt"])
        sampler.set_state(ck["sampler"][rank])
        iteration, diverged, elapsed = ck["iteration"], ck["diverged"], ck["wall_time"]
        history = list(ck["history"])
        best = dict(ck["best"])
        if ck["runs"][rank] is not None:
            run = _Run.restore(ck["runs"][rank], tasks, rule, config)
        _set_rng_states(ck["rng"])

    def save_checkpoint() -> None:
        snaps = [run.snapshot() if run is not None else None]
        states = [sampler.get_state()]
        if world > 1:  # rank 0 needs every rank's run and sampler to resume them all
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (snaps[0], states[0]))
            snaps, states = [g[0] for g in gathered], [g[1] for g in gathered]
        if rank != 0 or ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        extra = {"averaged": averaged.state_dict()} if config.ema else {}
        torch.save({**ident, **extra, "config": config.to_dict(), "rule": rule.state_dict(),
                    "meta_opt": meta_opt.state_dict(), "sampler": states, "runs": snaps,
                    "iteration": iteration, "diverged": diverged,
                    "wall_time": elapsed + time.perf_counter() - t_start, "history": history,
                    "best": best, "rng": _rng_states()}, tmp)
        os.replace(tmp, ckpt_path)  # atomic: a kill mid-write leaves the previous checkpoint

    t_start = time.perf_counter()
    if config.validate_every and iteration == 0 and best["val"] is None:
        # the starting weights are a candidate too: a warm start (``zoo train --init``) must
        # never come back worse than it went in
        val = _validate(averaged, val_tasks, config)
        if math.isfinite(val):
            best = {"val": val, "iteration": 0, "initial": val,
                    "weights": {k: v.detach().cpu().clone()
                                for k, v in averaged.state_dict().items()}}
    bar = _progress(progress and rank == 0, config.iterations, iteration)
    val_txt = "-" if best["val"] is None else (
        f"{best['val']:.4g}" + (" (initial)" if best["iteration"] == 0 else ""))
    try:
        while iteration < config.iterations:
            if run is None or run.done:
                task_index = int(torch.randint(len(tasks), (), generator=sampler))
                seeds = torch.randint(0, 2**62, (config.batch,), generator=sampler).tolist()
                run = _Run(tasks, rule, config, task_index, seeds, config.horizon_at(iteration))
            steps, horizon = min(config.unroll, run.horizon - run.t), run.horizon
            meta_opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                per_instance = _unroll(run, rule, steps, config)
                if config.log_loss:
                    per_instance = per_instance.clamp_min(1e-30).log()
                elif config.relative_loss:
                    per_instance = per_instance / run.loss0.clamp_min(1e-30)
                meta_loss = per_instance.mean()
                ok = bool(torch.isfinite(meta_loss))
                if ok:
                    meta_loss.backward()
                    ok = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                             for p in rule.parameters())
            if not ok:  # diverged: drop this run (not fatal)
                run = None
            n_ok = _sync_grads(rule, ok, world)
            diverged += world - n_ok  # every rank's dropped runs, so that all ranks agree
            if n_ok:
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(rule.parameters(), config.grad_clip)
                for group in meta_opt.param_groups:
                    group["lr"] = config.lr_at(iteration)
                meta_opt.step()
                if config.ema:
                    with torch.no_grad():
                        for avg, w in zip(averaged.parameters(), rule.parameters(), strict=True):
                            avg.lerp_(w, 1.0 - config.ema)
            iteration += 1
            record = {"iteration": iteration, "meta_loss": float(meta_loss.detach()) if ok else None,
                      "horizon": horizon, "diverged": diverged}
            if config.validate_every and (iteration % config.validate_every == 0
                                          or iteration == config.iterations):
                val = _validate(averaged, val_tasks, config)
                record["val_loss"] = val
                if math.isfinite(val) and (best["val"] is None or val < best["val"]):
                    best = {"val": val, "iteration": iteration, "initial": best.get("initial"),
                            "weights": {k: v.detach().cpu().clone()
                                        for k, v in averaged.state_dict().items()}}
                val_txt = (f"{val:.4g} (best {best['val']:.4g})" if best["val"] is not None
                           else f"{val:.4g}")
            history.append(record)
            if bar is not None:
                loss_txt = f"{record['meta_loss']:.4g}" if ok else "diverged"
                bar[0].update(bar[1], advance=1, meta=loss_txt, val=val_txt)
            if config.checkpoint_every and iteration % config.checkpoint_every == 0:
                save_checkpoint()
        if checkpoint_dir is not None:
            save_checkpoint()
    finally:
        if bar is not None:
            bar[0].stop()

    wall = elapsed + time.perf_counter() - t_start
    best_rule = copy.deepcopy(averaged).requires_grad_(True)
    if best["weights"] is not None:
        best_rule.load_state_dict(best["weights"])
    # a diverged validation scores inf, which strict JSON (the card) cannot hold: null there
    vals = [h["val_loss"] if math.isfinite(h["val_loss"]) else None
            for h in history if "val_loss" in h]
    card = {
        "rule_config": rule.config(), "tasks": [t.spec for t in tasks],
        "tricks": {"random_scaling": config.random_scaling,
                   "convex_combination": config.convex_combination,
                   "convex_dim": config.convex_dim if config.convex_combination else 0},
        "training": {
            "horizon": config.horizon, "unroll": config.unroll,
            "curriculum": [list(p) for p in config.curriculum],
            "max_horizon": config.max_horizon,
            "meta_iterations": iteration, "meta_loss": config.meta_loss,
            "log_loss": config.log_loss, "relative_loss": config.relative_loss,
            "second_order": config.second_order,
            "meta_optimizer": "adam", "meta_lr": config.meta_lr,
            "lr_schedule": config.lr_schedule, "warmup": config.warmup, "ema": config.ema,
            "grad_clip": config.grad_clip,
            "batch": config.batch, "world_size": world, "seed": config.seed,
            "diverged": diverged, "config": config.to_dict()},
        "validation": {"tasks": [t.spec for t in val_tasks], "every": config.validate_every,
                       "runs": config.val_runs, "steps": config.validation_steps,
                       "seed": config.val_seed, "best_val_loss": best["val"],
                       "best_iteration": best["iteration"],
                       "initial_val_loss": best.get("initial"),
                       "first_val_loss": vals[0] if vals else None,
                       "last_val_loss": vals[-1] if vals else None},
        "wall_time_s": round(wall, 1), "hardware": hardware_info(device),
    }
    return MetaTrainResult(best_rule, history, diverged, wall, card, best["val"],
                           best["iteration"])


#: config fields that may change between a checkpoint and its resumption (not validate_every,
#: val_*: they define which weights are "best", and the best so far is in the checkpoint)
_RESUMABLE = {"iterations", "checkpoint_every"}


def _identity(rule: LearnedRule, tasks: list[Task], val_tasks: list[Task]) -> dict[str, Any]:
    """The rule, tasks and training data a checkpoint was made with (see :func:`_check_resume`)."""
    return {"rule_config": rule.config(), "tasks": [t.spec for t in tasks],
            "val_tasks": [t.spec for t in val_tasks], "data": [_data_id(t) for t in tasks]}


def _data_id(task: Task) -> str | None:
    """Fingerprint of a task's dataset.  The spec names the dataset but ``--data-dir`` picks the
    files, which may move between machines; what must not change on resume is their content."""
    tensors = [getattr(task, k, None) for k in ("x", "y")]
    if not all(isinstance(t, Tensor) for t in tensors):
        return None  # generated data (quadratic, sin-lstm): fixed by the spec
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())  # any dtype
    return h.hexdigest()[:16]


def _check_resume(ck: dict[str, Any], path: Path, config: TrainConfig, ident: dict[str, Any],
                  world: int) -> None:
    """Refuse to resume checkpoint ``ck`` with anything that would make the result a mix of two
    runs.  Fields missing from older checkpoints are not checked."""
    def names(specs: list[dict[str, Any]]) -> str:
        return ", ".join(str(s.get("name", s.get("kind"))) for s in specs)

    for key, label in (("tasks", "tasks"), ("val_tasks", "validation tasks")):
        if key in ck and ck[key] != ident[key]:
            was, now = names(ck[key]), names(ident[key])
            if was == now:  # same names, other settings: show them
                was, now = ck[key], ident[key]
            raise UserError(f"{path}: checkpoint was made with {label} {was}; got {now}")
    if "rule_config" in ck and ck["rule_config"] != ident["rule_config"]:
        was, now = ck["rule_config"], ident["rule_config"]
        if was.get("rule") != now.get("rule"):  # another rule: its name says enough
            was, now = was.get("rule"), now.get("rule")
        raise UserError(f"{path}: checkpoint was made with rule {was}; got {now}")
    for spec, was, now in zip(ck.get("tasks", []), ck.get("data", []), ident["data"]):
        if was != now:
            raise UserError(f"{path}: task {spec.get('name')}'s training data differs from the "
                            "checkpoint's (another --data-dir?)")
    # checkpoints from before a config field existed hold its default
    saved_cfg = {**TrainConfig().to_dict(), **ck["config"]}
    saved = {k: v for k, v in saved_cfg.items() if k not in _RESUMABLE}
    now_cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}
    if config.lr_schedule == "cosine" and saved_cfg["iterations"] != config.iterations:
        raise UserError(f"{path}: a cosine schedule is laid out over its iterations "
                        f"({saved_cfg['iterations']}); resuming with {config.iterations} "
                        "would jump the learning rate; use a new checkpoint directory")
    if saved != now_cfg:
        diff = ", ".join(f"{k} {saved.get(k)} -> {now_cfg[k]}" for k in sorted(now_cfg)
                         if saved.get(k) != now_cfg[k])
        raise UserError(f"{path}: checkpoint was made with a different config ({diff}); resume "
                        "with the same settings or use a new checkpoint directory")
    if config.iterations < ck["iteration"]:
        raise UserError(f"{path}: checkpoint is at iteration {ck['iteration']}; --iterations "
                        f"{config.iterations} is below it")
    if len(ck["sampler"]) != world:
        raise UserError(f"{path}: checkpoint was made with {len(ck['sampler'])} "
                        f"process(es), this run has {world}")


def _unroll(run: _Run, rule: LearnedRule, steps: int, config: TrainConfig) -> Tensor:
    """One truncated-BPTT segment (a module-level hook so tests can simulate a kill)."""
    return run.unroll(rule, steps, config.meta_loss, config.meta_batch_size, config.meta_data,
                      config.second_order)


class _LogLines:
    """Progress for a non-terminal stderr (``nohup ... > log``), where a live bar would print
    nothing until the end: one plain line every ``every`` iterations and at the last one."""

    def __init__(self, total: int, done: int, every: int):
        self.total, self.done, self.every = total, done, every
        self.t0 = time.perf_counter()

    def update(self, _task: int, advance: int, meta: str, val: str) -> None:
        self.done += advance
        if self.done % self.every == 0 or self.done == self.total:
            import sys

            print(f"meta-train {self.done}/{self.total} meta-loss {meta} val {val} "
                  f"{time.perf_counter() - self.t0:.0f}s", file=sys.stderr, flush=True)

    def stop(self) -> None:
        pass


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.console import Console

    if not Console(stderr=True).is_terminal:
        return _LogLines(total, done, every=max(1, min(50, total // 20))), 0
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("meta-train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("meta-loss {task.fields[meta]}"),
                    TextColumn("val {task.fields[val]}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))
    prog.start()
    task_id = prog.add_task("meta", total=total, completed=done, meta="-", val="-")
    return prog, task_id
