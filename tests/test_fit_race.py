"""The zoo race: successive-halving rounds, runs that pause and continue exactly, and the
race's accounting in the report."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit_support import FAST, blobs, run_cli, write_csv, write_model
from torch import nn

from autol2o.fit.data import from_tensors
from autol2o.fit.pipeline import race_rounds
from autol2o.fit.problem import Problem, from_object
from autol2o.fit.train import OptSpec, Run, train_run
from autol2o.optimizers import DMOptimizer, RNNprop
from autol2o.zoo import save_entry


@pytest.mark.parametrize(("n", "probe", "mode", "rounds"), [
    (5, 50, "halving", [(17, 2), (50, 1)]),       # 5*17 + 2*33 = 151 steps, not 5*50
    (10, 50, "halving", [(6, 4), (17, 2), (50, 1)]),
    (3, 30, "halving", [(30, 1)]),                # one round: the full probe
    (2, 30, "halving", [(30, 1)]),
    (4, 2, "halving", [(1, 2), (2, 1)]),          # never a round of 0 steps
    (1, 50, "halving", []),                       # nothing to race against
    (0, 50, "halving", []),
    (5, 50, "full", [(50, 1)]),
    (1, 50, "full", []),
])
def test_race_rounds(n, probe, mode, rounds):
    assert race_rounds(n, probe, mode) == rounds


def _problem(dropout: bool = False) -> Problem:
    x, y = blobs(120)
    data = from_tensors(torch.tensor(x, dtype=torch.float32), torch.tensor(y), None, None,
                        seed=0, task=None)
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.Tanh()] + ([nn.Dropout(0.3)] if dropout else []) + \
        [nn.Linear(16, 3)]
    return Problem(from_object(nn.Sequential(*layers), task=None, loss_fn=None), data, "cpu")


@pytest.mark.parametrize("kind", ["learned", "adam"])
def test_paused_run_continues_exactly(kind):
    """advance(7) then advance(30) = advance(30): weights, minibatches (30 steps at batch 32 cross
    epochs of 96 examples) and dropout masks, with other randomness drawn in between."""
    p = _problem(dropout=True)
    torch.manual_seed(1)
    spec = OptSpec(kind, kind, {"lr": 0.01}, rule=RNNprop() if kind == "learned" else None)
    whole = train_run(p, spec, steps=30, seed=3, batch_size=32, eval_every=5, keep_state=True)
    run = Run(p, spec, seed=3, batch_size=32, eval_every=5)
    run.advance(7)
    torch.rand(100)  # another run's draws between the two legs must not leak in
    parts = run.advance(30, keep_state=True)
    assert parts.steps_run == whole.steps_run == 30
    for k, v in whole.state.items():
        assert torch.equal(parts.state[k], v), k
    # the pause adds its own validation point; every other point is the same
    assert parts.steps == [0, 5, 7, 10, 15, 20, 25, 30] and whole.steps == [0, 5, 10, 15, 20, 25, 30]
    pts = dict(zip(parts.steps, parts.val_loss))
    assert [pts[s] for s in whole.steps] == pytest.approx(whole.val_loss, rel=0, abs=0)
    # advancing to where it already is does nothing
    n_points = len(parts.steps)
    again = run.advance(30)
    assert again.steps_run == 30 and len(again.steps) == n_points
    assert torch.equal(run.model.state_dict()["0.weight"], whole.state["0.weight"])


def test_race_by_successive_halving(tmp_path, capsys, monkeypatch):
    """Four entries, probe 9 steps: all four to step 3, the best two on to 9; the picked entry is
    the finalist with the lower validation loss at step 9, and those losses equal uninterrupted
    9-step runs (what a full race would have measured)."""
    torch.manual_seed(0)
    zoo = tmp_path / "zoo"
    save_entry(RNNprop(), zoo / "a-rnnprop", {"name": "a-rnnprop"})
    save_entry(RNNprop(out_scale=0.02), zoo / "b-rnnprop-slow", {"name": "b-rnnprop-slow"})
    save_entry(DMOptimizer(), zoo / "c-dm", {"name": "c-dm"})
    save_entry(RNNprop(out_scale=1e8), zoo / "d-wild", {"name": "d-wild"})
    monkeypatch.setenv("AUTOL2O_ZOO", str(zoo))
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    model = write_model(tmp_path)
    args = ["fit", model, tmp_path / "data", *FAST, "--steps", "90", "--probe", "0.1",
            "--baselines", "adam"]
    code, _, err = run_cli([*args, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    race = r["race"]
    assert race["mode"] == "halving" and race["rounds"] == [3, 9] and race["probe_steps"] == 9
    by = {e["name"]: e for e in race["entries"]}
    assert by["d-wild"]["diverged"] and by["d-wild"]["steps"] <= 3
    finalists = [n for n, e in by.items() if e["steps"] == 9]
    assert len(finalists) == 2 and "d-wild" not in finalists
    # the finalists were the two best at step 3
    at3 = {n: dict(zip(e["curve"]["steps"], e["curve"]["val_loss"]))[3]
           for n, e in by.items() if not e["diverged"]}
    assert sorted(at3, key=at3.get)[:2] == sorted(finalists, key=at3.get)
    assert race["picked"] == min(finalists, key=lambda n: by[n]["val_loss"])
    assert race["steps"] == sum(e["steps"] for e in by.values())
    assert race["steps"] == 2 * 9 + sum(e["steps"] for n, e in by.items() if n not in finalists)
    # a full race (--race full) measures the finalists the same and picks the same entry
    code, _, err = run_cli([*args, "--race", "full", "--out", tmp_path / "full"], capsys)
    assert code == 0, err
    full = json.loads((tmp_path / "full" / "report.json").read_text())["race"]
    assert full["mode"] == "full" and full["rounds"] == [9]
    assert all(e["steps"] == 9 or e["diverged"] for e in full["entries"])
    fby = {e["name"]: e for e in full["entries"]}
    for n in finalists:
        assert by[n]["val_loss"] == pytest.approx(fby[n]["val_loss"], rel=1e-6)
    assert full["picked"] == race["picked"] and full["steps"] > race["steps"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "successive halving, rounds to step 3, 9" in md


def test_bad_race_mode(tmp_path, capsys):
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    code, out, err = run_cli(["fit", write_model(tmp_path), tmp_path / "data", *FAST,
                              "--race", "swiss", "--out", tmp_path / "run"], capsys)
    assert code != 0 and "--race must be halving or full, got 'swiss'" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


class ScriptedRun:
    """Stands in for train.Run in the race: each entry's validation loss per step and the step
    it diverges at come from a script, so the race's choices can be checked exactly."""

    script: dict[str, tuple[dict[int, float], int | None]] = {}
    advanced: list[tuple[str, int]] = []

    def __init__(self, problem, opt, *, seed, batch_size, eval_every):
        from autol2o.fit.train import RunResult

        self.name = opt.name
        self.result = RunResult(opt.name, seed, [0], [None], [2.0], [None])

    def advance(self, steps):
        losses, diverge_at = self.script[self.name]
        ScriptedRun.advanced.append((self.name, steps))
        r = self.result
        r.steps_run = steps if diverge_at is None else min(steps, diverge_at)
        r.steps.append(r.steps_run)
        r.val_loss.append(losses.get(steps, 1.0) if r.steps_run == steps else float("inf"))
        r.val_acc.append(None)
        r.train_loss.append(1.0)
        r.diverged = diverge_at is not None and diverge_at <= steps
        return r


