"""Learned update rules and the torch.optim adapter, checked against formulas and properties."""

from __future__ import annotations

import copy
import io
import math
import pickle
from functools import partial

import pytest
import torch
from torch import nn

from autol2o.optimizers import (
    DMOptimizer,
    LearnedOptimizer,
    RNNprop,
    build_rule,
    dm_features,
    dm_update,
    rnnprop_features,
    rnnprop_update,
)


def _mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3)).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, scale: float = 1.0) -> None:
    x, y = _data(next(model.parameters()).dtype)
    for _ in range(steps):
        opt.zero_grad()
        loss = scale * nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()


def _rules():
    torch.manual_seed(7)
    return [RNNprop(), DMOptimizer()]


# -- features ---------------------------------------------------------------------------------
def test_rnnprop_features_match_hand_computation():
    b1 = b2 = 0.95
    eps = 1e-8
    gs = [0.5, -2.0, 0.25]
    m = v = 0.0
    mt = torch.zeros(1, dtype=torch.float64)
    vt = torch.zeros(1, dtype=torch.float64)
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        s = math.sqrt(v / (1 - b2**t)) + eps
        want = [g / s, (m / (1 - b1**t)) / s]
        feats, mt, vt = rnnprop_features(torch.tensor([g], dtype=torch.float64), mt, vt,
                                         torch.tensor(float(t), dtype=torch.float64), b1, b2, eps)
        assert feats[0].tolist() == pytest.approx(want, rel=1e-12)
        assert mt.item() == pytest.approx(m, rel=1e-12) and vt.item() == pytest.approx(v, rel=1e-12)
    # first step: m_hat = g, sqrt(v_hat) = |g|, so the features are sign(g) (up to eps)
    feats, _, _ = rnnprop_features(torch.tensor([3.0, -0.1]), torch.zeros(2), torch.zeros(2),
                                   torch.tensor(1.0), b1, b2, eps)
    assert torch.allclose(feats, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-6)


def test_dm_preprocessing_edge_values():
    p = 10.0
    g = torch.tensor([0.0, 1e30, -1e30, 1e-6, -1e-3, 2.0, float("inf")])
    f = dm_features(g, p)
    e = math.exp(p)
    want_log = [-1.0, math.log(1e30) / p, math.log(1e30) / p, -1.0, math.log(1e-3) / p,
                math.log(2.0) / p, float("inf")]
    want_sign = [0.0, 1.0, -1.0, 1e-6 * e, -1.0, 1.0, 1.0]
    assert f[:, 0].tolist() == pytest.approx(want_log, rel=1e-6)
    assert f[:, 1].tolist() == pytest.approx(want_sign, rel=1e-6)
    assert torch.isfinite(f[:6]).all()


