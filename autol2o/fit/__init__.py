"""``autol2o fit`` and :func:`optimize`: race the zoo, tune Adam/SGD with Optuna, report who wins.

Command line::

    autol2o fit                                  # bundled MLP on scikit-learn's digits
    autol2o fit model.py data/ --steps 500 --trials 20 --seeds 3 --fine-tune 50
    autol2o fit model.py data/ --optimizer rnnprop-mnist --json > report.json
    autol2o fit model.py data/ --storage journal:///shared/study.log --study mine   # on N hosts
    autol2o fit --resume runs/20260101-120000-model                                  # after Ctrl-C

Python:

>>> import autol2o
>>> res = autol2o.optimize(model, train_loader, val_loader, steps=300)   # doctest: +SKIP
>>> res.winner, res.leaderboard[0]["val_loss_mean"], res.run_dir          # doctest: +SKIP

The pipeline is described in :mod:`autol2o.fit.pipeline`, the inputs in :mod:`autol2o.fit.data`
and :mod:`autol2o.fit.problem`, and the report schema in :mod:`autol2o.fit.report`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autol2o.errors import UserError

from .data import FitData, from_tensors, load_data
from .pipeline import (
    DEFAULT_STEPS,
    SMALL_MODEL,
    FitConfig,
    FitRun,
    Result,
    check_fine_tune,
    new_run_dir,
    read_state,
    resolve_device,
    resume_config,
)
from .problem import Problem, UserModel, from_object, load_model_file
from .progress import Reporter

__all__ = ["DEFAULT_STEPS", "FitConfig", "FitData", "Problem", "Result", "UserModel",
           "check_zoo", "fit_files", "load_data", "load_model_file", "optimize"]


def pin_paths(cfg: FitConfig) -> FitConfig:
    """The config with every path in it absolute: the zoo (whether from ``--zoo``, AUTOL2O_ZOO
    or the default), an ``--optimizer`` given as a path, and a file-based ``--storage``
    (``sqlite:///rel.db``, ``journal:///rel.log``).  A run saves its config, and ``--resume``
    from another working directory or shell must race the same entries and find its trials."""
    import dataclasses

    from autol2o.tuning import pin_storage
    from autol2o.zoo import zoo_root

    root = zoo_root(cfg.zoo).resolve()
    opt = cfg.optimizer
    if opt and not (root / opt).is_dir() and Path(opt).is_dir():  # a path, not a name
        opt = str(Path(opt).resolve())
    return dataclasses.replace(cfg, zoo=str(root), optimizer=opt,
                               storage=pin_storage(cfg.storage))


def check_zoo(cfg: FitConfig) -> None:
    """Fail early (before any run directory exists) when there is nothing to race."""
    from autol2o.zoo import list_entries, load_rule, zoo_root

    if cfg.optimizer:
        load_rule(cfg.optimizer, cfg.zoo)   # unknown name or bad checksum: one-line ZooError
        return
    root = zoo_root(cfg.zoo)
    if not root.is_dir():
        raise UserError(f"{root}: zoo directory not found (--zoo or AUTOL2O_ZOO)")
    entries = list_entries(root)
    if not entries:
        raise UserError(f"{root}: the zoo of learned optimizers is empty; train one "
                        "with `autol2o zoo train --out <zoo>/NAME ...` (or point AUTOL2O_ZOO/--zoo "
                        "at a zoo)")
    # the race skips unusable entries, but needs one that loads (checksum verified)
    errors = []
    for e in entries:
        try:
            load_rule(e.path)
            return
        except UserError as err:
            errors.append(str(err))
    raise UserError(f"zoo {root}: no usable learned optimizer ({errors[0]})")


def _materialise(loader: Any, what: str) -> tuple[Tensor, Tensor, int]:
    """(X, y, batch size) from a DataLoader, an iterable of (x, y) batches, or an (X, y) pair."""
    if isinstance(loader, (tuple, list)) and len(loader) == 2 and all(
            isinstance(t, Tensor) for t in loader):
        return loader[0], loader[1], 128
    xs, ys = [], []
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise UserError(f"{what}: batches must be (inputs, targets) pairs, got "
                                f"{type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]).detach().cpu())
            ys.append(torch.as_tensor(batch[1]).detach().cpu())
    except TypeError as e:
        raise UserError(f"{what}: not iterable ({e})") from e
    if not xs:
        raise UserError(f"{what}: yielded no batches")
    bs = getattr(loader, "batch_size", None) or len(xs[0])
    return torch.cat(xs), torch.cat(ys), int(bs)


def optimize(model: nn.Module | Callable[[], nn.Module], train_loader: Iterable | Any,
             val_loader: Iterable | Any | None = None, *, steps: int, trials: int = 20,
             seeds: int = 3, fine_tune: int = 0, device: str = "auto",
             out: str | Path | None = None, task: str | None = None,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             optimizer: str | None = None, batch_size: int | None = None,
             storage: str | None = None, study: str | None = None, n_jobs: int = 1,
             seed: int = 0, zoo: str | Path | None = None, race: str = "halving",
             race_all: bool = False, resume: bool = False, progress: bool = True) -> Result:
    """Train ``model`` with the best learned optimizer and compare with Optuna-tuned Adam/SGD.

    Args:
        model: an ``nn.Module`` (its weights are the seed-0 initialisation; other seeds re-draw
            them with ``reset_parameters``) or a zero-argument factory.
        train_loader / val_loader: ``DataLoader``s (or any iterables of ``(x, y)`` batches, or an
            ``(X, y)`` tensor pair).  They are read once into memory on ``device``; without
            ``val_loader`` 20% of the training data are split off (seeded).
        steps: optimizer steps per training run, for every contender.
        trials, seeds, fine_tune: Optuna trials per baseline; seeds in the finals; meta-training
            iterations on this task (0: none).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        out: run directory (default ``runs/<timestamp>-<model>``); must not hold another run
            unless ``resume=True``.
        race: ``"halving"`` (successive halving over the zoo) or ``"full"`` (every entry the
            whole probe); ``optimizer=NAME`` skips the race.
        race_all: also race the entries whose card says ``"race": false`` (the papers'
            reproductions and training-task specialists, left out by default).

    Returns a :class:`Result`: ``.winner``, ``.leaderboard``, ``.model`` (trained by the winner),
    ``.report`` (the ``report.json`` dict) and ``.run_dir``.
    """
    x, y, bs = _materialise(train_loader, "train_loader")
    xv = yv = None
    if val_loader is not None:
        xv, yv, _ = _materialise(val_loader, "val_loader")
    cfg = FitConfig(steps=steps, trials=trials, seeds=seeds, fine_tune=fine_tune, device=device,
                    batch_size=bs if batch_size is None else batch_size, optimizer=optimizer, storage=storage,
                    study=study, n_jobs=n_jobs, seed=seed, race=race,
                    race_all=race_all, zoo=None if zoo is None else str(zoo))
    cfg.validate()
    check_zoo(cfg)
    data = from_tensors(x, y, xv, yv, seed=seed, task=task)
    problem = Problem(from_object(model, task=task, loss_fn=loss_fn), data,
                      resolve_device(device))
    problem.check(cfg.batch_size)
    return _run(problem, cfg, out, resume, {"model": "<api model>", "data": "<api loaders>"},
                Reporter(progress))


def fit_files(model_path: str | Path | None, data_path: str | Path | None, cfg: FitConfig, *,
              out: str | Path | None = None, target: str | None = None,
              resume: str | Path | None = None, reporter: Reporter | None = None,
              explicit: Collection[str] | None = None) -> Result:
    """What ``autol2o fit`` does: load MODEL.py and DATA (or a run to resume), then run.
    ``explicit``: the config fields given on the command line (see :func:`resume_config`)."""
    reporter = reporter or Reporter(True)
    if resume is not None:
        if model_path is not None or data_path is not None:
            raise UserError(f"{resume}: --resume takes no MODEL or DATA; they come from the "
                            "run's state.json")
        state = read_state(Path(resume))
        inp = state.get("inputs", {})
        if inp.get("model") == "<api model>":
            raise UserError(f"{resume}: this run was started from Python; resume it with "
                            "autol2o.optimize(..., out=RUN_DIR, resume=True)")
        cfg = resume_config(state, cfg, Path(resume), explicit)
        model_path, data_path, target = inp.get("model"), inp.get("data"), inp.get("target")
    cfg.validate()
    check_zoo(cfg)   # before any loading: nothing to race is the first thing to say
    if model_path is None:
        model_path = default_example()
    um = load_model_file(model_path)
    reporter.log(f"model: {model_path} (entry point {um.entry}"
                 + (f", task {um.task}" if um.task else "")
                 + (", custom loss_fn" if um.loss_fn else "") + ")")
    data = load_data(data_path, target=target, seed=cfg.seed, task=um.task)
    reporter.log(f"data: {data.describe()}")
    for note in data.notes:
        reporter.log(f"data: {note}")
    problem = Problem(um, data, resolve_device(cfg.device))
    problem.check(cfg.batch_size)
    reporter.log(f"model: {problem.n_params} trainable parameters, {problem.task}, device "
                 f"{problem.device}")
    inputs = {"model": str(Path(model_path).resolve()),
              "data": None if data_path is None else
              (str(Path(data_path).resolve()) if Path(data_path).exists() else str(data_path)),
              "target": target}
    return _run(problem, cfg, out if resume is None else resume, resume is not None, inputs,
                reporter, explicit)


def _run(problem: Problem, cfg: FitConfig, out, resume: bool, inputs: dict[str, Any],
         reporter: Reporter, explicit: Collection[str] | None = None) -> Result:
    threads = torch.get_num_threads()
    want = cfg.threads
    if want is None and problem.device.type == "cpu" and problem.n_params < SMALL_MODEL:
        want = 1
    if want:
        torch.set_num_threads(want)
    try:
        return _run_in(problem, cfg, out, resume, inputs, reporter, explicit)
    finally:
        torch.set_num_threads(threads)


def _run_in(problem: Problem, cfg: FitConfig, out, resume: bool, inputs: dict[str, Any],
            reporter: Reporter, explicit: Collection[str] | None = None) -> Result:
    if resume:
        if out is None:
            raise UserError("resume needs the run directory (out=RUN_DIR)")
        run_dir = Path(out)
        state = read_state(run_dir)
        if state.get("status") == "complete":
            raise UserError(f"{run_dir}: this run is already complete (see its report.json)")
        cfg = resume_config(state, cfg, run_dir, explicit)
        check_zoo(cfg)
        reporter.log(f"resuming {run_dir}")
        fr = FitRun(problem, cfg, run_dir, reporter=reporter, state=state)
    else:
        check_fine_tune(problem, cfg)   # before the run directory exists
        cfg = pin_paths(cfg)
        if cfg.storage:  # a bad URL or unreachable database fails before the run directory exists
            from autol2o.tuning import make_storage

            make_storage(cfg.storage)
        run_dir = new_run_dir(out, problem.model.name)
        reporter.log(f"run directory: {run_dir}")
        fr = FitRun(problem, cfg, run_dir, inputs=inputs, reporter=reporter)
    return fr.run()


def default_example() -> Path:
    """The bundled MLP for the embedded digits default (shipped as package data)."""
    return Path(__file__).resolve().parent.parent / "examples" / "mlp_digits.py"
