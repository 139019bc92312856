"""Optuna-tuned Adam and SGD baselines: search spaces, storages, studies and compute accounting.

Search spaces (every trial gets the same step budget as the learned optimizer):

* Adam: ``lr ~ LogUniform(1e-5, 1)``;
* SGD: ``lr ~ LogUniform(1e-5, 1)``, ``momentum ~ Uniform(0, 0.99)``, ``nesterov in {no, yes}``.

Sampler: TPE with a seed; pruner: :class:`optuna.pruners.MedianPruner` on the intermediate
validation losses.  A trial that diverges is recorded as FAIL (with user attribute
``diverged = True``) and the study goes on.  Each trial stores ``steps_run``, ``wall_time`` and
its validation curve as user attributes, so compute and "steps to match" can be computed from the
storage alone, also when several processes share one study.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autol2o.errors import UserError

KINDS = ("adam", "sgd")
# Trial-by-trial INFO lines would drown the progress display, and a failed (diverged or
# interrupted) trial is logged as a WARNING with a traceback; the report lists every trial.
optuna.logging.set_verbosity(optuna.logging.ERROR)
LR_RANGE = (1e-5, 1.0)


class Diverged(Exception):
    """Raised inside an objective when training diverged; Optuna records the trial as FAIL."""


def suggest(trial: optuna.Trial, kind: str) -> dict[str, Any]:
    """Draw one configuration of ``kind`` (``"adam"`` or ``"sgd"``)."""
    lr = trial.suggest_float("lr", *LR_RANGE, log=True)
    if kind == "adam":
        return {"lr": lr}
    if kind == "sgd":
        momentum = trial.suggest_float("momentum", 0.0, 0.99)
        nesterov = trial.suggest_categorical("nesterov", [False, True])
        return {"lr": lr, "momentum": momentum, "nesterov": nesterov}
    raise ValueError(f"unknown baseline {kind!r}")


def redact(url: str) -> str:
    """``url`` (or a text quoting URLs) with database passwords replaced by ``***``.

    The user info ends at the *last* ``@`` of the authority, so a password containing ``@`` is
    hidden whole; an empty user name (``postgresql://:secret@host/db``) is handled too."""
    def hide(m: re.Match) -> str:
        if "@" not in m.group(2):
            return m.group(0)
        userinfo, host = m.group(2).rsplit("@", 1)
        if ":" not in userinfo:
            return m.group(0)
        return f"{m.group(1)}{userinfo.split(':', 1)[0]}:***@{host}"

    # every URL in the text (error messages quote them too); its authority ends at / ? # or space
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s]*)", hide, url)


def _file_path(url: str) -> tuple[str, str] | None:
    """``(prefix, path)`` of a file-based storage URL, else None: ``sqlite:///rel.db`` and
    ``journal:///rel.log`` are relative (like SQLAlchemy's sqlite URLs), four slashes absolute;
    ``journal:rel.log`` and a bare ``rel.log`` / ``rel.journal`` are relative too."""
    m = re.match(r"^(sqlite(?:\+\w+)?:///)(.+)$", url)
    if m:
        return m.group(1), m.group(2)
    if url.startswith("journal:"):
        rest = url.removeprefix("journal:")
        rest = rest[3:] if rest.startswith("///") else rest.removeprefix("//")
        return "journal:///", rest
    if url.endswith((".log", ".journal")) and "://" not in url:
        return "", url
    return None


def pin_storage(url: str | None) -> str | None:
    """``url`` with a relative file path made absolute (from the current directory), so that a
    run resumed from elsewhere opens the same file; other URLs unchanged."""
    fp = None if url is None else _file_path(url)
    if fp is None or fp[1] == ":memory:":
        return url
    prefix, path = fp
    return prefix + str(Path(path).resolve()) if prefix else str(Path(path).resolve())


def make_storage(url: str, *, attempts: int = 6) -> optuna.storages.BaseStorage:
    """Any Optuna storage from a URL.

    ``sqlite:///path.db``, ``postgresql://...``, ``mysql://...`` go to Optuna's RDB storage;
    ``journal:///path/file.log`` or a path ending in ``.log``/``.journal`` is a journal file
    (safe for several processes on one machine or on NFS).  As in SQLite URLs, three slashes
    start a relative path and four an absolute one (``journal:////abs/file.log``).  Several
    processes may open a fresh RDB storage at the same moment; whoever loses the race to create
    its tables retries.
    """
    fp = _file_path(url)
    if fp is not None and not url.startswith("sqlite"):
        path = fp[1]
    else:
        shown = redact(url)
        if "://" not in url:
            raise UserError(f"{shown}: not an Optuna storage URL (expected sqlite:///file.db, "
                            "postgresql://..., mysql://... or journal:///file.log)")
        # sqlite: wait for a lock held by another process instead of failing at once
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except ImportError as e:  # no database driver: retrying cannot help
                raise UserError(f"{shown}: cannot open Optuna storage: no database driver for it "
                                f"({e.__cause__ or e}); install one and name it in the URL, e.g. "
                                "pip install psycopg2-binary with postgresql+psycopg2://..., "
                                "pip install pymysql with mysql+pymysql://...") from e
            except Exception as e:  # schema-creation race, unreachable server, bad URL
                if attempt == attempts - 1:
                    detail = redact(" ".join(str(e).split()))[:200]
                    raise UserError(f"{shown}: cannot open Optuna storage ({type(e).__name__}: "
                                    f"{detail})") from e
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    from optuna.storages.journal import JournalFileBackend

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    except OSError as e:
        raise UserError(f"{path}: cannot open journal storage ({e.strerror})") from e