# -- the network ------------------------------------------------------------------------------
def test_rnnprop_magnitude_feature_is_log_rms_over_10():
    """``magnitude=True`` appends log(s_t) / 10 to the paper's two features, which it leaves as
    they were; a loss scale c shifts that feature by log(c) / 10 and nothing else."""
    g = torch.tensor([0.5, -2.0, 1e-3, 0.0], dtype=torch.float64)
    zeros, step = torch.zeros(4, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    plain, _, _ = rnnprop_features(g, zeros, zeros, step, 0.95, 0.95, 1e-8)
    mag, m, v = rnnprop_features(g, zeros, zeros, step, 0.95, 0.95, 1e-8, magnitude=True)
    assert torch.equal(mag[:, :2], plain)
    # first step: sqrt(v_hat) = |g|, so s = |g| + eps
    want = [math.log(abs(x) + 1e-8) / 10 for x in g.tolist()]
    assert mag[:, 2].tolist() == pytest.approx(want, rel=1e-12)
    scaled, _, _ = rnnprop_features(1e3 * g[:3], zeros[:3], zeros[:3], step, 0.95, 0.95, 1e-300,
                                    magnitude=True)
    exact, _, _ = rnnprop_features(g[:3], zeros[:3], zeros[:3], step, 0.95, 0.95, 1e-300,
                                   magnitude=True)
    assert torch.allclose(scaled[:, :2], exact[:, :2], rtol=1e-12, atol=0)
    assert torch.allclose(scaled[:, 2] - exact[:, 2], torch.full((3,), math.log(1e3) / 10,
                                                                 dtype=torch.float64))


def test_rnnprop_magnitude_config_round_trips_and_paper_config_is_unchanged():
    from autol2o.optimizers.base import build_rule

    assert "magnitude" not in RNNprop().config()  # old cards and new ones for the paper's rule agree
    rule = build_rule(RNNprop(magnitude=True).config())
    assert rule.magnitude and rule.input.in_features == 3
    assert sum(p.numel() for p in rule.parameters()) == 6641 + 20


@pytest.mark.parametrize("make", [RNNprop, DMOptimizer, partial(RNNprop, magnitude=True)])
def test_fast_chunked_and_reference_paths_agree(make):
    torch.manual_seed(1)
    rule = make().double()
    update_fn = rnnprop_update if isinstance(rule, RNNprop) else dm_update
    n = 1000
    grads = [torch.randn(n, dtype=torch.float64) * 10.0 ** torch.randint(-4, 3, (n,)) for _ in range(4)]
    s_ref = rule.init_state(n, dtype=torch.float64)
    s_diff = rule.init_state(n, dtype=torch.float64)
    s_inf = rule.init_state(n, dtype=torch.float64)
    rule.chunk_size = 97  # many ragged chunks
    for g in grads:
        u_ref, s_ref = update_fn(rule, g, s_ref, reference=True)
        u_diff, s_diff = rule(g, s_diff)
        with torch.no_grad():
            u_inf, s_inf = rule(g, s_inf)
        assert torch.allclose(u_diff, u_ref, atol=1e-12, rtol=0)
        assert torch.allclose(u_inf, u_ref, atol=1e-12, rtol=0)
    for k in s_ref:
        assert torch.allclose(s_inf[k], s_ref[k], atol=1e-12), k


def test_meta_parameter_count_matches_paper():
    # "About 6.6k parameters in all" (paper notes): 2*20+20 + 2 LSTM layers + 20+1
    assert sum(p.numel() for p in RNNprop().parameters()) == 6641


@pytest.mark.parametrize("seed", range(5))
def test_random_rnnprop_never_moves_more_than_out_scale(seed):
    torch.manual_seed(seed)
    rule = RNNprop()
    with torch.no_grad():  # make the network as aggressive as possible
        for p in rule.parameters():
            p.mul_(50.0)
    g = torch.tensor([0.0, 1e30, -1e30, 1e-30, 3.0, -3.0] * 50) * torch.rand(300)
    state = rule.init_state(g.numel())
    with torch.no_grad():
        for _ in range(10):
            u, state = rule(g, state)
            assert u.abs().max().item() <= 0.1 + 1e-7
            assert torch.isfinite(u).all()


@pytest.mark.parametrize("seed", range(5))
def test_random_dm_step_bounded_by_output_layer(seed):
    torch.manual_seed(seed)
    rule = DMOptimizer()
    bound = rule.out_scale * (rule.output.weight.abs().sum() + rule.output.bias.abs()).item()
    g = torch.randn(500) * 10.0 ** torch.randint(-8, 8, (500,))
    state = rule.init_state(500)
    with torch.no_grad():
        for _ in range(10):
            u, state = rule(g, state)
            assert u.abs().max().item() <= bound + 1e-7


def test_build_rule_round_trip_and_errors():
    for rule in _rules():
        again = build_rule(rule.config())
        assert type(again) is type(rule) and again.config() == rule.config()
    with pytest.raises(ValueError, match="unknown learned rule"):
        build_rule({"rule": "nope"})
    with pytest.raises(ValueError):
        RNNprop(beta1=1.0)


# -- differentiable mode ----------------------------------------------------------------------
def _unroll_quadratic(rule, a, theta0, steps, recorded=None):
    """Meta-loss f(theta_T) for f = 0.5 sum a theta^2; grads are fresh or replayed (recorded)."""
    theta = theta0.clone()
    state = rule.init_state(theta.numel(), dtype=theta.dtype)
    grads = []
    for t in range(steps):
        g = (a * theta).detach() if recorded is None else recorded[t]
        grads.append(g)
        u, state = rule(g, state)
        theta = theta + u
    return 0.5 * (a * theta * theta).sum(), grads


@pytest.mark.parametrize("make", [RNNprop, DMOptimizer])
def test_meta_gradient_matches_finite_differences(make):
    """Autograd meta-gradients equal central differences of the truncated (first-order) objective.

    With one step the gradient does not depend on the meta-weights, so the objective is exact.
    With several steps second derivatives are dropped: the objective whose derivative autograd
    returns replays the same gradient sequence, which the finite differences do too.
    """
    torch.manual_seed(3)
    rule = make().double()
    a = torch.tensor([0.5, 2.0, 5.0, 0.1], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -0.7, 0.3, 2.0], dtype=torch.float64)
    probes = [rule.output.weight, rule.lstm.weights[0], rule.lstm.biases[1]]
    for steps in (1, 5):
        rule.zero_grad()
        loss, grads = _unroll_quadratic(rule, a, theta0, steps)
        loss.backward()
        h = 1e-6
        for w in probes:
            flat = w.data.view(-1)
            for idx in (0, flat.numel() // 2, flat.numel() - 1):
                orig = flat[idx].item()
                with torch.no_grad():
                    flat[idx] = orig + h
                    lp, _ = _unroll_quadratic(rule, a, theta0, steps, grads)
                    flat[idx] = orig - h
                    lm, _ = _unroll_quadratic(rule, a, theta0, steps, grads)
                    flat[idx] = orig
                fd = (lp - lm).item() / (2 * h)
                assert w.grad.view(-1)[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("make", [RNNprop, DMOptimizer])
def test_the_caller_decides_whether_the_gradient_input_carries_a_graph(make):
    """First-order meta-training hands the rule detached gradients (no path through g to theta);
    second-order hands it one with a graph, and the rule must then pass that path on."""
    torch.manual_seed(0)
    rule = make()
    theta = torch.randn(5, requires_grad=True)
    u, _ = rule((2 * theta).detach(), rule.init_state(5))
    u.sum().backward()
    assert theta.grad is None and rule.output.weight.grad is not None
    u, _ = rule(2 * theta, rule.init_state(5))  # g = d(theta^2)/d theta, with its graph
    (through_g,) = torch.autograd.grad(u.sum(), theta)
    assert torch.isfinite(through_g).all() and through_g.abs().sum() > 0


# -- the torch.optim adapter ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_rnnprop_updates_invariant_to_loss_scale(scale):
    """Multiplying the loss by c > 0 leaves every update unchanged while |g| >> eps = 1e-8.

    Invariance holds only in that regime (see the RNNprop docstring): the base loss is scaled so
    that the smallest gradient seen is ~5e-4 at c = 1e-3 (eps/|g| <= 2e-5); float64 keeps
    rounding out of the comparison.
    """
    rule = _rules()[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = 10 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    trajectories = []
    for c in (1.0, scale):
        model = _mlp(dtype=torch.float64)
        opt = LearnedOptimizer(model.parameters(), rule)
        for _ in range(20):
            opt.zero_grad()
            (c * 1e4 * ((model(x) - y) ** 2).mean()).backward()
            opt.step()
        trajectories.append([p.detach().clone() for p in model.parameters()])
    for p1, p2 in zip(*trajectories):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=0)


def test_rnnprop_features_exactly_invariant_without_eps():
    g = torch.randn(100, dtype=torch.float64)
    m, v = torch.zeros(100, dtype=torch.float64), torch.zeros(100, dtype=torch.float64)
    mc, vc = m.clone(), v.clone()
    for t in range(1, 6):
        step = torch.tensor(float(t), dtype=torch.float64)
        f1, m, v = rnnprop_features(g * t, m, v, step, 0.95, 0.95, 1e-300)
        f2, mc, vc = rnnprop_features(1e-3 * g * t, mc, vc, step, 0.95, 0.95, 1e-300)
        assert torch.allclose(f1, f2, rtol=1e-12, atol=0)


def test_rnnprop_features_not_invariant_for_gradients_near_eps():
    """The documented limit: with eps = 1e-8, gradients ~1e-8 give visibly smaller features."""
    g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    zeros, step = torch.zeros(2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    big, _, _ = rnnprop_features(g, zeros, zeros, step, 0.95, 0.95, 1e-8)
    tiny, _, _ = rnnprop_features(1e-8 * g, zeros, zeros, step, 0.95, 0.95, 1e-8)
    assert torch.allclose(big, torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64))
    assert torch.allclose(tiny, big / 2)  # s = |g| + eps = 2|g|


@pytest.mark.parametrize("rule_idx", [0, 1])
def test_state_dict_resume_is_bit_identical(rule_idx):
    rule = _rules()[rule_idx]
    straight = _mlp()
    opt = LearnedOptimizer(straight.parameters(), rule)
    _run(straight, opt, 40)

    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), rule)
    _run(model, opt, 20)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _mlp(seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = LearnedOptimizer(resumed.parameters(), rule)
    opt2.load_state_dict(ckpt["opt"])
    _run(resumed, opt2, 20)
    for p1, p2 in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p1, p2)


