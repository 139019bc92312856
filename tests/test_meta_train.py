"""Meta-training end to end on tiny tasks: learning happens, resume is exact, NaN runs are dropped,
batched runs equal separate runs."""

import math
import re

import pytest
import torch

import autol2o.meta.trainer as trainer_mod
from autol2o.errors import UserError
from autol2o.meta import Task, TrainConfig, build_task, evaluate, meta_train
from autol2o.meta.tasks import generators, mix_seed
from autol2o.meta.trainer import _Run
from autol2o.optimizers import DMOptimizer, RNNprop
from autol2o.zoo import load_entry

pytestmark = pytest.mark.usefixtures("one_thread")


def _rule(seed=0):
    torch.manual_seed(seed)
    return RNNprop()


def test_tiny_meta_training_lowers_the_loss():
    task = build_task("quadratic")
    rule = _rule()
    before = evaluate(rule, task, steps=20, runs=16, seed=123).final_loss
    cfg = TrainConfig(horizon=20, unroll=5, iterations=30, batch=8, meta_lr=3e-3, seed=1)
    res = meta_train(rule, task, cfg, progress=False)
    after = evaluate(rule, task, steps=20, runs=16, seed=123).final_loss
    assert len(res.history) == 30 and res.diverged == 0
    assert after < 0.7 * before, (before, after)
    first = sum(h["meta_loss"] for h in res.history[:8]) / 8
    last = sum(h["meta_loss"] for h in res.history[-8:]) / 8
    assert last < first
    card = res.card_fields
    assert card["training"]["meta_iterations"] == 30 and card["tasks"] == [task.spec]
    assert card["hardware"]["torch"] == torch.__version__


def test_mean_loss_dm_with_tricks_and_validation_keeps_best():
    task = build_task("quadratic")
    torch.manual_seed(0)
    rule = DMOptimizer()
    cfg = TrainConfig(horizon=10, unroll=5, iterations=6, batch=2, meta_loss="mean",
                      random_scaling=1.0, convex_combination=True, validate_every=2, val_runs=4,
                      meta_lr=1e-3, grad_clip=1.0)
    res = meta_train(rule, task, cfg, progress=False)
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    initial = res.card_fields["validation"]["initial_val_loss"]
    assert len(vals) == 3 and res.best_val == min([initial, *vals])
    assert res.best_iteration == 2 * ([initial, *vals].index(res.best_val))
    # the returned rule carries the best weights: re-validating it reproduces the best value
    again = evaluate(res.rule, task, steps=10, runs=4, seed=cfg.val_seed).final_loss
    assert math.isclose(again, res.best_val, rel_tol=1e-5)


def test_validation_keeps_the_starting_weights_when_training_makes_them_worse():
    """A warm start is validated before the first update: with a meta-lr that wrecks the rule,
    the starting weights come back (iteration 0), unchanged."""
    task = build_task("quadratic")
    rule = _rule()
    start = {k: v.clone() for k, v in rule.state_dict().items()}
    cfg = TrainConfig(horizon=10, unroll=5, iterations=4, batch=2, validate_every=2, val_runs=4,
                      meta_lr=5.0)
    res = meta_train(rule, task, cfg, progress=False)
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert min(vals) > res.card_fields["validation"]["initial_val_loss"] == res.best_val
    assert res.best_iteration == 0
    for k, v in res.rule.state_dict().items():
        assert torch.equal(v, start[k])


