"""Optimizee tasks: a model, a data sampler and a loss, evaluated for B instances at once.

Every task works on *flat, batched* parameters ``theta`` of shape ``(B, n)``: row b is one
optimizee instance.  Because the learned rules are coordinatewise, the B rows simply concatenate
into one ``(B * n,)`` vector for a single rule call.  The contract::

    gens  = [torch.Generator().manual_seed(s) for s in instance_seeds]   # one per instance
    theta = task.init_params(gens)          # (B, n), fresh random init per instance
    plan  = task.make_plan(gens)            # per-run problem data (minibatch seeds, a quadratic...)
    batch = task.batch(plan, t)             # minibatch for step t (same t -> same minibatch)
    loss  = task.loss(theta, batch)         # (B,), instance b depends only on theta[b]

Instance b's init, problem and minibatches depend only on its own seed, so running B instances
together gives the same numbers as running them one at a time, and two optimizers given the same
seeds see identical inits and minibatches (the authors' evaluation protocol).

Tasks are described by a JSON-able ``spec`` dict; :func:`build_task` rebuilds a task from it or
from a preset name such as ``"mnist-nn-sigmoid"``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .data import load_dataset

Layout = list[tuple[str, tuple[int, ...]]]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid, "relu": F.relu, "elu": F.elu, "tanh": torch.tanh,
}


def mix_seed(seed: int, *keys: int) -> int:
    """Deterministic 63-bit seed from a seed and integer keys (a splitmix64-style hash)."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    for k in keys:
        x = (x ^ (k + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per optimizee instance."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def layout_size(layout: Layout) -> int:
    return sum(math.prod(shape) for _, shape in layout)


def unflatten(theta: Tensor, layout: Layout) -> dict[str, Tensor]:
    """Views ``(B, *shape)`` of the flat batched parameters, in layout order (no copies)."""
    out, pos = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = theta[:, pos:pos + size].reshape(theta.shape[0], *shape)
        pos += size
    return out


class Task:
    """Base class: see the module docstring for the batched contract."""

    kind: str = ""

    def __init__(self, spec: dict[str, Any], n_params: int, device: torch.device | str = "cpu"):
        self.spec = spec
        self.n_params = n_params
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return str(self.spec.get("name", self.kind))

    def init_params(self, gens: list[torch.Generator]) -> Tensor:
        raise NotImplementedError

    def make_plan(self, gens: list[torch.Generator]) -> Any:
        """Per-run data; default: one minibatch seed per instance (minibatches drawn lazily)."""
        return [int(torch.randint(0, 2**62, (), generator=g)) for g in gens]

    def batch(self, plan: Any, t: int) -> Any:
        raise NotImplementedError

    def meta_batch(self, plan: Any, t: int, size: int) -> Any:
        """A batch of ``size`` examples at step t, drawn apart from the training minibatches, that
        the meta-trainer scores its meta-loss on (``TrainConfig.meta_batch_size``).  Default: the
        step's own minibatch (tasks without sampled data: the quadratic)."""
        return self.batch(plan, t)

    def heldout_batch(self, plan: Any, t: int, size: int) -> Any:
        """Examples the optimizee never trains on, for the generalization meta-objective
        (``TrainConfig.meta_data = "heldout"``): every held-out example when ``size`` is 0 or
        covers them, else ``size`` of them drawn per instance at step t.  Tasks without held-out
        data (the quadratic is one fixed problem) refuse."""
        raise UserError(f"task {self.name!r} has no held-out data for --meta-data heldout")

    def heldout_loss(self, theta: Tensor, plan: Any) -> Tensor:
        """Per-instance loss ``(B,)`` over the held-out examples that validation scores (a rule
        trained with ``meta_data = "heldout"``); kept apart from those :meth:`heldout_batch`
        draws where the held-out data is a fixed set, so validation is not scored on examples
        the rule was meta-trained against."""
        return self.loss(theta, self.heldout_batch(plan, 0, 0))

    def loss(self, theta: Tensor, batch: Any) -> Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Task:
        """Move the task's data to ``device`` (in place) and return it."""
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class _DatasetTask(Task):
    """Classification on an in-memory dataset: minibatch t of instance b from seed (b, t).

    Examples are drawn with replacement from the whole split (MNIST: all 60,000 training
    images), so that minibatch t of a run is a pure function of (seed, t): the same for every
    optimizer compared and after a resume.  The authors' code reads TF's ``next_batch`` over
    55,000 images shuffled once per epoch; at batch 128 and 100-10,000 steps the two differ only
    in which examples repeat."""

    def __init__(self, spec, n_params, x: Tensor, y: Tensor, batch_size: int, device="cpu",
                 data_dir: str | Path | None = None):
        super().__init__(spec, n_params, device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = min(batch_size, x.shape[0])
        self.data_dir = data_dir                  # where the held-out split is read from
        self._heldout: tuple[Tensor, Tensor] | None = None

    def batch(self, plan: list[int], t: int) -> tuple[Tensor, Tensor]:
        return _draw(self.x, self.y, plan, t, self.batch_size, self.device)

    def meta_batch(self, plan: list[int], t: int, size: int) -> tuple[Tensor, Tensor]:
        return _draw(self.x, self.y, plan, t, size, self.device, META_STREAM)

    def _load_heldout(self) -> tuple[Tensor, Tensor]:
        """The dataset's other split: ``test`` for a task that trains on ``train``."""
        if self.spec["split"] != "train":
            raise UserError(f"task {self.name!r} trains on the {self.spec['split']!r} split: it "
                            "has no held-out split for --meta-data heldout")
        x, y, _ = load_dataset(self.spec["dataset"], self.data_dir, "test")
        return x, y

    def _heldout_data(self, part: str) -> tuple[Tensor, Tensor]:
        """The held-out split's first half (``part="meta"``: what the meta-loss is scored on) or
        its second half (``"val"``: what validation scores).  A rule meta-trained against a
        fixed set of examples learns to fit them (``benchmarks/README.md``: validation 0.08 on
        the set it was trained against, 0.13-0.15 on other data), so validation must not reuse
        them."""
        if self._heldout is None:  # read on first use: most tasks never need it
            self._heldout = tuple(a.to(self.device) for a in self._load_heldout())
        x, y = self._heldout
        half = x.shape[0] // 2
        return (x[:half], y[:half]) if part == "meta" else (x[half:], y[half:])

    def heldout_batch(self, plan: list[int], t: int, size: int) -> tuple[Tensor, Tensor]:
        return _heldout_draw(*self._heldout_data("meta"), plan, t, size, self.device)

    def heldout_loss(self, theta: Tensor, plan: list[int]) -> Tensor:
        return _chunked_loss(self.loss, theta, *self._heldout_data("val"))

    def to(self, device):
        super().to(device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        if self._heldout is not None:
            self._heldout = tuple(a.to(self.device) for a in self._heldout)
        return self

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """Batched model output ``(B, batch, classes)`` for flat parameters ``theta`` (B, n)."""
        raise NotImplementedError

    def loss(self, theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return _batched_xent(self.logits(theta, x), y)


#: key of the random stream meta-loss batches are drawn from, apart from the minibatches'
META_STREAM = 0x4D42
#: the same for held-out batches smaller than the held-out split
HELDOUT_STREAM = 0x484F
#: held-out examples per instance when no size is given: the meta-loss's default with
#: ``meta_data="heldout"`` (all of MNIST's held-out images for B instances, with the graph kept
#: for the meta-gradient, would not fit in memory) and the sin-LSTM's fresh validation waves
HELDOUT_DEFAULT = 1024

#: held-out examples per loss call in :func:`_chunked_loss` (MNIST's 10,000 test images times B
#: instances would otherwise be materialised at once)
HELDOUT_CHUNK = 2048


class HeldoutBatch(tuple):
    """A held-out ``(x, y)`` batch: :class:`ModuleTask` scores it with the model in eval mode
    (dropout off, batch-norm on running statistics), as ``autol2o fit`` scores validation."""

    __slots__ = ()


def _heldout_draw(x: Tensor, y: Tensor, plan: list[int], t: int, size: int,
                  device) -> tuple[Tensor, Tensor]:
    """Every held-out example for each instance (a broadcast view, no copy) when ``size`` is 0 or
    covers them; else ``size`` of them per instance, drawn like :func:`_draw`."""
    if size == 0 or size >= x.shape[0]:
        b = len(plan)
        return x.expand(b, *x.shape), y.expand(b, *y.shape)
    return _draw(x, y, plan, t, size, device, HELDOUT_STREAM)


def _chunked_loss(loss, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean per-instance loss ``(B,)`` over all of ``(x, y)``, in chunks of examples (the losses
    are means over their batch, so chunks are weighted by their size)."""
    b, n, total = theta.shape[0], x.shape[0], 0.0
    for lo in range(0, n, HELDOUT_CHUNK):
        xc, yc = x[lo:lo + HELDOUT_CHUNK], y[lo:lo + HELDOUT_CHUNK]
        total = total + loss(theta, (xc.expand(b, *xc.shape), yc.expand(b, *yc.shape))) \
            * xc.shape[0]
    return total / n


def _draw(x: Tensor, y: Tensor, plan: list[int], t: int, size: int, device,
          *stream: int) -> tuple[Tensor, Tensor]:
    """``size`` examples per instance, drawn with replacement from seed (instance seed, t,
    *stream): the same for every optimizer compared and after a resume."""
    n = x.shape[0]
    idx = torch.stack([torch.randint(0, n, (size,),
                                     generator=torch.Generator().manual_seed(mix_seed(s, t, *stream)))
                       for s in plan]).to(device)
    return x[idx], y[idx]


def _normal_init(gens, layout: Layout, std: float | None, device) -> Tensor:
    """Per-instance init: N(0, std^2) for every entry, or He-normal weights and zero biases."""
    rows = []
    for g in gens:
        parts = []
        for name, shape in layout:
            if std is not None:
                parts.append(torch.randn(math.prod(shape), generator=g) * std)
            elif name.endswith("b"):
                parts.append(torch.zeros(math.prod(shape)))
            else:
                fan_in = math.prod(shape[1:]) if name.startswith("conv") else shape[0]
                parts.append(torch.randn(math.prod(shape), generator=g)
                             * math.sqrt(2.0 / fan_in))
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(device)


def _batched_xent(logits: Tensor, y: Tensor) -> Tensor:
    """Mean softmax cross-entropy per instance: logits (B, bs, C), y (B, bs) -> (B,)."""
    b, bs, c = logits.shape
    return F.cross_entropy(logits.reshape(b * bs, c), y.reshape(-1),
                           reduction="none").view(b, bs).mean(1)


class MLPTask(_DatasetTask):
    """MLP classifier ``d -> hidden... -> classes``; weights stored (in, out) for ``x @ W + b``.

    Forward for B instances is one batched matmul per layer (``baddbmm``), so B costs no Python.
    """

    kind = "mlp"

    def __init__(self, dataset: str = "digits", hidden: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch_size: int = 128, init_std: float | None = 0.1,
                 split: str = "train", data_dir: str | Path | None = None, name: str | None = None,
                 device="cpu"):
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        x, y, _ = load_dataset(dataset, data_dir, split)
        classes = int(y.max()) + 1
        sizes = [x.shape[1], *hidden, classes]
        self.layout: Layout = []
        for i in range(len(sizes) - 1):
            self.layout += [(f"fc{i}.w", (sizes[i], sizes[i + 1])), (f"fc{i}.b", (sizes[i + 1],))]
        spec = {"kind": self.kind, "name": name or f"{dataset}-mlp", "dataset": dataset,
                "hidden": list(hidden), "activation": activation, "batch_size": batch_size,
                "init_std": init_std, "split": split}
        super().__init__(spec, layout_size(self.layout), x, y, batch_size, device, data_dir)
        self.act = ACTIVATIONS[activation]
        self.init_std = init_std

    def init_params(self, gens):
        return _normal_init(gens, self.layout, self.init_std, self.device)

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        p = unflatten(theta, self.layout)
        h = x
        n_layers = len(self.layout) // 2
        for i in range(n_layers):
            h = torch.baddbmm(p[f"fc{i}.b"].unsqueeze(1), h, p[f"fc{i}.w"])
            if i < n_layers - 1:
                h = self.act(h)
        return h


class CNNTask(_DatasetTask):
    """The paper's VGG-style MNIST CNNs, B instances at once via grouped convolutions.

    ``convs``: channel counts (3x3 conv, padding 1, ReLU) and ``"M"`` (2x2 max-pool); then ReLU
    hidden fully-connected layers ``fc`` and a linear output.  Instance b's convolution is group b
    of one ``conv2d(groups=B)``, so a single kernel call serves all instances.

    ``init_std=None`` (presets ``mnist-cnn1``, ``-cnn2``): He-normal weights, zero biases.  The
    authors' code (``vgg.py``) draws every weight and bias N(0, 0.1^2) instead, which trains more
    slowly at first; ``init_std=0.1`` gives that (presets ``mnist-cnn1-std01``, ``-cnn2-std01``).
    Both are kept: the He presets are what the shipped ``rnnprop-mix`` was meta-trained on and what
    the earlier benchmark rows measured; the paper benchmark reports both.
    """

    kind = "cnn"
    ARCHS = {"cnn1": ([16, 16, "M"], []), "cnn2": ([16, 16, "M", 32, 32, "M"], [64])}

    def __init__(self, dataset: str = "digits", arch: str = "cnn1", batch_size: int = 128,
                 init_std: float | None = None, split: str = "train",
                 data_dir: str | Path | None = None, name: str | None = None, device="cpu"):
        if arch not in self.ARCHS:
            raise UserError(f"unknown CNN architecture {arch!r}; known: {', '.join(self.ARCHS)}")
        x, y, shape = load_dataset(dataset, data_dir, split)
        self.image_shape = shape
        self.convs, fcs = self.ARCHS[arch]
        ch, hh, ww = shape
        self.layout: Layout = []
        for i, c in enumerate(self.convs):
            if c == "M":
                hh, ww = hh // 2, ww // 2
                continue
            self.layout += [(f"conv{i}.w", (c, ch, 3, 3)), (f"conv{i}.b", (c,))]
            ch = c
        sizes = [ch * hh * ww, *fcs, int(y.max()) + 1]
        for i in range(len(sizes) - 1):
            self.layout += [(f"fc{i}.w", (sizes[i], sizes[i + 1])), (f"fc{i}.b", (sizes[i + 1],))]
        self.n_fc = len(sizes) - 1
        spec = {"kind": self.kind, "name": name or f"{dataset}-{arch}", "dataset": dataset,
                "arch": arch, "batch_size": batch_size, "init_std": init_std, "split": split}
        super().__init__(spec, layout_size(self.layout), x, y, batch_size, device, data_dir)
        self.init_std = init_std

    def init_params(self, gens):
        return _normal_init(gens, self.layout, self.init_std, self.device)

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        p = unflatten(theta, self.layout)
        b, bs = x.shape[:2]
        h = x.reshape(b, bs, *self.image_shape).transpose(0, 1).reshape(bs, -1,
                                                                        *self.image_shape[1:])
        for i, c in enumerate(self.convs):
            if c == "M":
                h = F.max_pool2d(h, 2)
                continue
            w = p[f"conv{i}.w"]
            h = F.relu(F.conv2d(h, w.reshape(-1, *w.shape[2:]), p[f"conv{i}.b"].reshape(-1),
                                padding=1, groups=b))
        h = h.reshape(bs, b, -1).transpose(0, 1)          # (B, bs, C*H*W), PyTorch flatten order
        for i in range(self.n_fc):
            h = torch.baddbmm(p[f"fc{i}.b"].unsqueeze(1), h, p[f"fc{i}.w"])
            if i < self.n_fc - 1:
                h = F.relu(h)
        return h


class SinLSTMTask(Task):
    """The paper's sin-LSTM regression: read a noisy sine, predict its next value (MSE).

    As in the authors' code (``vfleaking/rnnprop``, ``optimizee/lstm.py``): each example draws
    A ~ U(0, ``amp_max`` = 10), w ~ U(0, ``freq_max`` = pi/2), phi ~ U(0, 2 pi); the input sequence
    is ``A sin(k w + phi) + noise * N(0, 1)`` for k = 0..seq_len-1 and the target is
    ``A sin(seq_len w + phi)``.  The model is an LSTM (``layers`` x ``hidden``, plain gates:
    ``forget_bias`` = 0) read out by a linear layer at the last step; all parameters start
    N(0, init_std^2).  Before stop 8 this task used A, w ~ U(0, 1) and a forget-gate bias of 1
    (100x smaller losses); specs written then say so explicitly, so they rebuild that task.
    """

    kind = "sin_lstm"

    def __init__(self, hidden: int = 20, layers: int = 1, seq_len: int = 10, noise: float = 0.1,
                 batch_size: int = 128, init_std: float = 0.1, amp_max: float = 10.0,
                 freq_max: float = math.pi / 2, forget_bias: float = 0.0, name: str | None = None,
                 device="cpu"):
        self.hidden, self.layers, self.seq_len, self.noise = hidden, layers, seq_len, noise
        self.batch_size, self.init_std = batch_size, init_std
        self.amp_max, self.freq_max, self.forget_bias = amp_max, freq_max, forget_bias
        self.layout: Layout = []
        for i in range(layers):
            fan_in = 1 if i == 0 else hidden
            self.layout += [(f"lstm{i}.w", (fan_in + hidden, 4 * hidden)),
                            (f"lstm{i}.b", (4 * hidden,))]
        self.layout += [("out.w", (hidden, 1)), ("out.b", (1,))]
        spec = {"kind": self.kind, "name": name or "sin-lstm", "hidden": hidden, "layers": layers,
                "seq_len": seq_len, "noise": noise, "batch_size": batch_size,
                "init_std": init_std, "amp_max": amp_max, "freq_max": freq_max,
                "forget_bias": forget_bias}
        super().__init__(spec, layout_size(self.layout), device)

    def init_params(self, gens):
        return _normal_init(gens, self.layout, self.init_std, self.device)

    def batch(self, plan: list[int], t: int) -> tuple[Tensor, Tensor]:
        return self._waves(plan, t, self.batch_size)

    def meta_batch(self, plan: list[int], t: int, size: int) -> tuple[Tensor, Tensor]:
        return self._waves(plan, t, size, META_STREAM)

    def heldout_batch(self, plan: list[int], t: int, size: int) -> tuple[Tensor, Tensor]:
        """Fresh waves (every wave is new: none was trained on)."""
        return self._waves(plan, t, size or HELDOUT_DEFAULT, HELDOUT_STREAM)

    def heldout_loss(self, theta: Tensor, plan: list[int]) -> Tensor:
        # another stream than the meta-loss's (which draws at steps t >= 1 of HELDOUT_STREAM)
        return self.loss(theta, self._waves(plan, 0, HELDOUT_DEFAULT, HELDOUT_STREAM, 1))

    def _waves(self, plan: list[int], t: int, size: int, *stream: int) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        k = torch.arange(self.seq_len + 1, dtype=torch.float32)
        for s in plan:
            g = torch.Generator().manual_seed(mix_seed(s, t, *stream))
            amp, w, phi = torch.rand(3, size, 1, generator=g).unbind(0)
            wave = amp * self.amp_max * torch.sin(k * w * self.freq_max + phi * 2 * math.pi)
            noise = torch.randn(size, self.seq_len, generator=g) * self.noise
            xs.append(wave[:, :-1] + noise)
            ys.append(wave[:, -1])
        return torch.stack(xs).to(self.device), torch.stack(ys).to(self.device)

    def loss(self, theta, batch):
        x, y = batch                                     # (B, bs, L), (B, bs)
        p = unflatten(theta, self.layout)
        b, bs, steps = x.shape
        hs = [x.new_zeros(b, bs, self.hidden) for _ in range(self.layers)]
        cs = [x.new_zeros(b, bs, self.hidden) for _ in range(self.layers)]
        for t in range(steps):
            inp = x[:, :, t:t + 1]
            for i in range(self.layers):
                gates = torch.baddbmm(p[f"lstm{i}.b"].unsqueeze(1),
                                      torch.cat((inp, hs[i]), -1), p[f"lstm{i}.w"])
                gi, gf, gg, go = gates.chunk(4, -1)
                cs[i] = torch.sigmoid(gf + self.forget_bias) * cs[i] + torch.sigmoid(gi) * torch.tanh(gg)
                hs[i] = torch.sigmoid(go) * torch.tanh(cs[i])
                inp = hs[i]
        pred = torch.baddbmm(p["out.b"].unsqueeze(1), inp, p["out.w"]).squeeze(-1)
        return ((pred - y) ** 2).mean(1)


class QuadraticTask(Task):
    """Random quadratic ``f(theta) = ||W theta - y||^2`` (Andrychowicz et al.), W, y ~ N(0, 1).

    W and y are drawn once per run and instance; theta starts N(0, 1).  Deterministic: batch t
    is the same problem at every step.
    """

    kind = "quadratic"

    def __init__(self, dim: int = 10, name: str | None = None, device="cpu"):
        self.dim = dim
        super().__init__({"kind": self.kind, "name": name or "quadratic", "dim": dim}, dim, device)

    def init_params(self, gens):
        return torch.stack([torch.randn(self.dim, generator=g) for g in gens]).to(self.device)

    def make_plan(self, gens):
        w = torch.stack([torch.randn(self.dim, self.dim, generator=g) for g in gens])
        y = torch.stack([torch.randn(self.dim, generator=g) for g in gens])
        return w.to(self.device), y.to(self.device)

    def batch(self, plan, t):
        return plan

    def loss(self, theta, batch):
        w, y = batch
        r = torch.bmm(w, theta.unsqueeze(-1)).squeeze(-1) - y
        return (r * r).sum(1)


def convex_term(x: Tensor, a: Tensor) -> Tensor:
    """The paper's convex-combination term ``mean_i clip((x_i - a_i)^2, 0, 10)`` per instance.

    ``x``, ``a``: ``(B, k)`` -> ``(B,)``.  The clip keeps the term bounded (gradient zero once
    a coordinate is more than sqrt(10) away from its target).
    """
    return torch.clamp((x - a) ** 2, 0.0, 10.0).mean(1)


#: held-out examples per run of a ModuleTask with ``holdout`` (enough to score a loss; more only
#: costs time at every scored step)
HOLDOUT_MAX = 2048
#: key of the random stream a run's train / held-out partition is drawn from
SPLIT_KEY = 0x5350


@dataclass
class RunSplit:
    """One run's share of a ModuleTask's data: its minibatch seed and its two index sets."""

    seed: int
    train: Tensor
    heldout: Tensor


class ModuleTask(Task):
    """Any ``nn.Module`` + in-memory tensors + a loss, B parameter sets at once.

    The B instances are evaluated with ``torch.func.vmap`` over ``functional_call``; modules that
    vmap cannot handle fall back to a Python loop over instances (same numbers, slower).  Each
    instance's init is ``build_model()`` under its own seed, so it is exactly what the user's
    constructor produces.  Buffers (e.g. BatchNorm running stats) are shared and not trained.
    """

    kind = "module"

    def __init__(self, build_model: Callable[[], nn.Module], x: Tensor, y: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], batch_size: int = 128,
                 name: str = "module", x_val: Tensor | None = None, y_val: Tensor | None = None,
                 device="cpu", holdout: float = 0.0):
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise UserError(f"ModuleTask {name!r}: x and y must have the same non-zero length, "
                            f"got {x.shape[0]} and {y.shape[0]}")
        if not 0.0 <= holdout < 1.0:
            raise UserError(f"ModuleTask {name!r}: holdout must lie in [0, 1), got {holdout}")
        #: with ``holdout`` > 0 every run splits (x, y) anew, from its seed: it trains on one
        #: part and its held-out batches come from the other (at most HOLDOUT_MAX examples).
        #: Meta-training against a fixed held-out set lets the rule's thousands of weights fit
        #: those few hundred examples; against a fresh split per run it can only learn what
        #: generalises.  The validation data (``x_val``) stays unseen for the caller's own use
        self.n_heldout = 0
        if holdout:
            self.n_heldout = min(HOLDOUT_MAX, max(1, round(holdout * x.shape[0])))
            if self.n_heldout >= x.shape[0]:
                raise UserError(f"ModuleTask {name!r}: {x.shape[0]} examples are too few to hold "
                                f"out {holdout:.0%} of them")
        self.build_model, self.loss_fn = build_model, loss_fn
        self.model = build_model()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        params = dict(self.model.named_parameters())
        self.layout = [(n, tuple(params[n].shape)) for n in self.names]
        self.x, self.y, self.x_val, self.y_val = x, y, x_val, y_val
        self.batch_size = min(batch_size, x.shape[0])
        self.batch_size = min(self.batch_size, x.shape[0] - self.n_heldout)
        spec = {"kind": self.kind, "name": name, "n_params": layout_size(self.layout),
                "batch_size": self.batch_size, "n_examples": int(x.shape[0]),
                "model": type(self.model).__name__,
                **({"holdout": holdout, "n_heldout": self.n_heldout} if holdout else {})}
        super().__init__(spec, layout_size(self.layout), device)
        self._use_vmap = True
        self.to(device)

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        if self.x_val is not None and self.y_val is not None:
            self.x_val, self.y_val = self.x_val.to(self.device), self.y_val.to(self.device)
        return self

    def init_params(self, gens):
        rows = []
        for g in gens:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
                model = self.build_model()
            params = dict(model.named_parameters())
            rows.append(torch.cat([params[n].detach().reshape(-1).float() for n in self.names]))
        return torch.stack(rows).to(self.device)

    def make_plan(self, gens):
        seeds = super().make_plan(gens)
        if not self.n_heldout:
            return seeds
        n = self.x.shape[0]
        splits = []
        for s in seeds:
            g = torch.Generator().manual_seed(mix_seed(s, SPLIT_KEY, 0))  # 3 keys: never a (s, t)
            perm = torch.randperm(n, generator=g)
            splits.append(RunSplit(s, perm[self.n_heldout:], perm[:self.n_heldout]))
        return splits

    def _pick(self, plan, t: int, size: int, part: str, *stream: int) -> tuple[Tensor, Tensor]:
        """``size`` examples per instance, drawn with replacement from its own ``part``."""
        rows = []
        for sp in plan:
            pool = getattr(sp, part)
            g = torch.Generator().manual_seed(mix_seed(sp.seed, t, *stream))
            rows.append(pool[torch.randint(0, pool.shape[0], (size,), generator=g)])
        idx = torch.stack(rows).to(self.device)
        return self.x[idx], self.y[idx]

    def batch(self, plan, t):
        if self.n_heldout:
            return self._pick(plan, t, self.batch_size, "train")
        return _draw(self.x, self.y, plan, t, self.batch_size, self.device)

    def meta_batch(self, plan, t, size):
        if self.n_heldout:
            return self._pick(plan, t, size, "train", META_STREAM)
        return _draw(self.x, self.y, plan, t, size, self.device, META_STREAM)

    def _heldout_data(self) -> tuple[Tensor, Tensor]:
        if self.x_val is None or self.y_val is None:
            raise UserError(f"ModuleTask {self.name!r} has no validation data")
        return self.x_val, self.y_val  # on self.device: to() moves them

    def heldout_batch(self, plan, t, size):
        """Each run's own held-out part with ``holdout`` (fresh per run, so the same examples
        serve meta-loss and validation runs without being fitted); else the validation data.
        Scored with the model in eval mode (:class:`HeldoutBatch`)."""
        if self.n_heldout:
            if size == 0 or size >= self.n_heldout:
                idx = torch.stack([sp.heldout for sp in plan]).to(self.device)
                return HeldoutBatch((self.x[idx], self.y[idx]))
            return HeldoutBatch(self._pick(plan, t, size, "heldout", HELDOUT_STREAM))
        return HeldoutBatch(_heldout_draw(*self._heldout_data(), plan, t, size, self.device))

    def heldout_loss(self, theta, plan):
        if self.n_heldout:  # each run's own held-out part: at most HOLDOUT_MAX examples, one call
            return super().heldout_loss(theta, plan)
        return _chunked_loss(lambda th, b: self.loss(th, HeldoutBatch(b)), theta,
                             *self._heldout_data())

    def _single(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        buffers = dict(self.model.named_buffers())
        out = torch.func.functional_call(self.model, (params, buffers), (x,))
        return self.loss_fn(out, y)

    def loss(self, theta, batch):
        if isinstance(batch, HeldoutBatch) and self.model.training:
            self.model.eval()
            try:
                return self.loss(theta, batch)
            finally:
                self.model.train()
        x, y = batch
        params = unflatten(theta, self.layout)
        if self._use_vmap:
            try:
                return torch.func.vmap(self._single)(params, x, y)
            except Exception:  # noqa: BLE001 - any vmap limitation: use the exact loop instead
                self._use_vmap = False
        return torch.stack([self._single({k: v[b] for k, v in params.items()}, x[b], y[b])
                            for b in range(theta.shape[0])])


# ----------------------------------------------------------------------------------------------
# specs and presets

def _mlp_spec(dataset: str, hidden: list[int], activation: str, name: str) -> dict[str, Any]:
    return {"kind": "mlp", "name": name, "dataset": dataset, "hidden": hidden,
            "activation": activation, "batch_size": 128, "init_std": 0.1, "split": "train"}


_MLP_PRESET = re.compile(r"^(mnist|digits|synthetic)-nn(?:-l(\d+))?-(sigmoid|relu|elu|tanh)$")
_CNN_PRESET = re.compile(r"^(mnist|digits)-cnn([12])(-std01)?$")


def preset_spec(name: str) -> dict[str, Any]:
    """Spec of a named task.

    * ``mlp-digits``: digits 64-20-10 sigmoid, batch 128, init N(0, 0.1^2);
    * ``{mnist,digits,synthetic}-nn[-lK]-{sigmoid,relu,elu,tanh}``: K hidden layers of 20
      (default 1), e.g. ``mnist-nn-sigmoid`` (the paper's 784-20-10 training task),
      ``mnist-nn-l3-sigmoid``;
    * ``{mnist,digits}-cnn1`` / ``-cnn2``: the paper's vgg-mnist-fc1-conv2-pool1 / fc2-conv4-pool2
      with He init; ``-cnn1-std01`` / ``-cnn2-std01``: the same with the authors' N(0, 0.1^2) init;
    * ``sin-lstm``, ``sin-lstm-x2`` (2 layers), ``sin-lstm-no001`` (noise 0.01);
    * ``quadratic`` (10-dimensional random quadratics).
    """
    if name == "mlp-digits":
        return _mlp_spec("digits", [20], "sigmoid", name)
    m = _MLP_PRESET.match(name)
    if m:
        return _mlp_spec(m.group(1), [20] * int(m.group(2) or 1), m.group(3), name)
    m = _CNN_PRESET.match(name)
    if m:
        return {"kind": "cnn", "name": name, "dataset": m.group(1), "arch": f"cnn{m.group(2)}",
                "batch_size": 128, "init_std": 0.1 if m.group(3) else None, "split": "train"}
    if name in ("sin-lstm", "sin-lstm-x2", "sin-lstm-no001"):
        return {"kind": "sin_lstm", "name": name, "hidden": 20,
                "layers": 2 if name.endswith("x2") else 1, "seq_len": 10,
                "noise": 0.01 if name.endswith("no001") else 0.1, "batch_size": 128,
                "init_std": 0.1}
    if name == "quadratic":
        return {"kind": "quadratic", "name": name, "dim": 10}
    raise UserError(f"unknown task {name!r}; known: mlp-digits, mnist-nn-sigmoid, "
                    f"mnist-nn-l3-relu, mnist-cnn1, mnist-cnn2, sin-lstm, quadratic, ...")


_KINDS: dict[str, type[Task]] = {"mlp": MLPTask, "cnn": CNNTask, "sin_lstm": SinLSTMTask,
                                 "quadratic": QuadraticTask}


def build_task(spec: dict[str, Any] | str, data_dir: str | Path | None = None,
               device: torch.device | str = "cpu") -> Task:
    """Task from a spec dict (``task.spec``), a preset name (see :func:`preset_spec`), or a spec
    written as JSON (``--task '{"kind": ...}'``: a zoo card's ``tasks`` entry rebuilds exactly the
    task it names, also where a preset has changed since).

    ``data_dir`` is where the MNIST IDX files live; it is a property of the machine, not of the
    task, so it is not part of the spec.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise UserError(f"task spec {spec!r} is not valid JSON: {exc}") from None
    if isinstance(spec, str):
        spec = preset_spec(spec)
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "module":
        raise UserError(f"task {spec.get('name')!r} wraps a user model and cannot be rebuilt "
                        "from its spec; construct a ModuleTask instead")
    if kind not in _KINDS:
        raise UserError(f"unknown task kind {kind!r} in spec; known: {', '.join(_KINDS)}")
    spec.pop("data_dir", None)
    cls = _KINDS[kind]
    if cls in (MLPTask, CNNTask):
        spec["data_dir"] = data_dir
    try:
        return cls(**spec, device=device)
    except TypeError as exc:
        raise UserError(f"bad task spec for kind {kind!r}: {exc}") from None