def test_param_groups_equal_separate_optimizers():
    rule = _rules()[0]
    a = _mlp()
    opt = LearnedOptimizer([{"params": a[0].parameters()},
                            {"params": a[2].parameters(), "lr": 0.5, "weight_decay": 0.1}], rule)
    _run(a, opt, 15)
    b = _mlp()
    o1 = LearnedOptimizer(b[0].parameters(), rule)
    o2 = LearnedOptimizer(b[2].parameters(), rule, lr=0.5, weight_decay=0.1)
    x, y = _data()
    for _ in range(15):
        o1.zero_grad()
        o2.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        o1.step()
        o2.step()
    for p1, p2 in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=0)


def test_params_without_grad_are_skipped_and_keep_their_own_step_count():
    rule = _rules()[0]
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = LearnedOptimizer([w1, w2], rule)
    r1, r2 = w1.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    ref1, ref2 = LearnedOptimizer([r1], rule), LearnedOptimizer([r2], rule)
    for t in range(6):
        opt.zero_grad(set_to_none=True)
        loss = (w1**2).sum() + ((w2 - 1) ** 2).sum() if t % 2 == 0 else (w1**2).sum()
        loss.backward()
        before = w2.detach().clone()
        opt.step()
        if t % 2 == 1:  # w2 had no gradient: untouched
            assert torch.equal(w2, before)
        ref1.zero_grad()
        (r1**2).sum().backward()
        ref1.step()
        if t % 2 == 0:
            ref2.zero_grad()
            ((r2 - 1) ** 2).sum().backward()
            ref2.step()
    assert opt.state[w1]["step"].item() == 6 and opt.state[w2]["step"].item() == 3
    assert torch.allclose(w1, r1, atol=1e-6) and torch.allclose(w2, r2, atol=1e-6)


