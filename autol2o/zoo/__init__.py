"""Pretrained learned optimizers: save, list, load (checksum-verified, safetensors only).

>>> from autol2o.zoo import load_rule
>>> rule = load_rule("rnnprop-mnist")          # doctest: +SKIP
"""

from .store import (
    CARD_FIELDS,
    CARD_FILE,
    ENV_VAR,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ZooEntry,
    ZooError,
    hardware_summary,
    list_entries,
    load_entry,
    load_rule,
    read_card,
    resolve,
    save_entry,
    sha256_file,
    shipped_root,
    update_card,
    verified_weights,
    zoo_root,
)

__all__ = [
    "CARD_FIELDS", "CARD_FILE", "ENV_VAR", "FORMAT_VERSION", "WEIGHTS_FILE", "ZooEntry",
    "ZooError", "hardware_summary", "list_entries", "load_entry", "load_rule", "read_card",
    "resolve", "save_entry", "sha256_file", "shipped_root", "update_card", "verified_weights",
    "zoo_root",
]
