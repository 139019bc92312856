"""Glue between ``autol2o zoo train`` and the trainer: meta-train, then write a zoo entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..optimizers.base import RULES, build_rule
from .tasks import build_task
from .trainer import CHECKPOINT, TrainConfig, _world, meta_train


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` (CUDA if there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked
    before anything is loaded or written."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available")
    return device


def rule_options(rule_name: str, magnitude: bool) -> dict:
    """The rule options ``zoo train`` and ``meta.launch`` take, checked against the rule."""
    if magnitude and rule_name != "rnnprop":
        raise UserError(f"--magnitude is an option of --rule rnnprop, not {rule_name}")
    return {"magnitude": True} if magnitude else {}


def train_to_zoo(rule_name: str, task_names: list[str], config: TrainConfig, out: Path,
                 data_dir: Path | None, device: str, resume: bool, command: str,
                 init: str | Path | None = None, overwrite: bool = False,
                 rule_options: dict | None = None) -> Path:
    """Meta-train a ``rule_name`` rule on ``task_names`` and save it as zoo entry ``out``.

    The rule starts from random weights (built with ``rule_options``, e.g. ``{"magnitude":
    True}``), or from zoo entry ``init`` (a name or a directory, checksum verified; its rule
    must be ``rule_name`` and agree with ``rule_options``) to continue training it.

    The checkpoint lives in ``out/checkpoint/`` while training (``resume=True`` continues from
    it, and needs it) and is removed once the entry is written.  An existing entry, or an
    interrupted run's checkpoint, is only replaced with ``overwrite=True``.  Validation (if
    ``config.validate_every``) uses the training tasks on held-out instance seeds.  Under
    ``torchrun`` only rank 0 writes.  Returns ``out``.
    """
    from ..zoo import CARD_FILE, WEIGHTS_FILE, load_entry, save_entry

    if rule_name not in RULES:
        raise UserError(f"unknown learned rule {rule_name!r}; known: {', '.join(sorted(RULES))}")
    if not task_names:
        raise UserError("give at least one training task (--task NAME)")
    device = resolve_device(device)
    out = Path(out)
    ckpt = out / "checkpoint"
    has_ckpt = (ckpt / CHECKPOINT).is_file()
    # every refusal before anything is created: a refused run leaves no trace
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{out}: " + ("exists and is a file" if existing == out
                                      else f"{existing} is a file"))
    if resume and not has_ckpt:
        raise UserError(f"{ckpt}: no checkpoint to resume")
    if not (resume or overwrite):
        if (out / CARD_FILE).exists() or (out / WEIGHTS_FILE).exists():
            raise UserError(f"{out}: zoo entry already exists (use --overwrite to replace it"
                            f"{', or --resume to finish its checkpointed run' if has_ckpt else ''})")
        if has_ckpt:
            raise UserError(f"{ckpt}: an interrupted run's checkpoint is here (use --resume to "
                            "continue it, or --overwrite to start over)")
        # a folder of something else (a typo'd --out): the entry must not land among its files.
        # checkpoint/ is this command's own (under torchrun rank 0 may have made it already);
        # dot-files (.gitkeep, .DS_Store) are no one's data
        if out.is_dir() and any(p.name != "checkpoint" and not p.name.startswith(".")
                                for p in out.iterdir()):
            raise UserError(f"{out}: exists, is not empty and holds no zoo entry (choose a new "
                            "--out, or --overwrite to write the entry into it)")
    options = dict(rule_options or {})
    torch.manual_seed(config.seed)  # the rule's random init is part of "seeds for everything"
    try:
        rule = build_rule({"rule": rule_name, **options})
    except TypeError as exc:  # an option this rule does not have
        raise UserError(f"rule {rule_name!r}: {exc}") from None
    init_from = None
    if init is not None:
        start, start_card = load_entry(init)
        if start.name != rule_name:
            raise UserError(f"--init {init}: entry holds a {start.name!r} rule, not {rule_name!r}")
        # the entry's config wins; an option given that contradicts it is a mistake
        clash = {k: v for k, v in options.items() if start.config().get(k) != v}
        if clash:
            raise UserError(f"--init {init}: the entry's rule has no "
                            + ", ".join(f"{k}={v}" for k, v in clash.items()))
        rule = start
        init_from = {"entry": start_card.get("name", str(init)), "sha256": start_card.get("sha256"),
                     "meta_iterations": (start_card.get("training") or {}).get("meta_iterations")}
    tasks = [build_task(name, data_dir, device) for name in task_names]
    if not resume:  # starting over (--overwrite): a stale checkpoint must not be resumed later
        (ckpt / CHECKPOINT).unlink(missing_ok=True)
    _check_init(ckpt, init_from, resume)
    result = meta_train(rule, tasks, config, device=device, checkpoint_dir=ckpt, resume=resume,
                        progress=True)
    rank, _ = _world()
    if rank != 0:
        return out
    card = {
        "name": out.name,
        "description": f"{rule_name} meta-trained on {', '.join(t.name for t in tasks)}",
        "trained_on": [t.name for t in tasks],
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
    if resume:  # train_to_zoo made sure there is a checkpoint
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