@pytest.mark.parametrize("rule_idx", [0, 1])
def test_adapter_matches_reference_path_per_parameter(rule_idx):
    """Ground truth: each parameter alone through the plain reference equations.

    A small ``chunk_size`` makes the adapter step the 40-element parameter alone (in place) and
    batch the others (state copied in and out), with gradients switched off and on so that step
    counts differ within a batch.
    """
    rule = _rules()[rule_idx].double()
    rule.chunk_size = 16
    update_fn = rnnprop_update if isinstance(rule, RNNprop) else dm_update
    torch.manual_seed(0)
    shapes = [(40,), (5,), (7, 1), (3,), (9,), (), (0, 2)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    opt = LearnedOptimizer(params, rule)
    theta = [p.detach().clone().reshape(-1) for p in params]
    states = [rule.init_state(t.numel(), dtype=torch.float64) for t in theta]
    for t in range(6):
        for i, p in enumerate(params):
            skip = (i + t) % 3 == 0
            p.grad = None if skip else torch.randn_like(p) * 10.0 ** ((i + t) % 5 - 2)
            if not skip:
                with torch.no_grad():
                    u, states[i] = update_fn(rule, p.grad.reshape(-1), states[i], reference=True)
                theta[i] += u
        opt.step()
    for p, want, st in zip(params, theta, states):
        assert torch.allclose(p.detach().reshape(-1), want, atol=1e-12, rtol=0)
        for k in rule.state_layout:
            assert torch.allclose(opt.state[p][k], st[k], atol=1e-12, rtol=0), k
        assert opt.state[p]["step"].item() == st["step"].item()


def test_skipped_param_state_owns_its_memory_and_checkpoint_stays_small():
    """State of a parameter without grad is its own, not a view that pins other state, and the
    state of the others is not copied when the set of parameters with grads changes."""
    big = torch.zeros(20000, requires_grad=True)
    small = torch.zeros(10, requires_grad=True)
    opt = LearnedOptimizer([big, small], _rules()[0])
    big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
    opt.step()
    ptrs = {k: t.data_ptr() for k, t in opt.state[big].items()}
    for t in range(4):
        small.grad = None if t % 2 == 0 else torch.ones_like(small)
        opt.step()
    assert ptrs == {k: t.data_ptr() for k, t in opt.state[big].items()}
    for p in (big, small):
        for t in opt.state[p].values():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    floats = 82 * (big.numel() + small.numel())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert 4 * floats < buf.tell() < 4 * floats + 20_000  # + pickle/zip overhead
    buf = io.BytesIO()
    torch.save(opt.state_dict()["state"][1], buf)
    assert buf.tell() < 4 * 82 * small.numel() + 20_000


def _stepped(rule, numel=4):
    w = torch.ones(numel, requires_grad=True)
    opt = LearnedOptimizer([w], rule)
    w.grad = torch.ones_like(w)
    opt.step()
    return opt


def test_load_state_dict_refuses_state_that_does_not_fit():
    rnnprop, dm = _rules()
    cases = [
        (_stepped(rnnprop).state_dict(), dm, 4, "keys .*'m'.* rule 'dm'"),
        (_stepped(dm).state_dict(), rnnprop, 4, "keys .* rule 'rnnprop' keeps .*'m'"),
        (_stepped(rnnprop).state_dict(), rnnprop, 5, "parameter 0 has shape \\(4,\\), expected \\(5,\\)"),
        (_stepped(RNNprop(hidden=8)).state_dict(), rnnprop, 4, "'h' of parameter 0 has shape"),
    ]
    w = torch.ones(4, requires_grad=True)
    adam = torch.optim.Adam([w])
    w.grad = torch.ones_like(w)
    adam.step()
    cases.append((adam.state_dict(), rnnprop, 4, "exp_avg"))
    for sd, rule, numel, match in cases:
        opt = _stepped(rule, numel)
        before = {k: t.clone() for k, t in opt.state[opt.param_groups[0]["params"][0]].items()}
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        after = opt.state[opt.param_groups[0]["params"][0]]
        assert all(torch.equal(after[k], t) for k, t in before.items())  # left unchanged
        assert opt.param_groups[0]["lr"] == 1.0 and "betas" not in opt.param_groups[0]


def test_state_is_zero_copy_between_steps():
    rule = _rules()[0]
    m = _mlp()
    opt = LearnedOptimizer(m.parameters(), rule)
    _run(m, opt, 2)
    ptrs = {id(p): opt.state[p]["h"].data_ptr() for p in m.parameters()}
    _run(m, opt, 2)
    assert ptrs == {id(p): opt.state[p]["h"].data_ptr() for p in m.parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    rule = _rules()[0]
    m = _mlp(dtype=dtype)
    opt = LearnedOptimizer(m.parameters(), rule)
    _run(m, opt, 5)
    want = torch.float32 if dtype is torch.bfloat16 else dtype
    for p in m.parameters():
        assert p.dtype is dtype and opt.state[p]["h"].dtype is want and opt.state[p]["m"].dtype is want
    sd = opt.state_dict()
    opt2 = LearnedOptimizer(m.parameters(), rule)
    opt2.load_state_dict(sd)
    for p in m.parameters():
        assert opt2.state[p]["v"].dtype is want
        assert torch.equal(opt2.state[p]["v"], opt.state[p]["v"])


def test_float64_matches_float32_closely():
    rule = _rules()[0]
    a, b = _mlp(), _mlp(dtype=torch.float64)
    _run(a, LearnedOptimizer(a.parameters(), rule), 10)
    _run(b, LearnedOptimizer(b.parameters(), rule), 10)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-4)


def test_closure_loss_is_returned_and_training_moves_params():
    rule = _rules()[0]
    w = torch.ones(3, requires_grad=True)
    opt = LearnedOptimizer([w], rule)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert not torch.equal(w.detach(), torch.ones(3))


def test_bad_arguments_raise_value_errors():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        LearnedOptimizer([w], RNNprop(), lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LearnedOptimizer([w], RNNprop(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="LearnedRule"):
        LearnedOptimizer([w], 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LearnedOptimizer([], RNNprop())


@pytest.mark.parametrize("dtype", [torch.long, torch.complex64])
def test_non_float_params_refused_up_front(dtype):
    w = torch.zeros(2, requires_grad=True)
    bad = torch.zeros(2, dtype=dtype)
    with pytest.raises(ValueError, match="floating-point"):
        LearnedOptimizer([w, bad], RNNprop())
    opt = LearnedOptimizer([w], RNNprop())
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1  # the refused group was not added
    opt.param_groups[0]["params"].append(bad)  # bypassing add_param_group: caught at step
    bad.grad = torch.zeros_like(bad)
    with pytest.raises(ValueError, match="floating-point"):
        opt.step()


def test_meta_weights_are_copied_and_frozen():
    rule = RNNprop()
    w = torch.zeros(2, requires_grad=True)
    opt = LearnedOptimizer([w], rule)
    with torch.no_grad():
        rule.output.bias.fill_(5.0)
    assert opt.rule.output.bias.item() == 0.0
    assert not any(p.requires_grad for p in opt.rule.parameters())


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))],
                         ids=["deepcopy", "pickle"])
