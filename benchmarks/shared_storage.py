"""Check that several ``autol2o fit`` processes can share one Optuna study on a given storage.

The test suite proves this for journal files and SQLite (``tests/test_fit_storage.py``); database
servers cannot be assumed on a CI machine, so this script runs the same check against any
storage URL you point it at, e.g. a PostgreSQL or MySQL server::

    python benchmarks/shared_storage.py --storage postgresql://user@host:5432/optuna
    python benchmarks/shared_storage.py --storage mysql+pymysql://user:pw@host/optuna --processes 3

It starts ``--processes`` concurrent ``autol2o fit`` runs on the embedded digits default (Adam
baseline only, ``--trials`` each, one shared study), then audits the study: trial numbers have no
gaps or duplicates, no trial is left RUNNING, the total is the requested count (each extra process
may overshoot by one), every trial was run by exactly one process and every process contributed.
Prints a table and writes ``benchmarks/results/shared_storage-<backend>.md``.  Exit status 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from autol2o.tuning import counts_as_done, make_storage

RESULTS = Path(__file__).parent / "results"


def redact(url: str) -> str:
    """The URL without its password (for logs and the results file)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def audit(study: optuna.Study, reports: list[dict], trials_wanted: int) -> list[tuple[str, bool]]:
    """The checks, as ``(description, passed)`` pairs."""
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    ids = [t._trial_id for t in trials]
    mine = [set(r["tuning"]["adam"]["trials_by_this_process"]) for r in reports]
    overlap = set().union(*[a & b for i, a in enumerate(mine) for b in mine[i + 1:]])
    extra = len(reports) - 1
    return [
        (f"trial numbers 0..{len(trials) - 1} without gaps or duplicates",
         numbers == list(range(len(trials)))),
        ("trial ids unique", len(set(ids)) == len(ids)),
        ("no trial left RUNNING or lost", all(counts_as_done(t) for t in trials)),
        (f"{trials_wanted} <= trials ({len(trials)}) <= {trials_wanted + extra}",
         trials_wanted <= len(trials) <= trials_wanted + extra),
        ("no trial run by two processes", not overlap),
        ("every trial has its process", set().union(*mine) == set(numbers)),
        (f"all {len(reports)} processes contributed",
         len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs})
         == len(reports)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", required=True, help="Optuna storage URL (any backend)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--trials", type=int, default=8, help="Adam trials in the shared study")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per trial")
    ap.add_argument("--study", default=None, help="study name (default: a fresh, timestamped one)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    study_name = args.study or f"autol2o-shared-{int(time.time())}"
    backend = urlsplit(args.storage).scheme.split("+")[0] or "storage"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "autol2o", "fit", "--steps", str(args.steps), "--trials",
               str(args.trials), "--seeds", "1", "--baselines", "adam", "--optimizer",
               "rnnprop-mnist", "--storage", args.storage, "--study", study_name, "--json"]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([*cmd, "--out", str(Path(tmp) / f"run{i}")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(args.processes)]
        reports = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                for other in procs:  # stop the rest before their run directories go away
                    other.kill()
                    other.wait()
                print(f"an autol2o fit process failed:\n{err.strip()[-2000:]}", file=sys.stderr)
                return 1
            reports.append(json.loads(out))
        wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=f"{study_name}-adam", storage=make_storage(args.storage))
    checks = audit(study, reports, args.trials)
    per_process = [len(r["tuning"]["adam"]["trials_by_this_process"]) for r in reports]

    lines = [f"# Shared Optuna storage: {backend}", "",
             f"`python benchmarks/shared_storage.py --storage {redact(args.storage)} "
             f"--processes {args.processes} --trials {args.trials}` "
             f"(optuna {optuna.__version__}; {wall:.0f} s wall time).", "",
             f"{args.processes} concurrent `autol2o fit` processes, study `{study_name}-adam`, "
             f"trials per process: {per_process}.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {text} | {'pass' if ok else 'FAIL'} |" for text, ok in checks]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"shared_storage-{backend}.md").write_text(report)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
