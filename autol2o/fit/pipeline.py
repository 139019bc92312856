"""The fit pipeline: zoo race -> fine-tune -> Optuna baselines -> finals -> verdict.

Phases (each resumable from the run directory's ``state.json`` and the Optuna storage):

1. **race**: zoo optimizers train the model from the same initial weights and minibatches;
   lowest validation loss after ``probe = round(probe_fraction * steps)`` steps wins
   (``optimizer=NAME`` skips it).  By default a successive-halving race
   (:func:`race_rounds`): every entry runs ``probe / 3^(R-1)`` steps, the best third continue
   to 3x as many, and so on until the last round's survivors reach ``probe``; ``race="full"``
   runs every entry the whole probe.  Entries whose card says ``"race": false`` stay out
   unless ``race_all`` (or unless no other entry is usable);
2. **fine-tune** (``fine_tune = N > 0``): :func:`autol2o.meta.meta_train` on a
   :class:`autol2o.meta.ModuleTask` of the user's model and data, N meta-iterations; the result is
   saved with :func:`autol2o.zoo.save_entry` in ``RUN/fine-tuned/`` and used if a full-length
   run with it is not worse than with the original; the meta-objective is the loss on a random
   20% (at most 2048 examples) of the training data that each run holds out (meta-training
   never sees the validation split);
3. **baselines**: one Optuna study per baseline (Adam, SGD), ``trials`` finished trials each, each
   trial the full ``steps`` budget (see :mod:`autol2o.tuning`);
4. **finals**: the learned optimizer and each baseline's best configuration, ``seeds`` fresh
   seeds each (``seed + 1 ... seed + seeds``: not the seed the race and the trials were selected
   on, so selection does not bias the comparison);
5. **verdict**: winner, whether the gap exceeds seed noise (paired t-test over the shared seeds),
   compute spent per side.

Ctrl-C writes a partial report (``status = "interrupted"``) and keeps the run directory;
``resume=True`` continues: the race and fine-tune results are read back, the studies run only
their missing trials, and the finals (cheap, deterministic) are run again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Collection
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autol2o.errors import UserError
from autol2o.tuning import (
    Diverged,
    best_trial,
    compute_spent,
    counts_as_done,
    make_storage,
    n_done,
    open_study,
    pin_storage,
    redact,
    run_study,
    steps_to_match,
    suggest,
    trial_record,
)

from . import report as rep
from .problem import Problem
from .progress import Reporter
from .train import STOP, OptSpec, Run, RunResult, default_eval_every, train_run

DEFAULT_STEPS = 300
SMALL_MODEL = 200_000
STATE_FILE = "state.json"


#: share of the training data each fine-tuning run holds out for the meta-objective
FINE_TUNE_HOLDOUT = 0.2
#: fine-tuning runs span the whole step budget up to this many steps (validation costs
#: val_runs x horizon steps each time)
FINE_TUNE_MAX_HORIZON = 1000


@dataclass
class FitConfig:
    """Knobs of one fit run (CLI flags map one-to-one)."""

    steps: int = DEFAULT_STEPS          #: optimizer steps per training run (every contender)
    batch_size: int = 128
    probe_fraction: float = 0.1         #: race probe length as a fraction of ``steps``
    race: str = "halving"               #: "halving" (successive halving) or "full"
    #: race every usable zoo entry, also those whose card says ``"race": false``
    race_all: bool = False
    trials: int = 20                    #: finished Optuna trials per baseline
    seeds: int = 3                      #: seeds per contender in the finals
    fine_tune: int = 0                  #: meta-iterations of fine-tuning (0: none)
    optimizer: str | None = None        #: zoo entry to use (skips the race)
    baselines: tuple[str, ...] = ("adam", "sgd")
    device: str = "auto"
    storage: str | None = None          #: Optuna storage URL (default: RUN/optuna.db)
    study: str | None = None            #: study name prefix (default: the run's name)
    n_jobs: int = 1                     #: parallel trials in this process
    seed: int = 0
    eval_every: int | None = None       #: validation interval (default: steps // 20)
    zoo: str | None = None              #: zoo root (default: $AUTOL2O_ZOO or the shipped zoo)
    #: CPU threads for torch; None = 1 for models under SMALL_MODEL parameters (their ops are
    #: too small to split across threads: synchronisation costs more than it saves, badly so on
    #: a busy machine), else torch's default
    threads: int | None = None

    def validate(self) -> None:
        for k in ("steps", "batch_size", "trials", "seeds", "n_jobs", "fine_tune", "seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool):  # the API and a resumed state.json
                raise UserError(f"--{k.replace('_', '-')} must be an integer, got {v!r}")
        for k, flag in (("threads", "--threads"), ("eval_every", "eval_every")):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise UserError(f"{flag} must be an integer, got {v!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise UserError(f"eval_every must be >= 1, got {self.eval_every}")
        for k in ("device", "race"):
            if not isinstance(getattr(self, k), str):
                raise UserError(f"--{k} must be a string, got {getattr(self, k)!r}")
        for k in ("optimizer", "storage", "study", "zoo"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise UserError(f"--{k} must be a string, got {v!r}")
        if not isinstance(self.baselines, (tuple, list)) or not all(
                isinstance(b, str) for b in self.baselines):
            raise UserError(f"--baselines must be a list of names, got {self.baselines!r}")
        # sklearn's splits and numpy's generators take seeds in [0, 2^32)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must lie in [0, 2^32), got {self.seed}")
        if not isinstance(self.probe_fraction, (int, float)) or isinstance(self.probe_fraction, bool):
            raise UserError(f"--probe must be a number, got {self.probe_fraction!r}")
        for k in ("steps", "batch_size", "trials", "seeds", "n_jobs"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.fine_tune < 0:
            raise UserError(f"--fine-tune must be >= 0, got {self.fine_tune}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if not 0 < self.probe_fraction <= 1:
            raise UserError(f"--probe must lie in (0, 1], got {self.probe_fraction}")
        if self.race not in ("halving", "full"):
            raise UserError(f"--race must be halving or full, got {self.race!r}")
        if not self.baselines:  # the point of a fit is the comparison with a tuned baseline
            raise UserError("--baselines must name at least one of adam, sgd")
        bad = [b for b in self.baselines if b not in ("adam", "sgd")]
        if bad:
            raise UserError(f"unknown baseline(s) {', '.join(bad)} (choose from adam, sgd)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def probe_steps(self) -> int:
        return max(1, round(self.probe_fraction * self.steps))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["baselines"] = list(self.baselines)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        d = dict(d)
        b = d.get("baselines", ("adam", "sgd"))
        d["baselines"] = tuple(b) if isinstance(b, (list, tuple)) else b  # validate() names a bad one
        d.setdefault("race", "full")  # runs started before the halving race raced in full
        d.setdefault("race_all", True)  # ... and before cards could opt out, raced every entry
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Result:
    """What :func:`autol2o.optimize` returns."""

    winner: str                         #: name of the best contender in the finals
    leaderboard: list[dict[str, Any]]   #: finals rows, best first (see report schema)
    model: nn.Module | None             #: the model trained by the winner (first seed)
    report: dict[str, Any]              #: the full ``report.json`` content
    run_dir: Path = field(default_factory=Path)


def resolve_device(name: str) -> torch.device:
    """``--device`` as for ``zoo train``: auto, cpu, cuda or cuda:N (CUDA checked)."""
    from autol2o.meta.cli_support import resolve_device as resolve

    return torch.device(resolve(name))


# -- run directory ----------------------------------------------------------------------------
def new_run_dir(out: str | Path | None, model_name: str, base: Path = Path("runs")) -> Path:
    """Create the run directory; never reuse a non-empty one (no silent overwrite)."""
    if out is not None:
        d = Path(out)
        if d.exists() and not d.is_dir():
            raise UserError(f"{d}: exists and is a file, not a directory (choose another --out)")
        if d.exists() and any(d.iterdir()):
            raise UserError(f"{d}: output directory already exists and is not empty "
                            f"(choose another --out, or continue it with --resume {d})")
    else:
        stem = time.strftime("%Y%m%d-%H%M%S") + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
        k = 1
        while True:  # claimed by mkdir itself: two runs started in the same second never share
            d = base / (stem if k == 1 else f"{stem}-{k}")
            try:
                d.mkdir(parents=True)
                break
            except FileExistsError:
                k += 1
            except OSError as e:
                raise UserError(f"{d}: cannot write the run directory ({e.strerror or e})") from e
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{d}: cannot write the run directory ({e.strerror or e})") from e
    return d


def read_state(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / STATE_FILE
    if not f.is_file():
        raise UserError(f"{f}: not found; --resume needs a run directory made by autol2o fit")
    try:
        state = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: cannot read run state ({type(e).__name__})") from e
    # valid JSON of another shape (hand-edited, or not autol2o's) must also be one clear line
    if not isinstance(state, dict):
        raise UserError(f"{f}: not a run state (a JSON {type(state).__name__}, expected an object)")
    if not isinstance(state.get("config"), dict):
        raise UserError(f"{f}: not a run state (no 'config' object)")
    for k in ("inputs", "phases"):
        if k in state and not isinstance(state[k], dict):
            raise UserError(f"{f}: not a run state ('{k}' is not an object)")
    bad = [k for k, v in state.get("inputs", {}).items() if v is not None and not isinstance(v, str)]
    if bad:
        raise UserError(f"{f}: not a run state (inputs {', '.join(bad)} must be paths)")
    try:
        cfg = FitConfig.from_dict(state["config"])
        cfg.validate()
    except (TypeError, ValueError, AttributeError, UserError) as e:
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{f}: bad 'config' ({' '.join(why.split())})") from e
    return state


# -- the pipeline -----------------------------------------------------------------------------
class FitRun:
    """One execution of the pipeline in ``run_dir`` (fresh or resumed)."""

    def __init__(self, problem: Problem, cfg: FitConfig, run_dir: Path, *,
                 inputs: dict[str, Any] | None = None, reporter: Reporter | None = None,
                 state: dict[str, Any] | None = None):
        self.p, self.cfg, self.dir = problem, cfg, Path(run_dir)
        self.out = reporter or Reporter(False)
        self.eval_every = cfg.eval_every or default_eval_every(cfg.steps)
        # a storage password never goes into run files; --resume asks for the URL again
        self.state = state or {"config": cfg.to_dict() | {"storage": _redact_opt(cfg.storage)},
                               "inputs": inputs or {}, "phases": {}, "created": _now()}
        self.state.setdefault("phases", {})
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.storage_url = cfg.storage or f"sqlite:///{(self.dir / 'optuna.db').resolve()}"
        # fixed when the run is created and kept in its state: resuming through another path to
        # the same run (``--resume .``, a moved or renamed directory) must find the same studies
        self.state.setdefault("study_prefix", cfg.study or self.dir.resolve().name)
        self.study_prefix = self.state["study_prefix"]
        self.finals: dict[str, list[RunResult]] = {}
        self.finals_specs: list[OptSpec] = []
        self.race_runs: list[RunResult] = []
        self.studies: dict[str, optuna.Study] = {}
        self._storage: optuna.storages.BaseStorage | None = None
        self.timings: dict[str, float] = dict(self.state.get("timings", {}))
        self.my_trials: dict[str, list[int]] = {k: list(v) for k, v in
                                                self.state.get("my_trials", {}).items()}

    # state ---------------------------------------------------------------------------------
    def _save_state(self) -> None:
        self.state["timings"] = self.timings
        self.state["my_trials"] = self.my_trials
        rep.atomic_write_text(self.dir / STATE_FILE, json.dumps(self.state, indent=2))

    def run(self) -> Result:
        self.state["status"] = "running"
        self._save_state()
        try:
            with _graceful_sigint():
                if self.cfg.storage:  # a shared study that does not fit fails now, not after the race
                    for kind in self.cfg.baselines:
                        self._study(kind)
                rule, rule_name = self._race()
                rule, rule_name = self._fine_tune(rule, rule_name)
                for kind in self.cfg.baselines:
                    self._tune(kind)
                self._finals(rule, rule_name)
        except KeyboardInterrupt:
            self.state["status"] = "interrupted"
            self._save_state()
            self._write_report(status="interrupted")
            again = (" --storage URL" if self.cfg.storage and redact(self.cfg.storage)
                     != self.cfg.storage else "")  # the password is not saved in the run
            self.out.log(f"interrupted: partial report in {self.dir}; continue with "
                         f"`autol2o fit --resume {self.dir}{again}`", always=True)
            raise
        except Exception as e:
            # never leave a run that claims to be "running": say it failed, and why
            self.state["status"], self.state["error"] = "failed", str(e)
            self._save_state()
            with suppress(Exception):  # the original error matters, not this one
                self._write_report(status="failed", error=str(e))
            raise
        report, model = self._write_report(status="complete")
        self.state["status"] = "complete"   # only once the report is on disk
        self._save_state()
        return Result(report["verdict"]["winner"], report["leaderboard"], model, report, self.dir)

    # phase 1 -------------------------------------------------------------------------------
    def _race(self):
        from autol2o.zoo import list_entries, load_rule

        cfg, ph = self.cfg, self.state["phases"]
        if "race" in ph:
            r = ph["race"]
            # the probe curves feed metrics.csv: a resumed run must write the same file
            self.race_runs = [RunResult.from_dict(e["curve"]) for e in r["entries"] if "curve" in e]
            return load_rule(r["picked_path"]), r["picked"]
        t0 = time.perf_counter()
        if cfg.optimizer:
            rule = load_rule(cfg.optimizer, cfg.zoo)
            name = Path(cfg.optimizer).name
            ph["race"] = {"skipped": True, "picked": name,
                          "picked_path": str(_entry_path(cfg.optimizer, cfg.zoo).resolve()),
                          "probe_steps": 0, "mode": None, "rounds": [], "entries": [],
                          "excluded": [], "steps": 0}
            self.out.log(f"race skipped: using {name} (--optimizer)")
            self._save_state()
            return rule, name
        entries = list_entries(cfg.zoo)
        rows: list[dict[str, Any]] = []
        racers: list[tuple[Any, Any]] = []   # (entry, rule) of the usable entries, zoo order
        for e in entries:
            try:
                rule = load_rule(e.path)
            except UserError as err:
                rows.append({"name": e.name, "error": str(err), "val_loss": None,
                             "diverged": False, "steps": 0, "wall_time": 0.0})
                continue
            racers.append((e, rule))
        # Entries whose card opts out (the papers' reproductions, training-task specialists)
        # cost race steps and, worse, a specialist can lead a short probe and then stall over
        # the full budget; unless no other entry is usable, they stay out.
        excluded: list[str] = []
        if not cfg.race_all:
            keep = [(e, r) for e, r in racers if e.races]
            if keep:
                excluded = [e.name for e, _ in racers if not e.races]
                racers = keep
        if excluded:
            self.out.log(f"race: leaving out {', '.join(excluded)} (card \"race\": false; "
                         "--race-all includes them)")
        rounds = race_rounds(len(racers), cfg.probe_steps, cfg.race)
        eval_every = default_eval_every(cfg.probe_steps)
        running: dict[int, Run] = {}          # paused between rounds
        results: dict[int, RunResult] = {}    # every entry that trained, by racer index
        alive = list(range(len(racers)))
        # one progress tick per entry per round it runs in (at most: a diverged one stops)
        ticks = len(racers) + sum(keep for _, keep in rounds[:-1]) if rounds else 0
        try:
            with self.out.phase(f"race ({len(racers)} zoo optimizers)", ticks) as adv:
                for k, (length, keep) in enumerate(rounds):
                    last = k == len(rounds) - 1
                    for i in alive:
                        e, rule = racers[i]
                        run = running.get(i) or Run(
                            self.p, OptSpec("learned", e.name, rule=rule), seed=cfg.seed,
                            batch_size=cfg.batch_size, eval_every=eval_every)
                        running[i] = run
                        results[i] = r = run.advance(length)
                        if last or r.diverged:  # done racing: free its model and state now
                            del running[i]
                        adv(note=f"{e.name}: {_fmt(r.final_val_loss)} at step {r.steps_run}")
                    # ties keep zoo order; a diverged entry never goes on
                    ranked = sorted(sorted(i for i in alive if not results[i].diverged),
                                    key=lambda i: results[i].final_val_loss)
                    alive = ranked[:keep]
                    for i in list(running):
                        if i not in alive:
                            del running[i]
                    if len(alive) <= 1:  # a lone survivor (the rest diverged): nothing to race
                        break
        finally:  # on Ctrl-C too: the partial report keeps the probe curves run so far
            self.race_runs = [results[i] for i in sorted(results)]
        for i, (e, _rule) in enumerate(racers):
            if i not in results:  # a single usable entry: nothing to race it against
                rows.append({"name": e.name, "path": str(e.path.resolve()), "val_loss": None,
                             "val_acc": None, "diverged": False, "steps": 0, "wall_time": 0.0})
                continue
            r = results[i]
            rows.append({"name": e.name, "path": str(e.path.resolve()),
                         "val_loss": _num(r.final_val_loss),
                         "val_acc": r.final_val_acc, "diverged": r.diverged,
                         "steps": r.steps_run, "wall_time": r.wall_time,
                         "curve": r.to_dict()})
        if not racers:
            raise UserError(f"zoo {entries[0].path.parent}: no usable learned optimizer "
                            f"({rows[0]['error']})")
        # the best finalist (a lone usable entry: itself, unprobed); if every finalist diverged,
        # the entry that got furthest without diverging (then by its loss there), not merely the
        # first in zoo order; if every entry diverged, the first usable one
        ranked = alive or sorted(sorted(i for i in results if not results[i].diverged),
                                 key=lambda i: (-results[i].steps_run, results[i].final_val_loss))
        picked, rule = racers[ranked[0] if ranked else 0]
        self.timings["race"] = time.perf_counter() - t0
        ph["race"] = {"skipped": False, "picked": picked.name,
                      "picked_path": str(picked.path.resolve()),
                      "probe_steps": cfg.probe_steps, "mode": cfg.race,
                      "rounds": [length for length, _ in rounds], "entries": rows,
                      "excluded": excluded, "steps": sum(r["steps"] for r in rows)}
        self.out.log("race: " + ", ".join(
            f"{r['name']} " + ("unusable" if r.get("error") else "diverged" if r["diverged"]
                               else "not probed" if not r["steps"] else
                               f"{_fmt(r['val_loss'])} at {r['steps']}") for r in rows)
            + f" -> {picked.name}")
        self._save_state()
        return rule, picked.name

    # phase 2 -------------------------------------------------------------------------------
    def _fine_tune(self, rule, name):
        from autol2o.zoo import load_rule

        cfg, ph = self.cfg, self.state["phases"]
        if cfg.fine_tune <= 0:
            return rule, name
        if "fine_tune" in ph:
            f = ph["fine_tune"]
            return (load_rule(f["path"]), f["name"]) if f["used"] else (rule, name)
        from autol2o.meta import meta_train
        from autol2o.zoo import save_entry

        t0 = time.perf_counter()
        task = fine_tune_task(self.p, cfg)
        tc = fine_tune_config(cfg, rule)
        self.out.log(f"fine-tune: meta-training {name} for {cfg.fine_tune} iterations "
                     f"(horizon {tc.horizon}, unroll {tc.unroll}, {tc.batch} instances)")
        t_meta = time.perf_counter()
        res = meta_train(copy.deepcopy(rule), task, tc, device=self.p.device,
                         checkpoint_dir=self.dir / "fine-tune-checkpoint", resume=True,
                         progress=self.out.enabled)
        # meta-training time spent before an interruption (res.wall_time continues from the
        # checkpoint; this call's own share is measured here)
        earlier = max(0.0, res.wall_time - (time.perf_counter() - t_meta))
        ft_name = f"{name}-ft"
        card = {"name": ft_name, "base": name, "trained_on": [task.spec],
                "train_config": tc.to_dict(), **res.card_fields,
                "command": f"autol2o fit --fine-tune {cfg.fine_tune} (run {self.dir.name})"}
        path = save_entry(res.rule, self.dir / "fine-tuned", card, overwrite=True).resolve()
        # Keep the fine-tuned rule only if a full-length run (what the finals measure; the
        # held-out objective may trade early speed for a lower loss at the end, which a short
        # probe would miss) says it is not worse than the original on the validation split.
        probe = cfg.steps
        r_old = train_run(self.p, OptSpec("learned", name, rule=rule), steps=probe, seed=cfg.seed,
                          batch_size=cfg.batch_size)
        r_new = train_run(self.p, OptSpec("learned", ft_name, rule=res.rule), steps=probe,
                          seed=cfg.seed, batch_size=cfg.batch_size)
        # best_iteration 0: validation kept the starting weights, so there is nothing new to use
        # (None: validation never scored a finite loss; a diverged probe is never "not worse")
        used = (res.best_iteration not in (0, None) and math.isfinite(r_new.final_val_loss)
                and r_new.final_val_loss <= r_old.final_val_loss)
        n_val = sum("val_loss" in h for h in res.history) + 1  # + the starting weights' check
        self.timings["fine_tune"] = time.perf_counter() - t0 + earlier
        ph["fine_tune"] = {
            "name": ft_name, "path": str(path), "iterations": cfg.fine_tune,
            # meta-training unrolls + its validation runs + the two full-length runs
            "optimizee_steps": _meta_steps(res.history, tc.horizon, tc.unroll) * tc.batch
            + n_val * tc.val_runs * tc.horizon + r_old.steps_run + r_new.steps_run,
            "diverged_runs": res.diverged, "best_val": res.best_val,
            "best_iteration": res.best_iteration,
            "probe_val_loss_before": _num(r_old.final_val_loss),
            "probe_val_loss_after": _num(r_new.final_val_loss), "used": used,
            "wall_time": self.timings["fine_tune"],
        }
        self.out.log(f"fine-tune: val loss of a full run {_fmt(r_old.final_val_loss)} -> "
                     f"{_fmt(r_new.final_val_loss)} ({'using' if used else 'not using'} {ft_name})")
        self._save_state()
        # the phase is on record now (a resume skips it): its resume checkpoint is spent
        shutil.rmtree(self.dir / "fine-tune-checkpoint", ignore_errors=True)
        return (res.rule, ft_name) if used else (rule, name)

    # phase 3 -------------------------------------------------------------------------------
    def _study(self, kind: str) -> optuna.Study:
        if kind not in self.studies:
            if self._storage is None:
                self._storage = make_storage(self.storage_url)
            storage = self._storage
            d = self.p.data
            # what makes trials comparable: a study of this name made for another problem (model,
            # data, budget) is refused, or its trials would count, and its best config be used,
            # here (the seed is left out: workers sharing a study may use different ones)
            signature = {"kind": kind, "steps": self.cfg.steps, "batch_size": self.cfg.batch_size,
                         "eval_every": self.eval_every, "model": self.p.model.name,
                         "n_params": self.p.n_params, "task": self.p.task,
                         "n_train": len(d.x_train), "n_val": len(d.x_val),
                         "input_shape": list(d.x_train.shape[1:])}
            self.studies[kind] = open_study(storage, f"{self.study_prefix}-{kind}", self.cfg.seed,
                                            shared=self.cfg.storage is not None,
                                            warmup_steps=self.cfg.steps // 10,
                                            signature=signature)
        return self.studies[kind]

    def _tune(self, kind: str) -> None:
        cfg = self.cfg
        study = self._study(kind)
        t0 = time.perf_counter()
        mine = self.my_trials.setdefault(kind, [])

        def objective(trial: optuna.Trial) -> float:
            params = suggest(trial, kind)
            trial.set_user_attr("worker", self.worker)
            curve: list[tuple[int, float]] = []
            t1 = time.perf_counter()

            def record(steps_run: int) -> None:
                trial.set_user_attr("steps_run", steps_run)
                trial.set_user_attr("wall_time", time.perf_counter() - t1)
                trial.set_user_attr("curve_steps", [s for s, _ in curve])
                trial.set_user_attr("curve_val", [_num(v) for _, v in curve])

            def on_eval(step: int, v: float) -> None:
                curve.append((step, v))
                trial.report(v, step)
                if trial.should_prune():
                    record(step)
                    raise optuna.TrialPruned()

            r = train_run(self.p, OptSpec(kind, kind, params), steps=cfg.steps, seed=cfg.seed,
                          batch_size=cfg.batch_size, eval_every=self.eval_every, on_eval=on_eval)
            if r.diverged:
                curve.append((r.steps[-1], math.inf))
                record(r.steps_run)
                trial.set_user_attr("diverged", True)
                raise Diverged(f"{kind} {params} diverged at step {r.steps_run}")
            record(r.steps_run)
            return r.final_val_loss

        start = n_done(study)
        title = f"tuning {kind} (Optuna TPE, {cfg.trials} trials)"
        with self.out.phase(title, cfg.trials) as adv:
            adv(min(start, cfg.trials), note="resumed" if start else "")

            def on_trial(t: optuna.trial.FrozenTrial) -> None:
                mine.append(t.number)
                b = best_trial(study)
                adv(note=f"best {_fmt(b.value) if b else '-'}")

            # the trials' starting model is drawn here, once: with --n-jobs > 1, threads drawing
            # it at the same time from torch's global generator could get mixed-up weights
            self.p.initial(cfg.seed)
            run_study(study, objective, cfg.trials, n_jobs=cfg.n_jobs, on_trial=on_trial)
        self.timings[f"tune_{kind}"] = self.timings.get(f"tune_{kind}", 0.0) + \
            time.perf_counter() - t0
        b = best_trial(study)
        self.out.log(f"tuning {kind}: {n_done(study)} trials, best "
                     f"{_fmt(b.value) if b else 'none (all failed)'}"
                     + (f" with {_params(b.params)}" if b else ""))
        self._save_state()

    # phase 4 -------------------------------------------------------------------------------
    def _finals(self, rule, rule_name: str) -> None:
        cfg = self.cfg
        contenders: list[OptSpec] = [OptSpec("learned", rule_name, rule=rule)]
        for kind in cfg.baselines:
            b = best_trial(self._study(kind))
            if b is not None:
                contenders.append(OptSpec(kind, kind, dict(b.params)))
        self.finals_specs = contenders
        # Fresh seeds: the race and the Optuna trials selected on seed `cfg.seed`, so reusing it
        # here would hand the selected configurations an optimistic (winner's-curse) result.
        seeds = [cfg.seed + 1 + i for i in range(cfg.seeds)]
        t0 = time.perf_counter()
        with self.out.phase(f"finals ({len(contenders)} x {cfg.seeds} seeds)",
                            len(contenders) * len(seeds)) as adv:
            for spec in contenders:
                runs = []
                for s in seeds:
                    r = train_run(self.p, spec, steps=cfg.steps, seed=s,
                                  batch_size=cfg.batch_size, eval_every=self.eval_every,
                                  keep_state=s == seeds[0])
                    runs.append(r)
                    adv(note=f"{spec.name} seed {s}: "
                             f"{'diverged' if r.diverged else _fmt(r.final_val_loss)}")
                self.finals[spec.name] = runs
        self.timings["finals"] = time.perf_counter() - t0

    # phase 5 + outputs ---------------------------------------------------------------------
    def _write_report(self, status: str,
                      error: str | None = None) -> tuple[dict[str, Any], nn.Module | None]:
        report = self.build_report(status)
        if error is not None:
            report["verdict"]["summary"] = f"failed: {error}"
        model = None
        if status == "complete" and report["verdict"]["winner"]:
            winner = report["verdict"]["winner"]
            state = self.finals[winner][0].state
            if state is not None:
                model = self.p.initial(self.finals[winner][0].seed)
                model.load_state_dict(state)
                rep.save_weights(model, self.dir / "model.safetensors")
                report["artifacts"]["weights"] = "model.safetensors"
        d = self.p.data
        if d.standardized and d.mean is not None:
            # what a user needs to feed new data to the saved model: x' = (x - mean) / std
            rep.atomic_write_text(self.dir / "preprocessing.json", json.dumps(
                {"standardize": {"mean": d.mean.tolist(), "std": d.std.tolist()},
                 "formula": "x_model = (x - mean) / std, statistics of the training split"}))
            report["artifacts"]["preprocessing"] = "preprocessing.json"
        rep.write_all(self.dir, report, self.finals, self.race_runs)
        return report, model

    def build_report(self, status: str) -> dict[str, Any]:
        cfg, ph = self.cfg, self.state["phases"]
        tuning = {}
        for kind in cfg.baselines:
            try:
                study = self._study(kind)
            except UserError:
                continue
            b = best_trial(study)
            frozen = study.get_trials(deepcopy=False)
            trials = [trial_record(t) for t in frozen]
            done = sum(counts_as_done(t) for t in frozen)
            tuning[kind] = {
                "study": study.study_name, "storage": redact(self.storage_url),
                # finished trials (what --trials counts); trials cut off by Ctrl-C or a
                # crash stay in the study and are re-run on --resume: counted apart
                "n_trials": done,
                "n_unfinished": len(trials) - done,
                "n_complete": sum(t["state"] == "COMPLETE" for t in trials),
                "n_pruned": sum(t["state"] == "PRUNED" for t in trials),
                "n_failed": sum(t["state"] == "FAIL" for t in trials),
                "n_diverged": sum(t["diverged"] for t in trials),
                "best_params": dict(b.params) if b else None,
                "best_value": b.value if b else None,
                "compute": compute_spent(study),
                "trials_by_this_process": sorted(set(self.my_trials.get(kind, []))),
                "trials": trials,
            }
        leaderboard = self._leaderboard()
        verdict = self._verdict(leaderboard, tuning)
        search_steps = ph.get("race", {}).get("steps", 0) + \
            ph.get("fine_tune", {}).get("optimizee_steps", 0)
        dash = f"optuna-dashboard {self.storage_url}"
        return {
            "schema_version": rep.SCHEMA_VERSION,
            "status": status,
            "autol2o_version": _version(),
            "created": self.state.get("created"),
            "finished": _now(),
            "run_dir": str(self.dir),
            "device": str(self.p.device),
            "inputs": {**self.state.get("inputs", {}), **self.p.summary(),
                       "data": self.p.data.summary()},
            "config": cfg.to_dict() | {"storage": _redact_opt(cfg.storage),
                                       "probe_steps": cfg.probe_steps,
                                       "eval_every": self.eval_every},
            "race": ph.get("race"),
            "fine_tune": ph.get("fine_tune"),
            "tuning": tuning,
            "finals": [self._final_row(name, runs) for name, runs in self.finals.items()],
            "leaderboard": leaderboard,
            "verdict": verdict | {"learned_search_steps": search_steps},
            "timings": self.timings,
            "artifacts": {"report_json": "report.json", "report_md": "report.md",
                          "fine_tuned": "fine-tuned" if "fine_tune" in ph else None,
                          "metrics": "metrics.csv", "curves": "curves.png" if self.finals else None,
                          "weights": None,
                          "optuna_storage": redact(self.storage_url),
                          "optuna_db": "optuna.db" if cfg.storage is None else None,
                          "dashboard_command": redact(dash)},
        }

    def _final_row(self, name: str, runs: list[RunResult]) -> dict[str, Any]:
        spec = next(s for s in self.finals_specs if s.name == name)
        return {"name": name, "kind": spec.kind, "params": spec.params,
                "val_loss": _stats([r.final_val_loss for r in runs]),
                "val_acc": _stats([r.final_val_acc for r in runs])
                if self.p.task == "classification" else None,
                "train_loss": _stats([r.final_train_loss for r in runs]),
                "diverged": sum(r.diverged for r in runs), "seeds": [r.seed for r in runs],
                "steps": sum(r.steps_run for r in runs),
                "wall_time": sum(r.wall_time for r in runs),
                "runs": [r.to_dict() for r in runs]}

    def _leaderboard(self) -> list[dict[str, Any]]:
        rows = []
        for name, runs in self.finals.items():
            spec = next(s for s in self.finals_specs if s.name == name)
            vl = _stats([r.final_val_loss for r in runs])
            va = _stats([r.final_val_acc for r in runs]) if self.p.task == "classification" \
                else None
            rows.append({"name": name, "kind": spec.kind, "params": spec.params,
                         "val_loss_mean": vl["mean"], "val_loss_std": vl["std"],
                         "val_acc_mean": va["mean"] if va else None,
                         "val_acc_std": va["std"] if va else None,
                         "n_seeds": len(runs), "diverged": sum(r.diverged for r in runs)})
        rows.sort(key=lambda r: (r["val_loss_mean"] is None, r["val_loss_mean"] or 0.0))
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        return rows

    def _verdict(self, board: list[dict[str, Any]], tuning: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"winner": None, "runner_up": None, "gap": None, "noise": None,
                               "p_value": None, "significant": None,
                               "summary": "no finals were run"}
        ranked = [r for r in board if r["val_loss_mean"] is not None]
        learned = next((r for r in board if r["kind"] == "learned"), None)
        ph = self.state["phases"]
        race_steps = ph.get("race", {}).get("steps", 0)
        ft_steps = ph.get("fine_tune", {}).get("optimizee_steps", 0)
        compute: dict[str, Any] = {}
        if learned is not None:
            runs = self.finals[learned["name"]]
            compute["learned"] = {
                "search_steps": race_steps + ft_steps,
                "search_wall_time": self.timings.get("race", 0.0) +
                self.timings.get("fine_tune", 0.0),
                "final_runs": len(runs), "final_steps": sum(r.steps_run for r in runs),
                "final_wall_time": sum(r.wall_time for r in runs)}
        for kind, t in tuning.items():
            runs = self.finals.get(kind, [])
            compute[kind] = {"search_steps": t["compute"]["steps"],
                             "search_trials": t["compute"]["trials"],
                             "search_wall_time": t["compute"]["wall_time"],
                             "final_runs": len(runs), "final_steps": sum(r.steps_run for r in runs),
                             "final_wall_time": sum(r.wall_time for r in runs)}
        out["compute"] = compute
        # "steps the tuned baseline needed, in total, to match the learned optimizer's result"
        match: dict[str, int | None] = {}
        target = learned["val_loss_mean"] if learned else None
        if target is not None:
            for kind in tuning:
                match[kind] = steps_to_match(self._study(kind), target)
        out["learned_target_val_loss"] = target
        out["baseline_steps_to_match_learned"] = match
        # the reverse: learned steps (search + first seed's run) to reach the best Adam trial
        adam = tuning.get("adam")
        if learned is not None and adam and adam["best_value"] is not None:
            first = self.finals[learned["name"]][0]
            s = first.steps_to_reach(adam["best_value"])
            out["best_adam_trial_val_loss"] = adam["best_value"]
            out["learned_steps_to_match_best_adam"] = None if s is None else \
                race_steps + ft_steps + s
        missing = [sp.name for sp in self.finals_specs if sp.name not in self.finals]
        if missing:  # interrupted in the finals: a winner among the contenders that ran misleads
            out["summary"] = ("no verdict: the finals were interrupted before "
                              f"{', '.join(missing)} finished")
            return out
        if not ranked:
            if board:  # (no board: no finals were run, e.g. interrupted while tuning)
                out["summary"] = "every contender diverged"
            return out
        w = ranked[0]
        out["winner"] = w["name"]
        if len(ranked) > 1:
            r = ranked[1]
            gap = r["val_loss_mean"] - w["val_loss_mean"]
            out.update(runner_up=r["name"], gap=gap)
            if w["n_seeds"] > 1 and r["n_seeds"] > 1:
                # every contender ran the same seeds (same init and minibatches per seed), so
                # the per-seed differences are the test's samples
                out.update(paired_t([b.final_val_loss - a.final_val_loss for a, b in
                                     zip(self.finals[w["name"]], self.finals[r["name"]])]))
        sig = ("seed noise cannot be assessed with one seed" if out["significant"] is None else
               f"the gap {'exceeds' if out['significant'] else 'is within'} seed noise "
               f"(paired t-test over {w['n_seeds']} shared seeds, p = {out['p_value']:.2g})")
        text = f"{w['name']} wins with validation loss {_fmt(w['val_loss_mean'])}"
        if out["runner_up"]:
            text += f", {_fmt(out['gap'])} ahead of {out['runner_up']}; {sig}"
        if learned is not None and match:
            parts = []
            for kind, s in match.items():
                spent = compute[kind]["search_steps"]
                parts.append(f"{kind} needed {s} tuning steps to match it" if s is not None else
                             f"{kind} never matched it in {spent} tuning steps")
            race = ph.get("race", {})
            how = " and ".join(what for what, ran in (
                ("race", race.get("steps")), ("fine-tuning", ft_steps)) if ran) or (
                "race skipped" if race.get("skipped") or not race else
                "no race: the only usable zoo entry")
            text += (f". The learned optimizer {learned['name']} used "
                     f"{compute['learned']['search_steps']} search steps ({how}) and no "
                     "hyperparameter tuning; "
                     + "; ".join(parts))
        elif learned is not None and learned["val_loss_mean"] is None:
            # unranked: say so, or the verdict reads as if there had been no learned contender
            text += (f". The learned optimizer {learned['name']} diverged "
                     f"({learned['diverged']} of {learned['n_seeds']} seeds)")
        out["summary"] = text + "."
        return out


# -- helpers -----------------------------------------------------------------------------------
def fine_tune_task(problem: Problem, cfg: FitConfig, holdout: float = FINE_TUNE_HOLDOUT):
    """The user's model and training data as a meta-training task for ``--fine-tune``.

    The meta-objective is the loss on examples the optimizee does not train on, since that is
    what the finals compare: a zoo rule meta-trained on the training loss drives it to ~0 and
    overfits small data (digits: validation loss 0.26 against tuned Adam's 0.12), and
    fine-tuning on the training loss has nothing left to improve there.  Each run holds out its
    own random ``holdout`` share of the training data (at most 2048 examples; a fixed held-out
    set would be fitted by the rule's thousands of weights); meta-training never sees the
    validation split (only the keep-or-discard check afterwards does, as the race does).
    ``holdout=0``: no held-out part, for a training-loss objective (``benchmarks/fine_tune.py``'s
    control)."""
    from autol2o.meta import ModuleTask

    d = problem.data
    return ModuleTask(problem.model.fresh, d.x_train, d.y_train, problem.loss_fn,
                      batch_size=cfg.batch_size, name=problem.model.name, device=problem.device,
                      holdout=holdout)


def check_fine_tune(problem: Problem, cfg: FitConfig) -> None:
    """Refuse ``--fine-tune`` on too little training data before anything runs."""
    n = len(problem.data.x_train)
    if cfg.fine_tune > 0 and n < 2:  # ModuleTask holds out max(1, 20%) and trains on the rest
        raise UserError(f"--fine-tune needs at least 2 training examples, got {n}: each "
                        f"fine-tuning run holds out {FINE_TUNE_HOLDOUT:.0%} of them (at least "
                        "one) and trains on the rest")


def fine_tune_config(cfg: FitConfig, rule, meta_data: str = "heldout"):
    """Meta-training settings of ``--fine-tune``: runs over the whole step budget (up to
    FINE_TUNE_MAX_HORIZON), the rule's own meta-loss (DM: the mean over the unroll) scored on
    held-out data, and no tricks: they buy generality across tasks, and fine-tuning is for this
    one task.  Each scored step sees up to 4 minibatches' worth of held-out examples per run
    (all of them on small data): scoring thousands, with the graph kept for the meta-gradient,
    can exhaust memory on a CNN that trains fine at its batch size."""
    from autol2o.meta import TrainConfig, paper_recipe

    horizon = min(cfg.steps, FINE_TUNE_MAX_HORIZON)
    return TrainConfig(horizon=horizon, unroll=min(20, horizon), iterations=cfg.fine_tune,
                       meta_loss=paper_recipe(rule.config()["rule"])["meta_loss"],
                       meta_data=meta_data, meta_batch_size=4 * cfg.batch_size,
                       lr_schedule="cosine",
                       batch=2, seed=cfg.seed, validate_every=max(1, cfg.fine_tune // 4),
                       val_runs=4, checkpoint_every=max(1, cfg.fine_tune // 4))


def paired_t(diffs: list[float], alpha: float = 0.05) -> dict[str, Any]:
    """Is a gap between two contenders more than seed noise?  A two-sided paired t-test at
    ``alpha`` on the per-seed differences d_i = loss_runner_up(seed i) - loss_winner(seed i):

        gap = mean(d),  se = stdev(d) / sqrt(n),  t = gap / se,  df = n - 1

    Both contenders trained from the same initial weights on the same minibatches for each
    seed, so what varies with the seed (a lucky init, an easy batch order) largely cancels in
    d_i; an unpaired test would count it as noise twice.  With 2-3 seeds df is small and the
    critical t large (12.7 at df 1, 4.3 at df 2), which a fixed "2 standard errors" rule would
    ignore.  ``noise`` is the gap needed for significance, t_crit(df) * se."""
    from scipy import stats

    n, gap = len(diffs), statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0.0:  # the same difference on every seed: any gap is real, none is noise
        return {"noise": 0.0, "p_value": 0.0 if gap > 0 else 1.0, "significant": gap > 0}
    p = float(2 * stats.t.sf(abs(gap) / se, n - 1))
    return {"noise": float(stats.t.ppf(1 - alpha / 2, n - 1) * se), "p_value": p,
            "significant": p < alpha}


def race_rounds(n: int, probe: int, mode: str = "halving", eta: int = 3
                ) -> list[tuple[int, int]]:
    """The race's rounds as ``(train survivors to this step, keep this many)``.

    Successive halving (Jamieson & Talwalkar 2016; Hyperband's inner loop) with rate ``eta``:
    round ``k`` of ``R`` trains the survivors to ``probe / eta^(R-1-k)`` steps and keeps the best
    ``ceil(n_k / eta)``, until one is left, so the finalists are compared after the whole probe,
    as in a full race, at about ``log_eta(n) + ...`` probes' cost instead of ``n``.  Five entries,
    probe 50: 5 to step 17, then 2 on to 50, 151 steps instead of 250.  One entry (or none): no
    race at all.  ``mode="full"``: one round, every entry the whole probe.
    """
    if n <= 1:
        return []
    if mode == "full":
        return [(probe, 1)]
    keeps, k = [], n
    while k > 1:
        k = math.ceil(k / eta)
        keeps.append(k)
    total = len(keeps)
    return [(max(1, round(probe / eta ** (total - 1 - i))), keep) for i, keep in enumerate(keeps)]


@contextmanager
def _graceful_sigint():
    """First Ctrl-C: stop at the next training step (see :data:`train.STOP`); second: at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        sys.stderr.write("\nstopping after the current step (Ctrl-C again to stop at once)\n")

    old = signal.signal(signal.SIGINT, handler)
    STOP.clear()
    try:
        yield
        if STOP.is_set():  # Ctrl-C after the last training step: still an interruption
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, old)
        STOP.clear()


def _entry_path(name: str, root: str | None) -> Path:
    from autol2o.zoo import resolve

    return resolve(name, root)


def _meta_steps(history: list[dict[str, Any]], horizon: int, unroll: int) -> int:
    """Optimizee steps per instance that meta-training took: iteration i advances the current
    run by ``min(unroll, horizon - t)`` steps (the last unroll of a run is shorter when
    ``horizon`` is not a multiple of ``unroll``); a run ends at ``horizon`` or when it diverged
    (``diverged``, cumulative in the history, went up), and the next one starts at t = 0."""
    total, t, diverged = 0, 0, 0
    for h in history:
        s = min(unroll, horizon - t)
        total, t = total + s, t + s
        if t >= horizon or h["diverged"] > diverged:
            t = 0
        diverged = h["diverged"]
    return total


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _stats(vals: list[float | None]) -> dict[str, Any]:
    ok = [v for v in vals if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(ok) if ok and len(ok) == len(vals) else None,
            # one seed: no spread to estimate (null, not a misleading 0.0)
            "std": statistics.stdev(ok) if len(ok) > 1 and len(ok) == len(vals) else None,
            "values": [_num(v) for v in vals]}


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def _redact_opt(url: str | None) -> str | None:
    return None if url is None else redact(url)


def restore_storage(saved: FitConfig, given: str | None, run_dir: Path) -> FitConfig:
    """The saved config of a run being resumed, with its storage URL's password (which was not
    saved) taken from ``given``, the URL passed again with ``--storage``/``storage=``.  Any other
    storage is refused: the run's trials are in the saved one, and a new one would start the
    tuning over, silently."""
    if saved.storage is None or ":***@" not in saved.storage:
        where = saved.storage or "its own optuna.db"
        if given is not None and pin_storage(given) != pin_storage(saved.storage):
            raise UserError(f"{run_dir}: this run's trials are in {where}; --resume keeps that "
                            f"storage (drop --storage {redact(given)})")
        return saved
    if given is None or redact(given) != saved.storage:
        raise UserError(f"{run_dir}: this run's Optuna storage {saved.storage} has a password, "
                        "which is not saved in the run; pass the same URL again with --storage")
    saved.storage = given
    return saved


#: settings that change how a run is computed, not what it is: a resumed run takes them from
#: the caller when they differ from the defaults (e.g. fewer threads on a busier machine)
RUNTIME_FIELDS = ("threads", "device", "n_jobs")


def resume_config(state: dict[str, Any], given: FitConfig, run_dir: Path,
                  explicit: Collection[str] | None = None) -> FitConfig:
    """The config of a run being resumed: the saved one, with the storage password and the
    :data:`RUNTIME_FIELDS` from ``given`` that were ``explicit``-ly asked for (the CLI knows which
    flags were typed, so ``--n-jobs 1`` can undo a saved 4); without ``explicit`` (the Python
    API), those that differ from the defaults."""
    cfg = restore_storage(FitConfig.from_dict(state["config"]), given.storage, run_dir)
    default = FitConfig()
    for k in RUNTIME_FIELDS:
        if (k in explicit) if explicit is not None else getattr(given, k) != getattr(default, k):
            setattr(cfg, k, getattr(given, k))
    return cfg


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version() -> str:
    from autol2o import __version__

    return __version__
