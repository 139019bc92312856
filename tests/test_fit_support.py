"""Shared helpers for the fit tests (tiny data in every format, a tiny zoo, running the CLI).

Kept in a ``test_*`` module so it lives with the tests it serves; it defines no tests itself.
"""

from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

MLP = """
from torch import nn

def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear({d}, 16), nn.Tanh(), nn.Linear(16, {k}))
"""

# flags that keep every end-to-end run to a second or two
FAST = ["--steps", "20", "--trials", "2", "--seeds", "1", "--probe", "0.25", "--quiet"]


def blobs(n: int = 90, d: int = 6, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian class clusters."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(0, 3, (k, d))
    return centers[y] + rng.normal(0, 1, (n, d)), y


def write_model(dir_: Path, d: int = 6, k: int = 3, name: str = "model.py") -> Path:
    p = dir_ / name
    p.write_text(MLP.format(d=d, k=k))
    return p


def write_csv(path: Path, x: np.ndarray, y, target: str = "label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(x.shape[1])] + [target])
        for row, t in zip(x, y):
            w.writerow([f"{v:.6f}" for v in row] + [t])
    return path


def write_idx(path: Path, arr: np.ndarray) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(head + arr.tobytes())
    return path


def write_images(root: Path, n_per_class: int = 8, classes=("a", "b", "c"), size: int = 6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 60, (size, size)) + 60 * ci
            Image.fromarray(a.astype(np.uint8), mode="L").save(root / c / f"{i}.png")
    return root


def make_zoo(root: Path, diverging: bool = False) -> Path:
    """A temporary zoo with randomly initialised rules (never the shipped weights)."""
    from autol2o.optimizers import DMOptimizer, RNNprop
    from autol2o.zoo import save_entry

    torch.manual_seed(0)
    if diverging:
        save_entry(RNNprop(out_scale=1e8), root / "wild", {"name": "wild"})
    else:
        save_entry(RNNprop(), root / "rnnprop-rand", {"name": "rnnprop-rand"})
        save_entry(DMOptimizer(), root / "dm-rand", {"name": "dm-rand"})
    return root


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    root = make_zoo(tmp_path / "zoo")
    monkeypatch.setenv("AUTOL2O_ZOO", str(root))
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``autol2o ARGS`` in-process through the real entry point (error formatting included)."""
    from autol2o.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
