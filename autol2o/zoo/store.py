"""The pretrained zoo on disk: one directory per learned optimizer.

An entry ``NAME/`` holds two files::

    weights.safetensors   the rule's meta-weights (safetensors: loading never runs code)
    card.json             what it is and how it was made (see :data:`CARD_FIELDS`)

The card stores the SHA-256 of the weights file, so a corrupt download or a tampered file is
caught before a single byte of it reaches ``load_state_dict``.  Everything else in the card
(evaluation summary, notes) may be edited later without invalidating the checksum.

Names resolve against the zoo root: ``$AUTOL2O_ZOO`` if set, else the zoo shipped with the
package (``pretrained/`` in a source checkout, ``autol2o/pretrained/`` once installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from autol2o.atomic import atomic_write_bytes
from autol2o.errors import UserError
from autol2o.optimizers.base import RULES, LearnedRule, build_rule

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
ENV_VAR = "AUTOL2O_ZOO"

#: card keys, in the order they are written; ``save_entry`` fills the ones marked (auto)
CARD_FIELDS = (
    "format_version",   # (auto) int, this module's FORMAT_VERSION
    "name",             # (auto: directory name unless given)
    "rule",             # (auto) registry name, e.g. "rnnprop"
    "rule_config",      # (auto) LearnedRule.config(): rebuilds the module
    "n_meta_params",    # (auto) number of meta-weights
    "sha256",           # (auto) hex digest of weights.safetensors
    "description",      # one line for humans
    "tasks",            # list of task specs (JSON) the rule was meta-trained on
    "tricks",           # e.g. {"random_scaling": 3.0, "convex_combination": true}
    "training",         # horizon, unroll, meta_iterations, meta_lr, batch, curriculum, seed ...
    "wall_time_s",      # meta-training wall time
    "hardware",         # where it was trained
    "evaluation",       # {"headline": "...", ...} filled by benchmarks/zoo_eval.py
    "race",             # false: `autol2o fit`'s race leaves the entry out unless --race-all
                        # (references and specialists); absent or true: it races
    "command",          # the command line that reproduces the entry
    "init_from",        # {"entry", "sha256", "meta_iterations"} when training started from
                        # another entry's weights (``zoo train --init``), else absent
    "created",          # (auto) UTC timestamp
    "autol2o_version",  # (auto)
)


class ZooError(UserError):
    """A zoo entry is missing, unreadable, of an unknown format, or fails its checksum."""


@dataclass
class ZooEntry:
    """One zoo entry: its name, directory and parsed card (weights are not read)."""

    name: str          # the directory name (what lookup by name uses)
    path: Path
    card: dict[str, Any]
    error: str | None = None   # why the card cannot be read (then ``card`` is empty)

    @property
    def races(self) -> bool:
        """Whether ``autol2o fit``'s race includes it (a card opts out with ``"race": false``;
        an entry whose card cannot be read never races)."""
        return self.error is None and self.card.get("race", True) is not False

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE


# -- locating ---------------------------------------------------------------------------------
def shipped_root() -> Path:
    """The zoo that ships with autol2o.

    Installed (wheel or editable install made from the current ``pyproject.toml``) it is the
    data-only package ``autol2o.pretrained``; in an older editable install or a bare checkout it
    is the repository's top-level ``pretrained/`` directory.
    """
    try:
        spec = importlib.util.find_spec("autol2o.pretrained")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if Path(loc).is_dir():
                return Path(loc)
    return Path(__file__).resolve().parents[2] / "pretrained"


def zoo_root(root: Path | str | None = None) -> Path:
    """``root`` if given, else ``$AUTOL2O_ZOO``, else :func:`shipped_root`."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else shipped_root()


def resolve(name_or_path: str | Path, root: Path | str | None = None) -> Path:
    """Directory of a zoo entry given its name (looked up in the root) or a path to it."""
    if isinstance(name_or_path, Path) or os.sep in str(name_or_path) or str(name_or_path) in (
        ".", ".."
    ):
        path = Path(name_or_path)
        if not path.is_dir():
            raise ZooError(f"{path}: zoo entry directory not found")
        return path
    base = zoo_root(root)
    path = base / str(name_or_path)
    if path.is_dir():
        return path
    if Path(name_or_path).is_dir():  # a relative path without a separator, e.g. "my-entry"
        return Path(name_or_path)
    known = ", ".join(e.name for e in list_entries(base)) or "none"
    raise ZooError(f"{path}: no zoo entry {str(name_or_path)!r} (available in {base}: {known})")


