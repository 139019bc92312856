"""Datasets for optimizee tasks: scikit-learn digits (always there), MNIST from IDX files, synthetic.

Every loader returns ``(x, y)`` as float32 features ``(n, d)`` scaled to [0, 1] and int64 labels
``(n,)``, plus the image shape ``(channels, height, width)`` so convolutional tasks can reshape.
Loaded arrays are cached per process: tasks are rebuilt from their spec many times.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

#: IDX magic numbers: 0x0000 then the type code (0x08 = unsigned byte) and the number of dims.
IDX_UBYTE = 0x08
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into an ndarray.

    Layout: ``00 00 08 D`` (magic: zero, zero, type 0x08 = uint8, D dimensions), then D big-endian
    uint32 sizes, then the data.  Anything else raises :class:`UserError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: IDX file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    # a corrupt deflate stream raises zlib.error, which is not an OSError
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4:
        raise UserError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE or not 1 <= ndim <= 4:
        raise UserError(f"{path}: bad IDX magic number {raw[:4].hex()} "
                        f"(expected 000008 followed by 1-4 dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise UserError(f"{path}: IDX size mismatch: header says {dims} = {count} bytes, "
                        f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@lru_cache(maxsize=4)
def load_mnist(data_dir: str, split: str = "train") -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """MNIST from the four original IDX ``.gz`` files in ``data_dir``: x in [0, 1], shape (n, 784)."""
    if split not in MNIST_FILES:
        raise UserError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    img_name, lbl_name = MNIST_FILES[split]
    images = read_idx(Path(data_dir) / img_name)
    labels = read_idx(Path(data_dir) / lbl_name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(f"{Path(data_dir) / img_name}: expected (n, 28, 28) images matching "
                        f"{labels.shape[0]} labels, got {images.shape}")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, (1, images.shape[1], images.shape[2])


@lru_cache(maxsize=2)
def load_digits(split: str = "train") -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """scikit-learn's bundled 8x8 digits, flattened to 64 features in [0, 1].

    A fixed 80/20 split (first 1437 / last 360 images) gives a held-out ``test`` set.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    cut = int(0.8 * len(y))
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return x[sl].contiguous(), y[sl].contiguous(), (1, 8, 8)


@lru_cache(maxsize=4)
def synthetic_classification(n: int = 2048, d: int = 32, classes: int = 10, seed: int = 0,
                             split: str = "train") -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """Gaussian class clusters (a fixed random teacher): x in [0, 1] after a sigmoid squash.

    The clusters depend on ``seed`` only; ``split="test"`` draws other examples of the same
    clusters (a held-out sample of the same problem, not a different problem)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    if split != "train":
        g = torch.Generator().manual_seed(seed + 0x7E570000)  # another stream, same clusters
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.sigmoid(centers[y] + torch.randn(n, d, generator=g))
    return x, y, (1, 1, d)


def load_dataset(name: str, data_dir: str | Path | None = None,
                 split: str = "train") -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """Dispatch by dataset name: ``digits``, ``mnist`` (needs ``data_dir``) or ``synthetic``."""
    if split not in MNIST_FILES:  # digits and synthetic would read any other word as "test"
        raise UserError(f"unknown data split {split!r}; use 'train' or 'test'")
    if name == "digits":
        return load_digits(split)
    if name == "mnist":
        if data_dir is None:
            raise UserError("the MNIST tasks need a data directory with the IDX .gz files "
                            "(--data-dir DIR)")
        return load_mnist(str(Path(data_dir).resolve()), split)
    if name == "synthetic":
        return synthetic_classification(split=split)
    raise UserError(f"unknown dataset {name!r}; known: digits, mnist, synthetic")