def test_cosine_meta_lr_schedule():
    """lr_i = lr (1 + cos(pi i / N)) / 2; the first update equals a constant-lr run's, later
    ones differ (so the schedule really reaches the meta-optimizer)."""
    cfg = TrainConfig(meta_lr=1e-3, iterations=4, lr_schedule="cosine")
    assert [cfg.lr_at(i) for i in range(4)] == pytest.approx(
        [1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert TrainConfig(meta_lr=1e-3).lr_at(3) == 1e-3
    warm = TrainConfig(meta_lr=1e-3, iterations=4, lr_schedule="cosine", warmup=2)
    assert [warm.lr_at(i) for i in range(4)] == pytest.approx(
        [cfg.lr_at(0) / 3, cfg.lr_at(1) * 2 / 3, cfg.lr_at(2), cfg.lr_at(3)])
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")

    def weights(schedule, iterations):
        rule = _rule()
        meta_train(rule, build_task("quadratic"),
                   TrainConfig(horizon=4, unroll=2, iterations=iterations, batch=2, meta_lr=1e-2,
                               lr_schedule=schedule), progress=False)
        return torch.cat([p.detach().reshape(-1) for p in rule.parameters()])

    # one iteration: cos(0) = 1, so both schedules make the same single step
    torch.testing.assert_close(weights("cosine", 1), weights("constant", 1), rtol=0, atol=0)
    assert not torch.equal(weights("cosine", 3), weights("constant", 3))


def test_curriculum_horizons():
    cfg = TrainConfig(iterations=40, curriculum=[10, 20, 40, 80])
    assert [cfg.horizon_at(i) for i in (0, 9, 10, 25, 39)] == [10, 10, 20, 40, 80]
    # uneven shares: stage i starts at i * iterations // n, as `zoo train --curriculum` lays out
    assert TrainConfig(iterations=1000, curriculum=[10, 20, 40]).curriculum == (
        (0, 10), (333, 20), (666, 40))
    res = meta_train(_rule(), build_task("quadratic"),
                     TrainConfig(horizon=4, unroll=2, iterations=6, batch=2,
                                 curriculum=((0, 4), (2, 6))), progress=False)
    assert [h["horizon"] for h in res.history] == [4, 4, 6, 6, 6, 6]


@pytest.mark.parametrize(("ema", "relative"), [(0.0, False), (0.5, False), (0.0, True)])
def test_resume_after_a_kill_continues_exactly(tmp_path, monkeypatch, ema, relative):
    # relative: the killed run resumes mid-run (unroll 4 of horizon 12), so its step-0 loss,
    # which scales every later unroll's meta-loss, must come back with it
    task = build_task("mlp-digits")
    cfg = TrainConfig(horizon=12, unroll=4, iterations=9, batch=2, meta_lr=1e-3, seed=3,
                      random_scaling=3.0, convex_combination=True, validate_every=4, val_runs=2,
                      checkpoint_every=2, ema=ema, relative_loss=relative)
    ref = meta_train(_rule(), task, cfg, progress=False)

    calls = {"n": 0}
    real = trainer_mod._unroll

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during iteration 6; the last checkpoint is at iteration 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_unroll", dying)
    with pytest.raises(KeyboardInterrupt):
        meta_train(_rule(), task, cfg, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(trainer_mod, "_unroll", real)
    resumed_rule = _rule(seed=99)  # different init: everything must come from the checkpoint
    res = meta_train(resumed_rule, task, cfg, checkpoint_dir=tmp_path, resume=True,
                     progress=False)
    for a, b in zip(ref.rule.state_dict().values(), res.rule.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [h["meta_loss"] for h in res.history] == [h["meta_loss"] for h in ref.history]
    assert res.best_iteration == ref.best_iteration
    assert res.card_fields["validation"] == ref.card_fields["validation"]  # incl. the initial
    if ema or relative:  # the asserts above covered them; the config checks below run once
        return
    # a checkpoint made with a different config is refused
    with pytest.raises(Exception, match="different config"):
        meta_train(_rule(), task, TrainConfig(horizon=12, unroll=3, iterations=9, batch=2),
                   checkpoint_dir=tmp_path, resume=True, progress=False)
    # a checkpoint from before the schedule fields existed resumes under their defaults
    ck_path = tmp_path / trainer_mod.CHECKPOINT
    ck = torch.load(ck_path, weights_only=True)
    for key in ("lr_schedule", "warmup"):
        del ck["config"][key]
    torch.save(ck, ck_path)
    more = TrainConfig(**{**cfg.to_dict(), "iterations": 10, "curriculum": ()})
    meta_train(_rule(), task, more, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_ema_returns_the_running_average_of_the_iterates():
    """w_avg_k = ema * w_avg_{k-1} + (1 - ema) * w_k from w_avg_0 = w_0, computed from the plain
    run's iterates (averaging must not change the training trajectory itself)."""
    task = build_task("quadratic")
    kw = {"horizon": 10, "unroll": 5, "batch": 2, "meta_lr": 1e-2, "seed": 4}
    iterates = [_rule().state_dict()]
    for k in (1, 2, 3):
        rule = _rule()
        meta_train(rule, task, TrainConfig(iterations=k, **kw), progress=False)
        iterates.append(rule.state_dict())
    trained = _rule()
    res = meta_train(trained, task, TrainConfig(iterations=3, ema=0.5, **kw), progress=False)
    for name, got in res.rule.state_dict().items():
        w = [it[name] for it in iterates]
        expected = 0.125 * w[0] + 0.125 * w[1] + 0.25 * w[2] + 0.5 * w[3]
        torch.testing.assert_close(got, expected)
        assert torch.equal(trained.state_dict()[name], w[3])  # the raw iterate is untouched
    assert res.card_fields["training"]["ema"] == 0.5
    assert all(p.requires_grad for p in res.rule.parameters())  # trainable again (fine-tuning)


def test_cosine_run_cannot_be_lengthened_on_resume(tmp_path):
    """The cosine schedule is laid out over ``iterations``: resuming with another count would
    jump the learning rate, so it is refused (a constant-lr run may be extended)."""
    task = build_task("quadratic")
    cfg = TrainConfig(horizon=4, unroll=2, iterations=2, batch=1, lr_schedule="cosine")
    meta_train(_rule(), task, cfg, checkpoint_dir=tmp_path, progress=False)
    longer = TrainConfig(horizon=4, unroll=2, iterations=4, batch=1, lr_schedule="cosine")
    with pytest.raises(UserError, match="cosine schedule is laid out over its iterations"):
        meta_train(_rule(), task, longer, checkpoint_dir=tmp_path, resume=True, progress=False)


class _Exploding(Task):
    """Quadratic bowl whose loss turns NaN at step 7 of every run."""

    kind = "exploding"

    def __init__(self):
        super().__init__({"kind": self.kind, "name": "exploding"}, 4)

    def init_params(self, gens):
        return torch.stack([torch.randn(4, generator=g) for g in gens])

    def batch(self, plan, t):
        return t

    def loss(self, theta, batch):
        loss = (theta ** 2).sum(1)
        return loss * math.nan if batch == 7 else loss


def test_nan_guard_drops_and_counts_diverged_runs():
    rule = _rule()
    cfg = TrainConfig(horizon=10, unroll=5, iterations=4, batch=3, meta_lr=1e-3)
    res = meta_train(rule, _Exploding(), cfg, progress=False)
    assert res.diverged == 2  # iterations 2 and 4 reach step 7
    assert [h["meta_loss"] is None for h in res.history] == [False, True, False, True]
    assert all(torch.isfinite(p).all() for p in rule.parameters())


def test_batched_meta_unroll_equals_separate_runs():
    task = build_task("mlp-digits")
    cfg = TrainConfig(batch=3, random_scaling=3.0, convex_combination=True)
    rule = _rule()
    seeds = [101, 202, 303]
    together = _Run([task], rule, cfg, 0, seeds, horizon=10).unroll(rule, 4, "mean")
    for b, s in enumerate(seeds):
        alone = _Run([task], rule, cfg, 0, [s], horizon=10).unroll(rule, 4, "mean")
        assert torch.allclose(alone[0], together[b], rtol=1e-5)


def test_train_to_zoo_writes_a_loadable_entry_with_a_full_card(tmp_path):
    from autol2o.meta import train_to_zoo
    from autol2o.zoo import load_entry

    cfg = TrainConfig(horizon=6, unroll=3, iterations=4, batch=2, validate_every=2, val_runs=2,
                      random_scaling=3.0, convex_combination=True)
    five = '{"kind": "quadratic", "name": "quad5", "dim": 5}'   # a task given as a JSON spec
    out = train_to_zoo("rnnprop", ["quadratic", five], cfg, tmp_path / "tiny", None, "cpu", False,
                       "autol2o zoo train --rule rnnprop --task quadratic --task ...")
    rule, card = load_entry(out)
    assert isinstance(rule, RNNprop) and not (out / "checkpoint").exists()
    assert card["command"].startswith("autol2o zoo train")
    assert card["trained_on"] == ["quadratic", "quad5"] and card["tasks"][1]["dim"] == 5
    assert card["tricks"]["random_scaling"] == 3.0 and card["tricks"]["convex_combination"]
    assert card["training"]["horizon"] == 6 and card["training"]["meta_iterations"] == 4
    assert card["training"]["diverged"] == 0 and card["validation"]["best_val_loss"] > 0
    assert card["hardware"]["cpu_count"] >= 1 and card["wall_time_s"] >= 0


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    """Under ``nohup ... > log`` (stderr not a terminal) progress is one plain line every few
    iterations instead of a live bar that would only appear at the end."""
    meta_train(_rule(), build_task("quadratic"),
               TrainConfig(horizon=4, unroll=2, iterations=40, batch=1, validate_every=20,
                           val_runs=1), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("meta-train")]
    # every min(50, iterations // 20) = 2 iterations
    assert [ln.split()[1] for ln in lines] == [f"{i}/40" for i in range(2, 41, 2)]
    assert "val" in lines[-1] and "(best" in lines[-1]


def test_validation_across_tasks_is_a_geometric_mean(monkeypatch):
    # losses on unrelated scales: each task's relative change must count the same
    # (final loss over the runs that stayed finite, runs that diverged) per evaluation
    results = iter([(2.0, 0), (0.01, 0), (2.0, 0), (0.02, 0), (1.0, 0), (math.nan, 4),
                    (1.0, 0), (0.01, 3)])

    class Res:
        def __init__(self):
            self.final_loss, self.diverged = next(results)

    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: Res())
    cfg = TrainConfig(horizon=10, unroll=5)
    tasks = [build_task("quadratic"), build_task("quadratic")]
    assert trainer_mod._validate(_rule(), tasks, cfg) == pytest.approx(math.sqrt(2.0 * 0.01))
    # doubling the small task's loss is as bad as doubling the large one's
    assert trainer_mod._validate(_rule(), tasks, cfg) == pytest.approx(math.sqrt(2.0 * 0.02))
    assert trainer_mod._validate(_rule(), tasks, cfg) == math.inf  # every run diverged
    # 3 of 4 runs diverged: the survivor's fine loss must not make these weights the best
    assert trainer_mod._validate(_rule(), tasks, cfg) == math.inf


@pytest.mark.parametrize("change, message", [
    ({"iterations": 0}, "--iterations must be >= 1, got 0"),
    ({"validate_every": -1}, "--validate-every must be >= 0, got -1"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0, got -1"),
    ({"meta_lr": -1.0}, "--meta-lr must be a finite number > 0"),
    ({"meta_lr": math.nan}, "--meta-lr must be a finite number > 0"),
    ({"ema": 1.0}, "--ema must lie in [0, 1), got 1.0"),
    ({"meta_batch_size": -1}, "--meta-batch-size must be >= 0, got -1"),
    ({"unroll": 50, "horizon": 10}, "--unroll 50 must be <= the horizon (10)"),
    ({"unroll": 50, "curriculum": ((0, 10), (2, 20))}, "--unroll 50 must be <= the horizon (20)"),
    ({"curriculum": ((0, 10), (0, 20))}, "two stages start at iteration 0"),
    ({"curriculum": ((0, 10), (100, 20)), "iterations": 4}, "100:20 starts at or after"),
])
def test_config_rejects_values_that_would_be_silently_misread(change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig(**{"horizon": 10, "unroll": 5, "iterations": 4, **change})
    # a curriculum stage shorter than the unroll is allowed: it is unrolled whole
    TrainConfig(horizon=10, unroll=8, iterations=4, curriculum=((0, 4), (2, 10)))


def _checkpointed(tmp_path, task, **kw):
    """A finished 4-iteration run that left its checkpoint in tmp_path (as a kill after the last
    checkpoint would), with validation on."""
    cfg = TrainConfig(horizon=4, unroll=2, iterations=4, batch=1, validate_every=2, val_runs=1,
                      checkpoint_every=2, **kw)
    meta_train(_rule(), task, cfg, checkpoint_dir=tmp_path, progress=False)
    return cfg


@pytest.mark.parametrize("field, value", [("validate_every", 0), ("validate_every", 1),
                                          ("val_runs", 2), ("val_steps", 3), ("val_seed", 1)])
def test_resume_refuses_to_change_what_best_means(tmp_path, field, value):
    """The best weights so far are in the checkpoint: resuming with validation off used to return
    them instead of the final ones, and other validation settings would compare unlike scores."""
    task = build_task("quadratic")
    cfg = _checkpointed(tmp_path, task)
    changed = TrainConfig(**{**cfg.to_dict(), field: value})
    with pytest.raises(UserError, match=f"different config \\({field} "):
        meta_train(_rule(), task, changed, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_resume_refuses_other_tasks_data_rule_or_fewer_iterations(tmp_path):
    task = build_task("mlp-digits")
    cfg = _checkpointed(tmp_path, task)

    def resume(tasks, config=cfg, rule=None):
        return meta_train(rule or _rule(), tasks, config, checkpoint_dir=tmp_path, resume=True,
                          progress=False)

    with pytest.raises(UserError, match="checkpoint was made with tasks mlp-digits; got "
                                        "digits-nn-relu$"):
        resume(build_task("digits-nn-relu"))  # same shapes: used to resume and mislabel
    with pytest.raises(UserError, match="tasks mlp-digits; got quadratic"):
        resume(build_task("quadratic"))       # used to crash on tensor sizes
    other = build_task("mlp-digits")
    other.x = other.x.flip(0)                 # same spec, other files (--data-dir)
    with pytest.raises(UserError, match="task mlp-digits's training data differs"):
        resume(other)
    torch.manual_seed(0)
    with pytest.raises(UserError, match="checkpoint was made with rule rnnprop; got dm$"):
        resume(task, rule=DMOptimizer())
    with pytest.raises(UserError, match="checkpoint is at iteration 4; --iterations 3 is below"):
        resume(task, TrainConfig(**{**cfg.to_dict(), "iterations": 3}))
    # checkpoint_every may change and iterations grow; checkpoints without the identity fields
    # (older versions) are not checked
    ck_path = tmp_path / trainer_mod.CHECKPOINT
    ck = torch.load(ck_path, weights_only=True)
    for key in ("tasks", "val_tasks", "data", "rule_config"):
        del ck[key]
    torch.save(ck, ck_path)
    res = resume(other, TrainConfig(**{**cfg.to_dict(), "iterations": 5, "checkpoint_every": 0}))
    assert len(res.history) == 5


def test_train_to_zoo_resume_needs_a_checkpoint(tmp_path):
    """--resume with nothing to resume used to start a fresh run silently."""
    from autol2o.meta import train_to_zoo

    cfg = TrainConfig(horizon=4, unroll=2, iterations=2, batch=1)
    with pytest.raises(UserError, match="checkpoint: no checkpoint to resume$"):
        train_to_zoo("rnnprop", ["quadratic"], cfg, tmp_path / "e", None, "cpu", True, "cmd")
    assert not (tmp_path / "e").exists()


def test_launch_shares_the_checks_and_reports_one_line(tmp_path, capsys):
    from autol2o.meta import launch

    base = ["--task", "quadratic", "--horizon", "4", "--unroll", "2", "--batch", "1",
            "--iterations", "2", "--out", str(tmp_path / "e")]
    assert launch.main([*base, "--validate-every", "-1"]) == 2
    assert capsys.readouterr().err == "error: --validate-every must be >= 0, got -1\n"
    assert launch.main([*base, "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert launch.main(base) == 0
    assert launch.main(base) == 2  # an existing entry is only replaced with --overwrite
    assert "already exists (use --overwrite" in capsys.readouterr().err
    assert launch.main([*base, "--overwrite", "--ema", "0.9"]) == 0
    assert load_entry(tmp_path / "e")[1]["training"]["ema"] == 0.9
    assert launch.main([*base, "--overwrite", "--ema", "1.5"]) == 2
    assert "--ema must lie in [0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    ["--rule", "rnnprop"], ["--rule", "dm"], ["--rule", "rnnprop", "--no-convex"],
    ["--rule", "rnnprop", "--meta-batch-size", "64"],
    ["--rule", "rnnprop", "--meta-data", "heldout"],
    ["--rule", "rnnprop", "--relative-loss"],
    ["--rule", "rnnprop", "--second-order"],
    ["--rule", "dm", "--convex", "--meta-lr", "0.01", "--iterations", "7"]])
def test_launch_builds_the_config_zoo_train_builds(tmp_path, monkeypatch, extra):
    """The torchrun entry point defaults like ``zoo train`` (the rule's paper recipe: tricks
    for RNNprop, the mean meta-loss for DM), so a scaled-out job trains what zoo train would."""
    from typer.testing import CliRunner

    import autol2o.meta as meta
    from autol2o.cli import app
    from autol2o.meta import launch

    seen = []

    def capture(rule, tasks, config, *a, **k):
        seen.append(config.to_dict())
        return tmp_path

    monkeypatch.setattr(meta, "train_to_zoo", capture)
    monkeypatch.setattr(launch, "train_to_zoo", capture)
    base = ["--task", "quadratic", "--out", str(tmp_path / "e"), *extra]
    res = CliRunner().invoke(app, ["zoo", "train", *base, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert launch.main(base) == 0
    assert len(seen) == 2 and seen[0] == seen[1]
    dm = "dm" in extra
    assert seen[0]["meta_loss"] == ("mean" if dm else "last")
    assert seen[0]["random_scaling"] == (0.0 if dm else 3.0)
    assert seen[0]["convex_combination"] == (("--convex" in extra) if dm
                                             else "--no-convex" not in extra)
    assert seen[0]["relative_loss"] == ("--relative-loss" in extra)
    assert seen[0]["second_order"] == ("--second-order" in extra)


def test_launch_card_command_spells_out_every_setting_and_reproduces_the_entry(tmp_path):
    """The card's command names every setting that decides the weights (not the defaults of the
    day), and running it again gives the same weights."""
    import shlex

    from autol2o.meta import launch

    assert launch.main(["--task", "quadratic", "--horizon", "4", "--unroll", "2", "--batch", "1",
                        "--iterations", "3", "--no-convex", "--second-order",
                        "--out", str(tmp_path / "a")]) == 0
    card = load_entry(tmp_path / "a")[1]
    words = shlex.split(card["command"])
    assert words[:5] == ["torchrun", "--nproc_per_node", "1", "-m", "autol2o.meta.launch"]
    for flag in ("--meta-lr", "--random-scaling", "--meta-loss", "--val-runs", "--seed"):
        assert flag in words, flag
    assert words[words.index("--random-scaling") + 1] == "3.0" and "--no-convex" in words
    assert "--second-order" in words and card["training"]["second_order"] is True
    words[words.index("--out") + 1] = str(tmp_path / "b")
    assert launch.main(words[5:]) == 0
    assert load_entry(tmp_path / "b")[1]["sha256"] == card["sha256"]


def _first_meta_loss(**scale) -> float:
    """The first meta-iteration's meta-loss on the quadratic, seed 3, under a loss scale."""
    cfg = TrainConfig(horizon=10, unroll=5, iterations=1, batch=1, seed=3, **scale)
    return meta_train(_rule(), build_task("quadratic"), cfg, progress=False).history[0]["meta_loss"]


def test_log_loss_meta_objective_is_the_log_of_the_plain_one():
    # same run, same first segment: only the objective's scale differs
    assert _first_meta_loss(log_loss=True) == pytest.approx(math.log(_first_meta_loss()), rel=1e-5)


def test_relative_loss_divides_the_meta_objective_by_the_runs_initial_loss():
    task = build_task("quadratic")
    # the run meta_train draws first, rebuilt from its sampler: loss0 is f(theta_0; batch 0)
    sampler = torch.Generator().manual_seed(mix_seed(3, 0x5A3, 0))
    torch.randint(1, (), generator=sampler)  # the task index (one task)
    seeds = torch.randint(0, 2**62, (1,), generator=sampler).tolist()
    run = _Run([task], _rule(), TrainConfig(), 0, seeds, horizon=10)
    gens = generators(seeds)
    theta0 = task.init_params(gens)
    assert torch.allclose(run.loss0, task.loss(theta0, task.batch(task.make_plan(gens), 0)))
    assert _first_meta_loss(relative_loss=True) == pytest.approx(
        _first_meta_loss() / float(run.loss0), rel=1e-5)
    with pytest.raises(UserError, match="exclude each other"):
        TrainConfig(log_loss=True, relative_loss=True)


@pytest.mark.parametrize("meta_loss", ["last", "mean"])
def test_meta_batch_scores_the_meta_loss_on_its_own_batch_and_trains_on_the_minibatches(meta_loss):
    """With ``meta_batch_size`` the optimizee follows exactly the trajectory it follows without
    (it still trains on its minibatches); only the scored loss moves to a separate, larger batch
    of the training split: f(theta_t; meta batch t) at the scored steps."""
    task = build_task("mlp-digits")
    plain, scored = (TrainConfig(batch=2, random_scaling=3.0, convex_combination=True,
                                 meta_batch_size=n) for n in (0, 256))
    rule, seeds = _rule(), [11, 22]
    runs = {n: _Run([task], rule, cfg, 0, seeds, horizon=10) for n, cfg in ((0, plain), (256, scored))}
    thetas, losses = {}, {}
    for n, run in runs.items():
        losses[n] = run.unroll(rule, 4, meta_loss, n)
        thetas[n] = run.theta
    assert torch.equal(thetas[0], thetas[256])  # same updates, same minibatches
    run = runs[256]
    x, y = task.meta_batch(run.plan, 4, 256)
    assert x.shape[:2] == (2, 256) and not torch.equal(x[:, :128], task.batch(run.plan, 4)[0])
    if meta_loss == "last":
        expect = run.objective.loss(thetas[256], (x, y))
        assert torch.allclose(losses[256].detach(), expect, rtol=1e-6)
    assert not torch.allclose(losses[0].detach(), losses[256].detach())
    # drawn from the instance seeds: the same batch every time (resume, other optimizers)
    assert torch.equal(task.meta_batch(run.plan, 4, 256)[0], x)


def test_meta_batch_drawn_for_every_kind_of_sampled_data():
    for name in ("mlp-digits", "digits-cnn1", "sin-lstm"):
        task = build_task(name)
        plan = task.make_plan([torch.Generator().manual_seed(5)])
        x, y = task.meta_batch(plan, 3, 300)
        assert x.shape[:2] == (1, 300) and y.shape[:2] == (1, 300), name
    quad = build_task("quadratic")
    plan = quad.make_plan([torch.Generator().manual_seed(5)])
    assert quad.meta_batch(plan, 3, 300) is quad.batch(plan, 3)  # one fixed problem


# -- the held-out meta-objective (--meta-data heldout) -----------------------------------------
def test_heldout_batches_are_the_test_split():
    from autol2o.meta.data import load_digits

    task = build_task("digits-nn-relu")
    plan = task.make_plan([torch.Generator().manual_seed(s) for s in (1, 2)])
    xt, yt, _ = load_digits("test")
    # the meta-loss draws from the test split's first half; validation scores the second
    x, y = task.heldout_batch(plan, 3, 0)  # size 0: every such example, for each instance
    assert x.shape == (2, 180, 64) and torch.equal(x[1], xt[:180]) and torch.equal(y[0], yt[:180])
    x, y = task.heldout_batch(plan, 3, 50)  # a sample, per instance seed and step
    assert x.shape == (2, 50, 64) and not torch.equal(x[0], x[1])
    test_rows = {tuple(r) for r in xt[:180].tolist()}
    assert all(tuple(r) in test_rows for r in x.reshape(-1, 64).tolist())
    assert torch.equal(task.heldout_batch(plan, 3, 50)[0], x)
    with pytest.raises(UserError, match="trains on the 'test' split: it has no held-out split"):
        build_task({**task.spec, "split": "test"}).heldout_batch(plan, 0, 0)


def test_heldout_loss_is_the_mean_over_every_heldout_example(monkeypatch):
    import autol2o.meta.tasks as tasks_mod

    task = build_task("mlp-digits")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    theta, plan = task.init_params(gens), task.make_plan(gens)
    from autol2o.meta.data import load_digits

    xt, yt, _ = load_digits("test")
    second = (xt[180:].expand(2, 180, 64), yt[180:].expand(2, 180))
    whole = task.loss(theta, second)  # validation: the half the meta-loss never draws from
    monkeypatch.setattr(tasks_mod, "HELDOUT_CHUNK", 50)  # 180 = 50 + 50 + 50 + 30
    assert torch.allclose(task.heldout_loss(theta, plan), whole, rtol=1e-6)
    assert not torch.allclose(whole, task.loss(theta, task.heldout_batch(plan, 0, 0)))


def test_heldout_meta_loss_and_validation():
    """With meta_data="heldout" the optimizee follows the same trajectory (it trains on its
    minibatches); the scored loss is f(theta_t) over the held-out split, and validation scores
    the held-out loss at the final parameters."""
    task = build_task("mlp-digits")
    rule, seeds = _rule(), [11, 22]
    cfgs = {m: TrainConfig(batch=2, random_scaling=0.0, convex_combination=False, meta_data=m)
            for m in ("train", "heldout")}
    runs = {m: _Run([task], rule, cfg, 0, seeds, horizon=10) for m, cfg in cfgs.items()}
    losses = {m: run.unroll(rule, 4, "last", 0, m) for m, run in runs.items()}
    assert torch.equal(runs["train"].theta, runs["heldout"].theta)
    run = runs["heldout"]
    expect = task.loss(run.theta, task.heldout_batch(run.plan, 4, 0))
    assert torch.allclose(losses["heldout"].detach(), expect, rtol=1e-6)
    assert not torch.allclose(losses["train"].detach(), expect)

    res = evaluate(rule, task, 10, runs=3, seed=5, final="heldout")
    from autol2o.meta.evaluate import run_learned, run_seeds
    from autol2o.meta.tasks import generators

    gens = generators(run_seeds(5, 3))
    theta = run_learned(rule, task, task.init_params(gens), task.make_plan(gens), 10)
    assert torch.allclose(res.final_losses, task.heldout_loss(theta, None), rtol=1e-6)
    assert not torch.allclose(res.final_losses, evaluate(rule, task, 10, runs=3, seed=5).final_losses)
    with pytest.raises(UserError, match="--meta-data must be .train. or .heldout."):
        TrainConfig(meta_data="val")


def test_module_task_holds_out_its_validation_data():
    from torch import nn

    from autol2o.meta import ModuleTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    task = ModuleTask(lambda: nn.Linear(5, 3), x[:30], y[:30], nn.functional.cross_entropy,
                      batch_size=8, x_val=x[30:], y_val=y[30:])
    gens = [torch.Generator().manual_seed(1)]
    theta, plan = task.init_params(gens), task.make_plan(gens)
    xv, yv = task.heldout_batch(plan, 0, 0)
    assert torch.equal(xv[0], x[30:]) and torch.equal(yv[0], y[30:])
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(theta[0, :15].view(3, 5))
        model.bias.copy_(theta[0, 15:])
    ref = nn.functional.cross_entropy(model(x[30:]), y[30:])
    assert task.heldout_loss(theta, plan).item() == pytest.approx(ref.item(), rel=1e-6)
    no_val = ModuleTask(lambda: nn.Linear(5, 3), x, y, nn.functional.cross_entropy)
    with pytest.raises(UserError, match="has no validation data"):
        no_val.heldout_batch(plan, 0, 0)


def test_module_task_holdout_splits_every_run_anew():
    """``holdout``: each run trains on its own part of the data and is scored on the rest, a
    partition drawn from its seed (the same after a resume, another for the next run)."""
    from torch import nn

    from autol2o.meta import ModuleTask

    g = torch.Generator().manual_seed(0)
    x = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 4)  # row i is all i: traceable
    y = torch.randint(0, 3, (50,), generator=g)
    task = ModuleTask(lambda: nn.Linear(4, 3), x, y, nn.functional.cross_entropy, batch_size=16,
                      holdout=0.2)
    assert task.n_heldout == 10 and task.spec["n_heldout"] == 10
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    plan = task.make_plan(gens)
    ids = [set(plan[b].heldout.tolist()) for b in range(2)]
    assert ids[0] != ids[1] and all(len(i) == 10 for i in ids)
    for t in range(5):
        xb, _ = task.batch(plan, t)
        mb, _ = task.meta_batch(plan, t, 30)
        for b in range(2):  # training draws never touch the run's held-out rows
            assert not ({int(v) for v in xb[b, :, 0]} | {int(v) for v in mb[b, :, 0]}) & ids[b]
    xh, yh = task.heldout_batch(plan, 3, 0)
    assert [{int(v) for v in xh[b, :, 0]} for b in range(2)] == ids
    assert torch.equal(yh[0], y[plan[0].heldout])
    xs, _ = task.heldout_batch(plan, 3, 4)  # a sample of the held-out rows
    assert xs.shape[:2] == (2, 4) and {int(v) for v in xs[1, :, 0]} <= ids[1]
    again = task.make_plan([torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(again[1].heldout, plan[1].heldout)  # a pure function of the seed
    theta = task.init_params(gens)
    ref = torch.stack([nn.functional.cross_entropy(
        x[plan[b].heldout] @ theta[b, :12].view(3, 4).t() + theta[b, 12:], y[plan[b].heldout])
        for b in range(2)])
    assert torch.allclose(task.heldout_loss(theta, plan), ref, rtol=1e-5)
    with pytest.raises(UserError, match="3 examples are too few to hold out 90% of them"):
        ModuleTask(lambda: nn.Linear(4, 3), x[:3], y[:3], nn.functional.cross_entropy,
                   holdout=0.9)


def test_heldout_scoring_is_in_eval_mode_and_tasks_without_heldout_data_refuse():
    """fit scores validation with model.eval(): the held-out meta-objective does too (dropout
    off), while the optimizee still trains with dropout on."""
    from torch import nn

    from autol2o.meta import ModuleTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    task = ModuleTask(lambda: nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)),
                      x, y, nn.functional.cross_entropy, batch_size=16, holdout=0.2)
    gens = [torch.Generator().manual_seed(1)]
    theta, plan = task.init_params(gens), task.make_plan(gens)
    torch.manual_seed(0)
    a, b = task.heldout_loss(theta, plan), task.heldout_loss(theta, plan)
    assert torch.equal(a, b) and task.model.training  # deterministic; train mode restored
    hb = task.heldout_batch(plan, 0, 0)
    assert torch.equal(task.loss(theta, hb), a)
    plain = (hb[0], hb[1])  # the same examples as a training batch: dropout on
    assert not torch.equal(task.loss(theta, plain), task.loss(theta, plain))
    quad = build_task("quadratic")
    qplan = quad.make_plan([torch.Generator().manual_seed(1)])
    with pytest.raises(UserError, match="task 'quadratic' has no held-out data"):
        quad.heldout_batch(qplan, 0, 0)
    lstm = build_task("sin-lstm")
    lplan = lstm.make_plan([torch.Generator().manual_seed(1)])
    xm, _ = lstm.heldout_batch(lplan, 0, 8)
    assert xm.shape[:2] == (1, 8) and not torch.equal(xm, lstm.batch(lplan, 0)[0][:, :8])


@pytest.mark.parametrize("task_name", ["mlp-digits", "quadratic"])
def test_second_order_meta_gradient_matches_finite_differences(task_name):
    """The meta-gradient with ``second_order`` is the exact derivative of the segment's meta-loss
    (a central difference along a random direction of the meta-weights agrees to 3e-3); the
    papers' first-order one, which treats each g_t as a constant, is off by more than 5% here.
    A trained rule over 20 steps: a random one moves the optimizee too little for the dropped
    term to show."""
    rule, _ = load_entry("rnnprop-mix")
    task = build_task(task_name)
    cfg = TrainConfig(batch=2)

    def meta_loss(second_order: bool) -> torch.Tensor:
        run = _Run([task], rule, cfg, 0, [11, 22], horizon=20)
        return run.unroll(rule, 20, "last", 0, "train", second_order).sum()

    params = list(rule.parameters())
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen) for p in params]
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
    direction = [d / norm for d in direction]
    slope = {}
    for second_order in (False, True):
        rule.zero_grad()
        meta_loss(second_order).backward()
        slope[second_order] = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    eps, ends = 1e-2, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        ends.append(float(meta_loss(False).detach()))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    fd = (ends[0] - ends[1]) / (2 * eps)
    assert slope[True] == pytest.approx(fd, rel=3e-3), (slope, fd)
    assert abs(slope[False] - fd) > 0.05 * abs(fd), (slope, fd)