def open_study(storage: Any, name: str, seed: int, *, shared: bool,
               warmup_steps: int = 0, signature: dict[str, Any] | None = None) -> optuna.Study:
    """Create or load study ``name``; TPE seeded, MedianPruner.

    The pruner compares a trial's intermediate validation loss with the median of earlier
    trials at the same step, after 5 complete trials and from step ``warmup_steps`` on (the
    first steps say little about the final loss).

    The sampler seed also mixes in the number of trials already stored, so a resumed study does
    not replay its first random configurations; for a shared storage it mixes in the process id
    as well, so two workers starting together do not draw the same configurations.

    ``signature`` (JSON-able: step budget, model, data shape, ...) is stored with the study when
    it is new; a study of the same name with another signature is refused, since its trials would
    be counted, and its best configuration used, for a different problem.
    """
    if isinstance(storage, str):
        storage = make_storage(storage)
    for attempt in range(6):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                        load_if_exists=True)
            n_before = len(study.trials)
            break
        except Exception as e:  # two processes creating the study at once, corrupt file, ...
            if attempt == 5:
                raise UserError(f"{name}: cannot open Optuna study ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from e
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    # a study of that name made by another tool (or by hand) may maximise, or have several
    # objectives: TPE would then chase the *worst* loss, or Trial.report would fail mid-run
    if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
        dirs = ", ".join(d.name.lower() for d in study.directions)
        raise UserError(f"{name}: an Optuna study of this name already exists in the storage "
                        f"with direction {dirs}; autol2o minimises one validation loss "
                        "(choose another --study)")
    if signature is not None:
        _check_signature(study, name, signature)
    s = seed * 1000 + n_before + (os.getpid() % 100000 * 7919 if shared else 0)
    study.sampler = optuna.samplers.TPESampler(seed=s % (2**31))
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup_steps)
    return study


SIGNATURE_ATTR = "autol2o_signature"


def _check_signature(study: optuna.Study, name: str, signature: dict[str, Any]) -> None:
    sig = json.loads(json.dumps(signature))  # as the storage gives it back (tuples -> lists)
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        study.set_user_attr(SIGNATURE_ATTR, sig)
        return
    diff = sorted(k for k in set(stored) | set(sig) if stored.get(k) != sig.get(k))
    if diff:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {sig.get(k)!r} here" for k in diff[:3])
        raise UserError(f"{name}: this Optuna study was made for another problem ({shown}); "
                        "its trials cannot be shared (choose another --study)")


def counts_as_done(t: FrozenTrial) -> bool:
    """Finished trials: complete, pruned, or failed because training diverged.

    Trials that failed otherwise (e.g. interrupted by Ctrl-C) are not counted, so ``--resume``
    runs them again.
    """
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and bool(t.user_attrs.get("diverged"))


def n_done(study: optuna.Study) -> int:
    return sum(counts_as_done(t) for t in study.get_trials(deepcopy=False))


def run_study(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
              *, n_jobs: int = 1, on_trial: Callable[[FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` finished ones (others may add to it too).

    Returns the number of trials this call ran.
    """
    ran = [0]

    def stop_when_full(st: optuna.Study, t: FrozenTrial) -> None:
        ran[0] += 1
        if on_trial is not None:
            on_trial(t)
        if n_done(st) >= n_trials:
            st.stop()

    remaining = n_trials - n_done(study)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, n_jobs=n_jobs, catch=(Diverged,),
                       callbacks=[stop_when_full])
    return ran[0]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """JSON-able summary of a trial for the report."""
    return {"number": t.number, "state": t.state.name, "params": dict(t.params),
            "value": t.value, "steps_run": t.user_attrs.get("steps_run", 0),
            "wall_time": t.user_attrs.get("wall_time"), "diverged": bool(t.user_attrs.get("diverged")),
            "worker": t.user_attrs.get("worker"),
            "curve_steps": t.user_attrs.get("curve_steps", []),
            "curve_val": t.user_attrs.get("curve_val", [])}


def compute_spent(study: optuna.Study) -> dict[str, Any]:
    """Optimizer steps and wall time summed over the study's finished trials."""
    ts = [t for t in study.get_trials(deepcopy=False) if counts_as_done(t)]
    return {"trials": len(ts), "steps": int(sum(t.user_attrs.get("steps_run", 0) for t in ts)),
            "wall_time": float(sum(t.user_attrs.get("wall_time") or 0.0 for t in ts))}


def steps_to_match(study: optuna.Study, target: float) -> int | None:
    """Total optimizer steps the study needed (trials in order) until a run reached ``target``.

    Sums ``steps_run`` of every earlier trial plus the steps into the first trial whose
    validation curve reaches ``target``; ``None`` if no trial ever did.
    """
    total = 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not counts_as_done(t):
            continue
        for s, v in zip(t.user_attrs.get("curve_steps", []), t.user_attrs.get("curve_val", [])):
            if v is not None and v <= target:
                return total + int(s)
        total += int(t.user_attrs.get("steps_run", 0))
    return None