# -- reading ----------------------------------------------------------------------------------
def read_card(entry_dir: Path) -> dict[str, Any]:
    """Parse and check ``card.json`` (format version, required keys); does not read weights."""
    path = Path(entry_dir) / CARD_FILE
    if not path.is_file():
        raise ZooError(f"{path}: card missing")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ZooError(f"{path}: card is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ZooError(f"{path}: card is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(card, dict):
        raise ZooError(f"{path}: card must be a JSON object, got {type(card).__name__}")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise ZooError(f"{path}: unknown format_version {version!r} "
                       f"(this autol2o reads {FORMAT_VERSION})")
    for key, kind in (("rule_config", dict), ("sha256", str)):
        if not isinstance(card.get(key), kind):
            raise ZooError(f"{path}: card field {key!r} missing or not a {kind.__name__}")
    if not isinstance(card.get("race", True), bool):
        raise ZooError(f"{path}: card field 'race' must be true or false, got {card['race']!r}")
    if card["rule_config"].get("rule") not in RULES:
        raise ZooError(f"{path}: unknown rule {card['rule_config'].get('rule')!r} "
                       f"(known: {', '.join(sorted(RULES))})")
    return card


def list_entries(root: Path | str | None = None) -> list[ZooEntry]:
    """All entries under the zoo root, sorted by name (cards parsed, weights not verified).

    A directory whose card cannot be read (e.g. a save interrupted after the weights) is listed
    with its ``error`` and an empty card: never silently invisible, and never in the way of the
    other entries (``zoo list`` marks it unusable; the race and ``fit`` skip it).
    """
    base = zoo_root(root)
    if not base.is_dir():
        return []
    out = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not (d / CARD_FILE).exists() and not (d / WEIGHTS_FILE).exists():
            continue  # not a zoo entry (e.g. __pycache__ or a scratch folder)
        # the directory name, not the card's "name": it is what --optimizer/`zoo show` look up
        try:
            out.append(ZooEntry(name=d.name, path=d, card=read_card(d)))
        except ZooError as exc:
            out.append(ZooEntry(name=d.name, path=d, card={}, error=str(exc)))
    return out


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verified_weights(entry_dir: Path, card: dict[str, Any]) -> bytes:
    """The bytes of the entry's weights file, after checking them against the card's sha256
    (nothing is parsed: a tampered file is refused before any reader sees it)."""
    wpath = Path(entry_dir) / WEIGHTS_FILE
    if not wpath.is_file():
        raise ZooError(f"{wpath}: weights file missing")
    try:
        data = wpath.read_bytes()
    except OSError as exc:
        raise ZooError(f"{wpath}: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["sha256"].lower():
        raise ZooError(f"{wpath}: sha256 mismatch, file is corrupt or tampered "
                       f"(card {card['sha256'][:12]}..., file {digest[:12]}...)")
    return data


def load_entry(name_or_path: str | Path,
               root: Path | str | None = None) -> tuple[LearnedRule, dict[str, Any]]:
    """Load a zoo entry: ``(rule with its meta-weights, card)``.

    The weights file is read once, hashed and compared with the card *before* it is parsed;
    parsing is safetensors (a flat header plus raw tensor bytes), so no code can run.
    """
    entry = resolve(name_or_path, root)
    card = read_card(entry)
    wpath = entry / WEIGHTS_FILE
    data = verified_weights(entry, card)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ZooError(f"{wpath}: not a valid safetensors file ({_one_line(exc)})") from None
    try:
        rule = build_rule(card["rule_config"])
    except (TypeError, ValueError) as exc:
        raise ZooError(f"{entry / CARD_FILE}: bad rule_config ({_one_line(exc)})") from None
    try:
        rule.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ZooError(f"{wpath}: weights do not fit rule_config ({_one_line(exc)})") from None
    return rule.eval(), card


def load_rule(name_or_path: str | Path, root: Path | str | None = None) -> LearnedRule:
    """The learned rule of a zoo entry (checksum verified); see :func:`load_entry`."""
    return load_entry(name_or_path, root)[0]


# -- writing ----------------------------------------------------------------------------------
def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the metadata dict in hash order, which changes from one process to the
    next, so identical weights could get different bytes and a different sha256: a retrained
    entry would not match its card's checksum, nor reuse results cached under it.  Sorting keeps
    the header's length (same content), so the tensor offsets are untouched."""
    n = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for the same content; keep the original if it ever did
        return data
    return data[:8] + text.ljust(n, b" ") + data[8 + n:]


def save_entry(rule: LearnedRule, out_dir: Path | str, card: dict[str, Any], *,
               overwrite: bool = False) -> Path:
    """Write ``weights.safetensors`` and ``card.json`` into ``out_dir``; returns ``out_dir``.

    Fills the card's automatic fields (format version, rule and its config, meta-parameter
    count, sha256, timestamp).  Files are written to temporaries and renamed, weights first, so
    an interrupted save never leaves a card that vouches for the wrong weights.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and any((out / f).exists() for f in (CARD_FILE,
                                                                          WEIGHTS_FILE)):
        raise ZooError(f"{out}: zoo entry already exists (pass overwrite=True / --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in rule.state_dict().items()}
    data = _canonical_header(st_save(tensors, metadata={"format": "pt", "rule": rule.name}))
    from autol2o import __version__

    auto = {
        "format_version": FORMAT_VERSION,
        "name": card.get("name") or out.name,
        "rule": rule.name,
        "rule_config": rule.config(),
        "n_meta_params": sum(p.numel() for p in rule.parameters()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "autol2o_version": __version__,
    }
    full = {**card, **auto}
    ordered = {k: full[k] for k in CARD_FIELDS if k in full}
    ordered.update({k: v for k, v in full.items() if k not in ordered})
    atomic_write_bytes(out / WEIGHTS_FILE, data)
    atomic_write_bytes(out / CARD_FILE, (json.dumps(ordered, indent=2) + "\n").encode())
    return out


def update_card(name_or_path: str | Path, updates: dict[str, Any],
                root: Path | str | None = None) -> dict[str, Any]:
    """Merge ``updates`` into an entry's card (e.g. an evaluation summary) and rewrite it.

    The automatic fields cannot be changed this way: the checksum covers the weights only, and
    it stays valid because the weights are untouched.
    """
    entry = resolve(name_or_path, root)
    card = read_card(entry)
    frozen = {"format_version", "rule", "rule_config", "n_meta_params", "sha256"}
    bad = frozen & set(updates)
    if bad:
        raise ZooError(f"{entry / CARD_FILE}: fields {sorted(bad)} are set by save_entry only")
    card.update(updates)
    atomic_write_bytes(entry / CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
    return card


def hardware_summary() -> str:
    """One line describing where this process runs (for the card's ``hardware`` field)."""
    cpu = platform.processor() or platform.machine()
    s = f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
