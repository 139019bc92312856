"""The benchmark scripts' own machinery (not their figures: those live in benchmarks/results)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, module_name: str | None = None):
    """``benchmarks/NAME.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(module_name or name,
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper():
    return load_benchmark("paper", "paper_bench")


def test_paper_cache_shared_by_two_invocations_keeps_both_results(paper, tmp_path):
    # Two processes opened the cache before either saved: each save must add to the file,
    # not replace it with the process's own stale view.
    path = tmp_path / "paper-cache-full.json"
    first, second = paper.Cache(path), paper.Cache(path)
    assert first.get("a", lambda: {"mean": 1.0}) == {"mean": 1.0}
    assert second.get("b", lambda: {"mean": 2.0}) == {"mean": 2.0}
    assert json.loads(path.read_text()) == {"a": {"mean": 1.0}, "b": {"mean": 2.0}}
    calls = []
    assert paper.Cache(path).get("a", lambda: calls.append(1)) == {"mean": 1.0}
    assert not calls  # a cached result is never recomputed
    with pytest.raises(paper.Missing):
        paper.Cache(path).get("c")


def test_paper_report_from_a_smaller_cache_does_not_replace_a_fuller_report(paper, tmp_path,
                                                                            monkeypatch, capsys):
    """The cache is not committed: a --report-only in a fresh checkout sees none of the rows
    the committed paper.md has, and must leave that file alone (paper.new.md instead)."""
    report = tmp_path / "paper.md"
    old = ("# Paper experiments (full mode)\n\n| task | steps | adam | RNNprop / best baseline |\n"
           "|---|---:|---:|---:|\n| mnist-nn-sigmoid | 100 | 0.2997 ± 0.018 @0.0442 | 0.88 |\n")
    report.write_text(old)
    assert paper.table_rows(old) == {("mnist-nn-sigmoid", 100, "adam")}
    # a contender's column counts too: the same row without it loses a result
    assert paper.table_rows(old.replace(" adam |", " sgd |")) == {("mnist-nn-sigmoid", 100, "sgd")}
    argv = ["paper.py", "--report-only", "--out", str(tmp_path), "--learned", "rnnprop-mnist"]
    monkeypatch.setattr(sys, "argv", argv)
    paper.main()
    assert report.read_text() == old
    new = (tmp_path / "paper.new.md").read_text()
    assert "Not run yet" in new and "mnist-nn-sigmoid x 100" in new
    err = capsys.readouterr().err
    assert "has results the new report lacks (mnist-nn-sigmoid x 100; contenders adam)" in err
    monkeypatch.setattr(sys, "argv", [*argv, "--force"])
    paper.main()
    assert report.read_text() == new


def test_cnn_horizon_runs_and_reports_every_contender(tmp_path, monkeypatch, capsys):
    """The CNN long-horizon benchmark end to end on the bundled digits (a few steps): Adam's
    tuned rate is the grid's best tuning score, and every contender gets a row."""
    module = load_benchmark("cnn_horizon")
    out = tmp_path / "cnn.md"
    monkeypatch.setattr(sys, "argv", ["cnn_horizon.py", "--task", "digits-cnn1", "--steps", "4",
                                      "--runs", "2", "--tune-runs", "1", "--adam-grid=-8:-7",
                                      "--entries", "rnnprop-mnist", "--out", str(out)])
    module.main()
    text = out.read_text()
    tuning = {lr: float(v) for lr, v in (part.split(": ") for part in
                                         text.split("Adam's tuning losses: ")[1].strip().split(", "))}
    assert list(tuning) == ["0.003906", "0.005524", "0.007812"]
    chosen = text.split("| Adam (lr ")[1].split(")")[0]
    assert tuning[chosen] == min(tuning.values())   # (printed to 4 digits: a tie is allowed)
    assert "| rnnprop-mnist |" in text and (tmp_path / "cnn.png").is_file()


@pytest.fixture(scope="module")
def alignment():
    return load_benchmark("objective_alignment")


def test_objective_alignment_scores_what_the_trainer_and_the_protocol_score(alignment):
    """J's terms are the trainer's own meta-losses (tricks on, same seeds: same scales, convex
    targets and minibatches), and with the tricks off the protocol's training-loss curve."""
    from autol2o.meta import build_task
    from autol2o.meta.evaluate import evaluate, run_seeds
    from autol2o.meta.trainer import TrainConfig, _Run
    from autol2o.zoo import load_rule

    task, rule = build_task("mlp-digits"), load_rule("rnnprop-mnist")
    seeds = run_seeds(5, 3)
    ends = alignment.segment_losses(rule, task, seeds, 8, 4, 3.0, True)
    config = TrainConfig(horizon=8, unroll=4, random_scaling=3.0, convex_combination=True,
                         validate_every=0)
    run = _Run([task], rule, config, 0, seeds, 8)
    trainer = [run.unroll(rule, 4, "last").detach() for _ in range(2)]
    assert ends.shape == (2, 3)
    assert torch.allclose(ends, torch.stack(trainer), rtol=1e-5, atol=1e-6)
    plain = alignment.segment_losses(rule, task, seeds, 8, 4, 0.0, False)
    curves = evaluate(rule, task, steps=9, runs=3, seed=5).curves
    assert torch.allclose(plain, curves[[4, 8]], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, ends)   # the tricks change the objective


def test_objective_alignment_report(alignment, tmp_path, monkeypatch):
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # paired: a constant shift has no spread, however much the instances differ
    assert alignment.paired_difference(ref + 0.1, ref) == pytest.approx((0.1, 0.0), abs=1e-6)
    mean, se = alignment.paired_difference(torch.tensor([1.2, 2.0, 3.4, float("nan")]), ref)
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.2 / 3 ** 0.5)  # nan run dropped
    assert alignment.mean_se(torch.tensor([1.0, float("inf")]))[2] == 1
    assert alignment.fmt_se(0.5, float("nan")) == "+0.5000"
    out = tmp_path / "oa.md"
    entries = ["rnnprop-mnist", "rnnprop-mix", "rnnprop-mnist-v2", "rnnprop-mnist-v3",
               "rnnprop-mnist-v4"]
    argv = ["objective_alignment.py", "--task", "mlp-digits", "--horizon", "6", "--unroll", "3",
            "--runs", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--entries", ",".join(entries)])
    alignment.main()
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(entries)
    evals = [float(r.split("|")[2]) for r in rows]
    assert evals == sorted(evals)     # best evaluation first
    assert rows[0].split("|")[4].strip().startswith("+0.0000")   # J_paper - best, for the best
    assert "Spearman rank correlation with `eval` over the 5 entries" in text
    monkeypatch.setattr(sys, "argv", [*argv, "--entries", ",".join(entries[:3])])
    alignment.main()
    assert "Spearman" not in out.read_text()   # too few entries to rank
