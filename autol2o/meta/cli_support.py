"""Glue between ``autol2o zoo train`` and the trainer: meta-train, then write a zoo entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..optimizers.base import RULES, build_rule
from .tasks import build_task
from .trainer import TrainConfig, _world, meta_train


def train_to_zoo(rule_name: str, task_names: list[str], config: TrainConfig, out: Path,
                 data_dir: Path | None, device: str, resume: bool, command: str,
                 init: str | Path | None = None) -> Path:
    """Meta-train a ``rule_name`` rule on ``task_names`` and save it as zoo entry ``out``.

    The rule starts from random weights, or from zoo entry ``init`` (a name or a directory,
    checksum verified; its rule must be ``rule_name``) to continue training it.

    The checkpoint lives in ``out/checkpoint/`` while training (``resume=True`` continues from
    it) and is removed once the entry is written.  Validation (if ``config.validate_every``) uses
    the training tasks on held-out instance seeds.  Under ``torchrun`` only rank 0 writes.
    Returns ``out``.
    """
    from ..zoo import load_entry, save_entry

    if rule_name not in RULES:
        raise UserError(f"unknown learned rule {rule_name!r}; known: {', '.join(sorted(RULES))}")
    if not task_names:
        raise UserError("give at least one training task (--task NAME)")
    out = Path(out)
    torch.manual_seed(config.seed)  # the rule's random init is part of "seeds for everything"
    rule = build_rule({"rule": rule_name})
    init_from = None
    if init is not None:
        start, start_card = load_entry(init)
        if start.name != rule_name:
            raise UserError(f"--init {init}: entry holds a {start.name!r} rule, not {rule_name!r}")
        rule = start
        init_from = {"entry": start_card.get("name", str(init)), "sha256": start_card.get("sha256"),
                     "meta_iterations": (start_card.get("training") or {}).get("meta_iterations")}
    tasks = [build_task(name, data_dir, device) for name in task_names]
    ckpt = out / "checkpoint"
    _check_init(ckpt, init_from, resume)
    result = meta_train(rule, tasks, config, device=device, checkpoint_dir=ckpt, resume=resume,
                        progress=True)
    rank, _ = _world()
    if rank != 0:
        return out
    card = {
        "name": out.name,
        "description": f"{rule_name} meta-trained on {', '.join(task_names)}",
        "trained_on": list(task_names),
        **result.card_fields,
        **({"init_from": init_from} if init_from else {}),
        "command": command,
    }
    save_entry(result.rule.cpu(), out, card, overwrite=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def _check_init(ckpt: Path, init_from: dict | None, resume: bool) -> None:
    """Record which weights a run started from next to its checkpoint; a resume must start from
    the same ones (same ``--init`` entry, by sha256, or none)."""
    import json

    record = ckpt / "init.json"
    if resume and (ckpt / "checkpoint.pt").is_file():
        was = json.loads(record.read_text()) if record.is_file() else None
        was_sha = (was or {}).get("sha256")
        now_sha = (init_from or {}).get("sha256")
        if was_sha != now_sha:
            started = f"--init {was['entry']} ({was_sha[:12]})" if was else "random weights"
            raise UserError(f"{ckpt}: this run started from {started}; resume it with the same "
                            "--init (or none)")
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    if init_from is not None:
        record.write_text(json.dumps(init_from))
    elif record.exists():
        record.unlink()