def _scripted_race(tmp_path, capsys, monkeypatch, script, run_class=ScriptedRun, exit_code=0,
                   cards=None, args=(), out="run"):
    """A fit (rounds to steps 3 and 9) whose race runs ``run_class``; its report.json.
    ``cards``: extra card fields per entry name; ``args``: extra fit options."""
    import autol2o.fit.pipeline as pipeline

    torch.manual_seed(0)
    zoo = tmp_path / "zoo"
    for name in script:
        if not (zoo / name).exists():
            save_entry(RNNprop(), zoo / name, {"name": name, **(cards or {}).get(name, {})})
    monkeypatch.setenv("AUTOL2O_ZOO", str(zoo))
    monkeypatch.setattr(pipeline, "Run", run_class)
    ScriptedRun.script, ScriptedRun.advanced = script, []
    x, y = blobs()
    write_csv(tmp_path / "data" / "train.csv", x, y)
    code, _, err = run_cli(["fit", write_model(tmp_path), tmp_path / "data", *FAST, "--steps",
                            "90", "--probe", "0.1", "--baselines", "adam", *args,
                            "--out", tmp_path / out], capsys)
    assert code == exit_code, err
    return json.loads((tmp_path / out / "report.json").read_text())


def test_race_falls_back_to_the_furthest_healthy_entry(tmp_path, capsys, monkeypatch):
    """Rounds to steps 3 and 9.  a diverges at once; b and c lead at step 3 and both diverge
    before 9; d and e were knocked out healthy: the pick is e (better than d at step 3), not a,
    the first entry in zoo order."""
    race = _scripted_race(tmp_path, capsys, monkeypatch, {
        "a": ({}, 1), "b": ({3: 0.2}, 5), "c": ({3: 0.3}, 6), "d": ({3: 0.6}, None),
        "e": ({3: 0.5}, None)})["race"]
    assert race["rounds"] == [3, 9] and race["picked"] == "e"
    assert ScriptedRun.advanced == [("a", 3), ("b", 3), ("c", 3), ("d", 3), ("e", 3),
                                    ("b", 9), ("c", 9)]
    assert race["steps"] == 1 + 5 + 6 + 3 + 3