def test_optimizer_copies_continue_like_the_original(clone):
    """torch.optim pickles only defaults, state and param_groups; the rule must travel too, and
    the copy (model and optimizer together, as one object graph) then trains exactly alike."""
    rule = _rules()[0]
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), rule)
    _run(model, opt, 3)
    model2, opt2 = clone((model, opt))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    _run(model, opt, 3)
    _run(model2, opt2, 3)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(opt2.state[next(model2.parameters())]["h"], opt.state[next(model.parameters())]["h"])


def test_load_state_dict_with_other_groups_names_the_groups():
    """Same parameter count, other group structure: the error is torch.optim's about the groups,
    not a misleading shape mismatch from pairing parameters across groups."""
    rule = _rules()[0]
    a, b = torch.ones(4, requires_grad=True), torch.ones(6, requires_grad=True)
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b]}], rule)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    other = LearnedOptimizer([torch.ones(6, requires_grad=True), torch.ones(4, requires_grad=True)],
                             rule)
    with pytest.raises(ValueError, match="number of parameter groups"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("config", [
    {"rule": "rnnprop", "preproc": -1}, {"rule": "rnnprop", "eps": float("nan")},
    {"rule": "rnnprop", "out_scale": float("nan")}, {"rule": "dm", "p": float("nan")},
    {"rule": "dm", "out_scale": -0.1}, {"rule": "rnnprop", "hidden": 0},
])
def test_bad_rule_configs_raise_value_error(config):
    """The zoo turns ValueError/TypeError from a card's rule_config into one ZooError line; a
    RuntimeError (nn.Linear with a negative size) or a NaN accepted silently would escape that."""
    with pytest.raises(ValueError, match="must be positive"):
        build_rule(config)


def test_non_contiguous_and_channels_last_params_step_like_contiguous_ones():
    """State is kept in the parameter's logical (row-major) order whatever its strides."""
    rule = _rules()[0]
    torch.manual_seed(0)
    odd = [torch.randn(3, 4).t().detach().requires_grad_(),  # transposed strides
           torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()]
    plain = [p.detach().contiguous().requires_grad_() for p in odd]
    assert not any(p.is_contiguous() for p in odd)
    opts = [LearnedOptimizer(odd, rule), LearnedOptimizer(plain, rule)]
    weights = [torch.arange(float(p.numel())).view(p.shape) for p in plain]
    for _ in range(3):
        for params, opt in zip((odd, plain), opts):
            opt.zero_grad()
            sum(((w * p - 1) ** 2).sum() for w, p in zip(weights, params)).backward()
            opt.step()
    for p, q in zip(odd, plain):
        assert torch.equal(p, q) and not p.is_contiguous()



def test_changing_opt_rule_after_steps_takes_effect():
    """The per-device copy made at the first step follows ``opt.rule``: weights loaded into it, a
    replaced rule, or another ``chunk_size`` are used from the next step on."""
    torch.manual_seed(0)
    old = RNNprop()
    torch.manual_seed(1)
    new = RNNprop()
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), old)
    _run(model, opt, 2)
    stale, stale_opt = copy.deepcopy((model, opt))       # goes on with the old weights
    twin, twin_opt = copy.deepcopy((model, opt))
    opt.rule.load_state_dict(new.state_dict())           # in place
    twin_opt.rule = copy.deepcopy(new).requires_grad_(False)   # replaced
    for m, o in ((model, opt), (stale, stale_opt), (twin, twin_opt)):
        _run(m, o, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), stale.parameters()))
    opt.rule.chunk_size = 7
    _run(model, opt, 1)
    assert [net.chunk_size for _, net in opt._nets.values()] == [7]


