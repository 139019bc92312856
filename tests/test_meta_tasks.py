"""Task suite: IDX reader, batched tasks vs per-instance / reference modules, specs, evaluate."""

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
from torch import nn

from autol2o.errors import UserError
from autol2o.meta import (
    CNNTask,
    EvalResult,
    ModuleTask,
    Objective,
    TrainConfig,
    baseline,
    build_task,
    convex_term,
    evaluate,
    preset_spec,
    read_idx,
    sqrt2_grid,
    tune_lr,
    tuning_score,
)
from autol2o.meta.data import load_mnist
from autol2o.meta.tasks import generators, unflatten
from autol2o.optimizers import RNNprop
from autol2o.zoo import load_entry

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path, arr: np.ndarray, magic: bytes | None = None):
    header = magic or bytes([0, 0, 8, arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_roundtrip_and_mnist_loader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    x, y, shape = load_mnist(str(tmp_path), "test")
    assert x.shape == (5, 784) and shape == (1, 28, 28)
    assert torch.allclose(x[2], torch.tensor(images[2].reshape(-1) / 255.0, dtype=torch.float32))
    assert y.tolist() == [3, 1, 4, 1, 5]


def test_idx_reader_rejects_bad_files_naming_them(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    _write_idx(bad_magic, np.zeros((2, 2)), magic=bytes([0, 0, 9, 2]))
    with pytest.raises(UserError, match="bad.gz.*magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(UserError, match="short.gz.*size mismatch"):
        read_idx(truncated)
    not_gzip = tmp_path / "junk.gz"
    not_gzip.write_bytes(b"definitely not gzip")
    with pytest.raises(UserError, match="junk.gz"):
        read_idx(not_gzip)
    with pytest.raises(UserError, match="missing.gz.*not found"):
        read_idx(tmp_path / "missing.gz")
    with pytest.raises(UserError, match="data directory"):
        build_task("mnist-nn-sigmoid")


@pytest.mark.parametrize("name", ["mlp-digits", "digits-nn-l2-relu", "digits-cnn2", "sin-lstm-x2",
                                  "quadratic"])
def test_batched_instances_match_one_at_a_time(name):
    task = build_task(name)
    seeds = [11, 22, 33]
    gens = generators(seeds)
    theta, plan = task.init_params(gens), task.make_plan(gens)
    batched = task.loss(theta, task.batch(plan, 5))
    for b, s in enumerate(seeds):
        g = generators([s])
        th1, pl1 = task.init_params(g), task.make_plan(g)
        assert torch.equal(th1[0], theta[b])
        assert torch.allclose(task.loss(th1, task.batch(pl1, 5))[0], batched[b], rtol=1e-5)
    # a task rebuilt from its JSON spec is the same function
    again = build_task(task.spec)
    assert torch.allclose(again.loss(theta, again.batch(plan, 5)), batched)


def test_cnn_matches_a_reference_torch_module():
    task = build_task("digits-cnn2")
    assert isinstance(task, CNNTask)
    theta = task.init_params(generators([1, 2]))
    x, y = task.batch(task.make_plan(generators([1, 2])), 0)
    p = unflatten(theta, task.layout)
    b = 1
    ref = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    convs = [m for m in ref if isinstance(m, nn.Conv2d)]
    fcs = [m for m in ref if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m, i in zip(convs, [0, 1, 3, 4], strict=True):
            m.weight.copy_(p[f"conv{i}.w"][b])
            m.bias.copy_(p[f"conv{i}.b"][b])
        for i, m in enumerate(fcs):
            m.weight.copy_(p[f"fc{i}.w"][b].t())
            m.bias.copy_(p[f"fc{i}.b"][b])
        expected = nn.functional.cross_entropy(ref(x[b].view(-1, 1, 8, 8)), y[b])
    assert torch.allclose(task.loss(theta, (x, y))[b], expected, rtol=1e-5)


def test_cnn_presets_he_init_and_the_authors_normal_init():
    he, authors = build_task("digits-cnn1"), build_task("digits-cnn1-std01")
    assert he.spec["init_std"] is None and authors.spec["init_std"] == 0.1
    assert build_task(authors.spec).spec == authors.spec
    gens = generators([3])
    p_he = unflatten(he.init_params(gens), he.layout)
    p_au = unflatten(authors.init_params(generators([3])), authors.layout)
    # He: zero biases, weights with variance 2 / fan_in (fc0: 16 x 4 x 4 = 256 inputs);
    # authors: every entry N(0, 0.1^2)
    assert torch.count_nonzero(p_he["conv0.b"]) == 0
    assert abs(p_he["fc0.w"].std().item() - math.sqrt(2 / 256)) < 0.1 * math.sqrt(2 / 256)
    everything = torch.cat([v.flatten() for v in p_au.values()])
    assert abs(everything.std().item() - 0.1) < 0.005
    assert torch.count_nonzero(p_au["conv0.b"]) == 16


def test_module_task_vmap_matches_plain_model():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def build():
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    task = ModuleTask(build, x, y, nn.functional.cross_entropy, batch_size=16, name="toy")
    gens = generators([5, 6])
    theta, plan = task.init_params(gens), task.make_plan(gens)
    xb, yb = task.batch(plan, 3)
    losses = task.loss(theta, (xb, yb))
    model = build()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta[1], model.parameters())
        assert torch.allclose(losses[1], nn.functional.cross_entropy(model(xb[1]), yb[1]))
    task._use_vmap = False  # the fallback loop gives the same numbers
    assert torch.allclose(task.loss(theta, (xb, yb)), losses, atol=1e-6)
    assert task.spec["n_params"] == 5 * 7 + 7 + 7 * 3 + 3


def test_random_scaling_keeps_values_and_rescales_gradients():
    task = build_task("mlp-digits")
    gens = generators([7, 8])
    theta0 = task.init_params(gens)
    batch = task.batch(task.make_plan(gens), 0)
    obj = Objective(task, generators([9, 10]), TrainConfig(random_scaling=3.0))
    c = obj.scale
    assert c.min() >= np.exp(-3) and c.max() <= np.exp(3) and c.std() > 1
    start = obj.initial(theta0)
    assert torch.allclose(start, theta0 / c)
    assert torch.allclose(obj.loss(start, batch), task.loss(theta0, batch), rtol=1e-5)
    th = start.clone().requires_grad_(True)
    g_scaled = torch.autograd.grad(obj.loss(th, batch).sum(), th)[0]
    t0 = theta0.clone().requires_grad_(True)
    g = torch.autograd.grad(task.loss(t0, batch).sum(), t0)[0]
    assert torch.allclose(g_scaled, c * g, rtol=1e-4, atol=1e-7)   # chain rule: d/dtheta f(c theta)


def test_convex_term_formula_and_combination():
    x = torch.tensor([[0.0, 1.0, 5.0], [2.0, -1.0, 0.5]])
    a = torch.tensor([[0.5, -1.0, 0.0], [2.0, 1.0, -0.5]])
    expected = torch.tensor([(0.25 + 4.0 + 10.0) / 3, (0.0 + 4.0 + 1.0) / 3])  # 25 clipped to 10
    assert torch.allclose(convex_term(x, a), expected)
    task = build_task("quadratic")
    gens = generators([1])
    theta0, plan = task.init_params(gens), task.make_plan(gens)
    obj = Objective(task, generators([2]), TrainConfig(convex_combination=True, convex_dim=20))
    start = obj.initial(theta0)
    assert start.shape == (1, 30) and torch.all(start[:, 10:] == 0)
    assert torch.all(obj.a.abs() <= 1) and torch.all((obj.c_x >= np.exp(-1)) & (obj.c_x <= np.e))
    moved = start.clone()
    moved[:, 10:] = 0.7
    assert torch.allclose(obj.loss(moved, plan),
                          task.loss(theta0, plan) + convex_term(obj.c_x * 0.7, obj.a))


class _Recording:
    """Wraps a task and records every init and minibatch handed out."""

    def __init__(self, task):
        self.task, self.inits, self.batches = task, [], []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init_params(self, gens):
        th = self.task.init_params(gens)
        self.inits.append(th.clone())
        return th

    def batch(self, plan, t):
        b = self.task.batch(plan, t)
        self.batches.append((t, b[0].clone()))
        return b


def test_evaluate_protocol_same_inits_and_minibatches_for_every_optimizer():
    rec_adam, rec_rule = _Recording(build_task("mlp-digits")), _Recording(build_task("mlp-digits"))
    res_adam = evaluate(baseline("adam", 0.01), rec_adam, steps=6, runs=3, seed=4)
    torch.manual_seed(0)
    res_rule = evaluate(RNNprop(), rec_rule, steps=6, runs=3, seed=4)
    assert torch.equal(rec_adam.inits[0], rec_rule.inits[0])
    assert len(rec_adam.batches) == len(rec_rule.batches) == 12  # 6 steps + 6 for the final loss
    for (ta, xa), (tr, xr) in zip(rec_adam.batches, rec_rule.batches, strict=True):
        assert ta == tr and torch.equal(xa, xr)
    assert res_adam.curves.shape == (6, 3) and res_rule.final_losses.shape == (3,)
    # final loss = mean over the N minibatches of the loss at the final parameters:
    # with SGD at lr 0 the final parameters are the initial ones
    task = build_task("mlp-digits")
    res0 = evaluate(baseline("sgd", 0.0), task, steps=6, runs=3, seed=4)
    assert torch.allclose(res0.final_losses, res0.curves.mean(0), rtol=1e-6)
    # chunking the runs does not change anything, and training lowers the loss
    res_chunked = evaluate(baseline("adam", 0.01), task, steps=6, runs=3, seed=4, max_batch=2)
    assert torch.allclose(res_chunked.final_losses, res_adam.final_losses, rtol=1e-5)
    assert res_adam.final_loss < res0.final_loss and res_adam.diverged == 0


def test_sin_lstm_follows_the_authors_sampling_and_old_specs_still_rebuild():
    task = build_task("sin-lstm")
    assert task.spec["amp_max"] == 10.0 and task.spec["freq_max"] == pytest.approx(math.pi / 2)
    ys = torch.cat([task.batch([s], 0)[1] for s in range(40)], 1)   # 40 x 128 targets
    # A ~ U(0, 10), A sin(...) with phi uniform: |y| <= 10 and E[y^2] = E[A^2]/2 = 100/6
    assert ys.abs().max() <= 10.0 and (ys ** 2).mean() == pytest.approx(100 / 6, rel=0.1)
    # a spec written before the authors' ranges were used (the stop-6 rnnprop-mix's card)
    # rebuilds that task
    old = build_task({**task.spec, "amp_max": 1.0, "freq_max": 1.0, "forget_bias": 1.0})
    yo = torch.cat([old.batch([s], 0)[1] for s in range(40)], 1)
    assert yo.abs().max() <= 1.0 and (yo ** 2).mean() == pytest.approx(1 / 6, rel=0.1)
    # the shipped rnnprop-mix (stop 16) was meta-trained on the authors' definition
    card_specs = [t for t in load_entry("rnnprop-mix")[1]["tasks"] if t["kind"] == "sin_lstm"]
    assert card_specs == [task.spec]


def test_a_task_spec_given_as_json_rebuilds_that_task():
    old = {**preset_spec("sin-lstm"), "amp_max": 1.0, "freq_max": 1.0, "forget_bias": 1.0}
    task = build_task(json.dumps(old))
    assert task.spec == old and task.name == "sin-lstm"
    assert build_task(" " + json.dumps(preset_spec("mlp-digits"))).spec == preset_spec("mlp-digits")
    with pytest.raises(UserError, match="not valid JSON"):
        build_task('{"kind": "mlp",')
    with pytest.raises(UserError, match="unknown task kind"):
        build_task('{"kind": "nope"}')


def test_sqrt2_grid_is_the_papers_learning_rate_grid():
    grid = sqrt2_grid()
    assert len(grid) == 25 and grid[0] == 2.0 ** -12 and grid[-1] == 1.0
    assert all(b / a == pytest.approx(2 ** 0.5) for a, b in zip(grid, grid[1:]))
    assert sqrt2_grid(-9, -5) == [2.0 ** -9, 2.0 ** -8.5, 2.0 ** -8, 2.0 ** -7.5, 2.0 ** -7,
                                  2.0 ** -6.5, 2.0 ** -6, 2.0 ** -5.5, 2.0 ** -5]


def test_tune_lr_picks_the_best_rate_on_tuning_seeds_and_disqualifies_divergence():
    task = build_task("quadratic")
    grid = [2.0 ** -8, 2.0 ** -5.5, 2.0 ** -3, 2.0 ** 0]
    best, results = tune_lr(lambda lr: baseline("sgd", lr), task, 30, grid, 4)
    assert list(results) == grid and best == 2.0 ** -5.5
    assert all(results[lr].diverged for lr in grid[2:])       # too large: blows up
    again = evaluate(baseline("sgd", best), task, 30, 4, seed=1)   # tuned on seed 1, not 0
    assert torch.equal(again.final_losses, results[best].final_losses)
    # a rate with one diverged run loses even if its surviving runs look better
    lucky = EvalResult(torch.tensor([0.1, math.inf]), torch.zeros(1, 2), 1, 0.0)
    assert lucky.final_loss == pytest.approx(0.1) and tuning_score(lucky) == math.inf
    # equal scores: the smaller rate wins (the same optimizer whatever lr says)
    tie, _ = tune_lr(lambda lr: baseline("sgd", 2.0 ** -6), task, 5, [0.5, 0.25, 0.125], 2)
    assert tie == 0.125


def test_synthetic_test_split_is_held_out_data_of_the_same_problem():
    from autol2o.meta.data import load_dataset

    (xa, ya, _), (xb, yb, _) = load_dataset("synthetic"), load_dataset("synthetic", split="test")
    assert xa.shape == xb.shape and not torch.equal(xa, xb)
    # same clusters: per-class means agree across splits far closer than two classes' do
    ma = torch.stack([xa[ya == k].mean(0) for k in range(10)])
    mb = torch.stack([xb[yb == k].mean(0) for k in range(10)])
    same = (ma - mb).norm(dim=1).max()
    other = torch.cdist(ma, ma)[~torch.eye(10, dtype=torch.bool)].min()
    assert same < 0.2 * other, (same, other)
