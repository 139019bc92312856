"""Data-parallel meta-training entry point for ``torchrun`` (also works as a single process).

    torchrun --nproc_per_node 2 -m autol2o.meta.launch --rule rnnprop --task mlp-digits \\
        --iterations 500 --out pretrained/NAME

Each rank runs its own optimizee instances (seeds offset by rank); meta-gradients are averaged
with ``all_reduce`` (gloo on CPU, NCCL on GPU) and rank 0 writes checkpoints and the zoo entry.
Options and defaults are those of ``autol2o zoo train`` (``--random-scaling R`` takes r, 0: off);
``--batch`` is per rank.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from .cli_support import resolve_device, rule_options, train_to_zoo
from .trainer import TrainConfig, meta_train, paper_recipe

#: the defaults of ``autol2o zoo train`` where they differ from :class:`TrainConfig`'s
#: (tests/test_meta_train.py checks that both entry points build the same config)
LAUNCH_DEFAULTS = {"iterations": 200, "meta_lr": 1e-3, "checkpoint_every": 25}


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the ``torchrun`` process group if there is one; returns ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def canonical_command(rule: str, tasks: list[str], config: TrainConfig, options: dict,
                      world: int, data_dir: Path | None, init: str | None, out: Path) -> str:
    """The card's command: every setting that decides the weights spelled out (not the ones
    that only say how to compute), so it reproduces the entry even if defaults change."""
    c = config
    argv = ["--rule", rule, *[a for t in tasks for a in ("--task", t)],
            "--horizon", c.horizon, "--unroll", c.unroll, "--iterations", c.iterations,
            "--batch", c.batch, "--meta-lr", c.meta_lr, "--lr-schedule", c.lr_schedule,
            "--warmup", c.warmup, *(["--ema", c.ema] if c.ema else []),
            *(["--magnitude"] if options.get("magnitude") else []),
            *(["--init", init] if init else []),
            "--random-scaling", c.random_scaling,
            "--convex" if c.convex_combination else "--no-convex",
            "--meta-loss", c.meta_loss, *(["--log-loss"] if c.log_loss else []),
            *(["--relative-loss"] if c.relative_loss else []),
            *(["--meta-batch-size", c.meta_batch_size] if c.meta_batch_size else []),
            *(["--meta-data", c.meta_data] if c.meta_data != "train" else []),
            *(["--second-order"] if c.second_order else []),
            "--validate-every", c.validate_every, "--val-runs", c.val_runs,
            *(["--data-dir", data_dir] if data_dir else []), "--seed", c.seed, "--out", out]
    return (f"torchrun --nproc_per_node {world} -m autol2o.meta.launch "
            + " ".join(shlex.quote(str(a)) for a in argv))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autol2o.meta.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="rnnprop")
    p.add_argument("--task", action="append", dest="tasks")
    p.add_argument("--out", type=Path, help="zoo entry directory to write")
    p.add_argument("--dump-weights", type=Path,
                   help="instead of a zoo entry, every rank saves its meta-weights here: the last "
                        "iterate ('final') and the returned rule ('result': averaged with --ema, "
                        "best by validation with --validate-every)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing entry, or an interrupted run, at --out")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: keep)")
    p.add_argument("--init", help="start from this zoo entry's weights (name or directory)")
    for name, typ in (("horizon", int), ("unroll", int), ("iterations", int), ("batch", int),
                      ("meta-lr", float), ("random-scaling", float), ("seed", int),
                      ("validate-every", int), ("val-runs", int), ("checkpoint-every", int),
                      ("warmup", int), ("lr-schedule", str), ("ema", float),
                      ("meta-batch-size", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--meta-loss", choices=["last", "mean"])
    p.add_argument("--meta-data", choices=["train", "heldout"])
    p.add_argument("--convex", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--log-loss", action="store_true", help="meta-train on log(loss)")
    p.add_argument("--relative-loss", action="store_true",
                   help="meta-train on loss / (the run's loss at step 0)")
    p.add_argument("--second-order", action="store_true",
                   help="keep second derivatives (the exact meta-gradient of each unroll)")
    p.add_argument("--magnitude", action="store_true",
                   help="RNNprop with the log-RMS input (see autol2o.optimizers.rnnprop)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    try:
        return _run(p, args)
    except UserError as exc:  # one line, as from the autol2o CLI
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in
          ("horizon", "unroll", "iterations", "batch", "meta-lr", "random-scaling", "seed",
           "validate-every", "val-runs", "checkpoint-every", "warmup", "lr-schedule",
           "meta-loss", "ema", "meta-batch-size", "meta-data")}
    # what is not given defaults as in ``autol2o zoo train`` (the rule's paper recipe: tricks on
    # for RNNprop, the mean meta-loss for DM), so that a torchrun job trains what zoo train would
    given = {k: v for k, v in kw.items() if v is not None}
    if args.convex is not None:
        given["convex_combination"] = args.convex
    # checked before joining the process group, so that a bad option fails every rank alike
    config = TrainConfig(**{**LAUNCH_DEFAULTS, **paper_recipe(args.rule), **given},
                         log_loss=args.log_loss, relative_loss=args.relative_loss,
                         second_order=args.second_order)
    options = rule_options(args.rule, args.magnitude)
    rank, world, device = init_distributed(resolve_device(args.device))
    tasks = args.tasks or ["mlp-digits"]
    try:
        if args.dump_weights is not None:
            if args.init:
                p.error("--init is not supported with --dump-weights")
            from ..optimizers.base import build_rule
            from .tasks import build_task

            torch.manual_seed(config.seed)
            rule = build_rule({"rule": args.rule, **options})
            res = meta_train(rule, [build_task(t, args.data_dir, device) for t in tasks], config,
                             device=device, progress=False)
            args.dump_weights.mkdir(parents=True, exist_ok=True)
            torch.save({"final": rule.state_dict(), "result": res.rule.state_dict(),
                        "diverged": res.diverged,
                        "history": res.history}, args.dump_weights / f"rank{rank}.pt")
        else:
            if args.out is None:
                p.error("--out (or --dump-weights) is required")
            command = canonical_command(args.rule, tasks, config, options, world,
                                        args.data_dir, args.init, args.out)
            train_to_zoo(args.rule, tasks, config, args.out, args.data_dir, device, args.resume,
                         command, init=args.init, overwrite=args.overwrite,
                         rule_options=options)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