def test_chunk_rows_are_small_on_the_cpu_and_large_on_a_gpu():
    """CPU: 8192-row network calls keep activations in cache; GPU: each call costs ~60 kernel
    launches, so chunks are 2^20 rows there (devices named, not used: no GPU needed)."""
    rule = RNNprop()
    assert rule.chunk_rows("cpu") == 8192 and rule.chunk_rows("cuda:0") == 1 << 20
    n = 3 * (1 << 20) + 5
    assert [s.stop - s.start for s in rule._chunks(n, "cuda")] == [1 << 20] * 3 + [5]
    assert len(rule._chunks(n, "cpu")) == math.ceil(n / 8192)
    rule.gpu_chunk_size = 0
    assert rule._chunks(n, "cuda") == [slice(0, n)]


def test_features_with_a_graph_equal_the_plain_ones_and_keep_gradients_finite():
    """Second-order meta-training feeds the rules gradients that carry a graph; exact zeros (a
    dead unit, a coordinate that never gets gradient) must give the same features as without
    one, and a finite (not nan) derivative: sqrt(v) at v = 0 and log|g| at g = 0 have none."""
    from autol2o.optimizers.dm import dm_features
    from autol2o.optimizers.rnnprop import rnnprop_features

    g = torch.tensor([0.0, 1e-9, -3e-6, 0.2, -4.0])
    zeros = torch.zeros(5)
    plain = rnnprop_features(g, zeros, zeros, torch.tensor(1.0), 0.95, 0.95, 1e-8)[0]
    plain_dm = dm_features(g, 10.0)
    x = g.clone().requires_grad_(True)
    feats = rnnprop_features(x, zeros, zeros, torch.tensor(1.0), 0.95, 0.95, 1e-8)[0]
    feats_dm = dm_features(x, 10.0)
    assert torch.equal(feats.detach(), plain) and torch.equal(feats_dm.detach(), plain_dm)
    (grad,) = torch.autograd.grad(feats.sum() + feats_dm.sum(), x)
    assert torch.isfinite(grad).all()
    # at g = 0 (v = 0, s = eps): d(g/s)/dg = d(m^/s)/dg = 1/eps; DM: log|g| is clamped
    # (derivative 0), the sign input is clamp(g e^p, -1, 1) (derivative e^p)
    assert float(grad[0]) == pytest.approx(2 / 1e-8 + math.exp(10.0), rel=1e-5)