def test_race_stops_when_one_entry_is_left(tmp_path, capsys, monkeypatch):
    """Four entries, three diverge in round one: the survivor is picked without a second round."""
    race = _scripted_race(tmp_path, capsys, monkeypatch, {
        "a": ({}, 2), "b": ({3: 0.9}, None), "c": ({}, 1), "d": ({}, 3)})["race"]
    assert race["picked"] == "b" and race["steps"] == 2 + 3 + 1 + 3
    assert ScriptedRun.advanced == [("a", 3), ("b", 3), ("c", 3), ("d", 3)]


def test_race_where_every_entry_diverges_keeps_the_first(tmp_path, capsys, monkeypatch):
    race = _scripted_race(tmp_path, capsys, monkeypatch, {"a": ({}, 2), "b": ({}, 1)})["race"]
    assert race["picked"] == "a" and all(e["diverged"] for e in race["entries"])


def test_race_ties_keep_zoo_order(tmp_path, capsys, monkeypatch):
    race = _scripted_race(tmp_path, capsys, monkeypatch, {
        "a": ({3: 0.5, 9: 0.4}, None), "b": ({3: 0.5, 9: 0.4}, None), "c": ({3: 0.5}, None),
        "d": ({3: 0.7}, None)})["race"]
    assert race["picked"] == "a"
    assert ScriptedRun.advanced[4:] == [("a", 9), ("b", 9)]


def test_ctrl_c_in_the_race_keeps_the_probes_run_so_far(tmp_path, capsys, monkeypatch):
    class Interrupted(ScriptedRun):
        def advance(self, steps):
            if (self.name, steps) == ("b", 9):
                raise KeyboardInterrupt
            return super().advance(steps)

    r = _scripted_race(tmp_path, capsys, monkeypatch, {
        "a": ({3: 0.2}, None), "b": ({3: 0.3}, None), "c": ({3: 0.6}, None),
        "d": ({3: 0.7}, None)}, run_class=Interrupted, exit_code=130)
    assert r["status"] == "interrupted" and r["race"] is None
    rows = [ln.split(",") for ln in (tmp_path / "run" / "metrics.csv").read_text().splitlines()
            if ln.startswith("race,")]
    # a ran to step 9 (0, 3, 9), b, c, d to step 3 (0, 3): b's interrupted leg is not there
    assert sorted((row[1], row[4]) for row in rows) == sorted(
        [("a", "0"), ("a", "3"), ("a", "9"), ("b", "0"), ("b", "3"), ("c", "0"), ("c", "3"),
         ("d", "0"), ("d", "3")])


def test_runs_started_before_the_halving_race_resume_with_a_full_race():
    from autol2o.fit.pipeline import FitConfig

    old = FitConfig().to_dict()
    del old["race"]
    assert FitConfig.from_dict(old).race == "full"
    assert FitConfig.from_dict(FitConfig().to_dict()).race == "halving"


def test_entries_whose_card_opts_out_stay_out_of_the_race(tmp_path, capsys, monkeypatch):
    """b and d say "race": false: the race is a, c (b would have won it); --race-all races all
    four and picks b; the report names what was left out."""
    script = {"a": ({3: 0.5, 9: 0.4}, None), "b": ({3: 0.1, 9: 0.05}, None),
              "c": ({3: 0.6, 9: 0.3}, None), "d": ({3: 0.2, 9: 0.1}, None)}
    cards = {"b": {"race": False}, "d": {"race": False}}
    r = _scripted_race(tmp_path, capsys, monkeypatch, script, cards=cards)
    race = r["race"]
    assert race["excluded"] == ["b", "d"] and r["config"]["race_all"] is False
    assert [e["name"] for e in race["entries"]] == ["a", "c"]
    # two entries: one round, the whole probe
    assert ScriptedRun.advanced == [("a", 9), ("c", 9)] and race["picked"] == "c"
    assert race["steps"] == 18
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Left out (card `\"race\": false`; `--race-all` races them): b, d." in md
    race = _scripted_race(tmp_path, capsys, monkeypatch, script, cards=cards,
                          args=["--race-all"], out="all")["race"]
    assert race["excluded"] == [] and race["picked"] == "b"
    assert [name for name, _ in ScriptedRun.advanced] == ["a", "b", "c", "d", "b", "d"]


def test_a_zoo_of_opted_out_entries_still_races(tmp_path, capsys, monkeypatch):
    """Nothing else usable: the entries that opted out race rather than leave nothing to pick."""
    race = _scripted_race(tmp_path, capsys, monkeypatch, {
        "a": ({9: 0.5}, None), "b": ({9: 0.4}, None)},
        cards={"a": {"race": False}, "b": {"race": False}})["race"]
    assert race["excluded"] == [] and race["picked"] == "b"


def test_runs_started_before_cards_could_opt_out_resume_racing_every_entry():
    from autol2o.fit.pipeline import FitConfig

    old = FitConfig().to_dict()
    del old["race_all"]
    assert FitConfig.from_dict(old).race_all is True
    assert FitConfig.from_dict(FitConfig().to_dict()).race_all is False
