"""Reading the user's DATA into memory: CSV, NPZ/NPY, image folders, MNIST IDX ``.gz``, digits.

Everything ends up as one :class:`FitData`: float32 inputs, targets (int64 class indices for
classification, float32 for regression), a train/validation split and a description of what was
found.  Rules:

* formats are tried from the most specific: ``train.csv``, ``.npz``, ``X.npy``/``y.npy``, MNIST
  IDX files, ``train/<class>/`` image folders (torchvision's layout, with an optional
  ``val/<class>/``, classes matched by name), class sub-folders of images, then a lone CSV of
  any name (other CSVs are noted as ignored).  CSVs need a header; ``,``, ``;`` or tab
  separated; a byte-order mark is dropped; ``val.csv`` columns are matched to ``train.csv``'s
  by name.  Arrays are ``X``/``y`` or Keras' ``x_train``/``y_train`` (either case), with
  ``X_val``/``y_val`` or ``X_valid``/``y_valid``; test data (``test.csv``, ``x_test``,
  ``test/``) is noted and never used;
* the task is ``"classification"`` when every target is an integer, else ``"regression"``
  (``MODEL.py`` may override it with ``task = ...``).  Class labels become indices ``0..K-1``:
  labels that already are ``0..K-1`` are kept, anything else (names, negative or gappy numbers
  such as years) is mapped in sorted order and the report's ``classes`` lists the originals;
  one class only is refused (nothing to learn), a class seen only in validation is noted;
* without a validation split the data are split deterministically, 80/20, by
  :func:`sklearn.model_selection.train_test_split` with ``random_state=seed`` (stratified for
  classification when every class has at least two examples);
* tabular inputs (2-D ``X``) are standardised, ``x' = (x - mu) / sigma``, with ``mu`` and
  ``sigma`` from the *training* split only (``sigma = 1`` for constant columns), so no validation
  statistic leaks into training.  Images (folders, IDX, and uint8 arrays of 3 or more
  dimensions in NPZ/NPY) are scaled to ``[0, 1]`` instead; other such arrays are used as given.

Every problem is a :class:`autol2o.errors.UserError` naming the file.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autol2o.errors import UserError
from autol2o.meta.data import read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BUILTIN = ("digits", "diabetes")


@dataclass
class FitData:
    """In-memory train/validation tensors plus what was detected (for stderr and the report)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    task: str                                   # "classification" | "regression"
    source: str                                 # path or built-in name
    format: str                                 # "csv" | "npz" | "npy" | "images" | "idx" | ...
    n_classes: int | None = None
    classes: list[Any] | None = None            # original label of each class index
    standardized: bool = False
    mean: np.ndarray | None = None              # training statistics when standardised
    std: np.ndarray | None = None
    split: str = "given"                        # "given" | "random 80/20, seed S"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One human line: what was found and how it will be used."""
        shape = "x".join(str(d) for d in self.x_train.shape[1:])
        parts = [f"{self.format} data from {self.source}",
                 f"{len(self.x_train)} train / {len(self.x_val)} val ({self.split})",
                 f"inputs {shape}", self.task]
        if self.n_classes is not None:
            parts.append(f"{self.n_classes} classes")
        if self.standardized:
            parts.append("standardised from training statistics")
        return ", ".join(parts)

    def summary(self) -> dict[str, Any]:
        """JSON-able description for ``report.json``."""
        return {
            "source": self.source, "format": self.format, "task": self.task,
            "n_train": len(self.x_train), "n_val": len(self.x_val),
            "input_shape": list(self.x_train.shape[1:]), "n_classes": self.n_classes,
            "classes": None if self.classes is None else [_jsonable(c) for c in self.classes],
            "standardized": self.standardized, "split": self.split, "notes": list(self.notes),
        }


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# -- entry point ------------------------------------------------------------------------------
def load_data(path: str | Path | None, *, target: str | None = None, seed: int = 0,
              task: str | None = None, val_fraction: float = 0.2) -> FitData:
    """Load DATA (a directory, a single file, or a built-in name; ``None`` means digits)."""
    if path is None or (str(path) in BUILTIN and not Path(path).exists()):
        if target is not None:
            raise UserError(f"--target applies to CSV data only ({path or 'digits'} is built in)")
        return _builtin(str(path or "digits"), seed, task, val_fraction)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: data not found (no such file or directory)")
    if p.is_file():
        return _load_file(p, target, seed, task, val_fraction)
    files = sorted(f for f in p.iterdir() if not f.name.startswith("."))
    if not files:
        raise UserError(f"{p}: data directory is empty")
    names = {f.name for f in files}
    # Most specific format first, so a stray metadata CSV beside an NPZ or an image folder does
    # not hijack detection; a lone CSV of another name comes last.
    if "train.csv" in names:
        data = _load_csv_dir(p, files, target, seed, task, val_fraction)
    elif any(f.suffix == ".npz" for f in files):
        data = _load_npz_dir(p, files, seed, task, val_fraction)
    elif any(f.suffix == ".npy" for f in files):
        data = _load_npy_dir(p, names, seed, task, val_fraction)
    elif any("idx" in f.name and (f.name.endswith(".gz") or "ubyte" in f.name) for f in files):
        data = _load_idx_dir(p, files, seed, task, val_fraction)
    elif (train_root := _split_image_root(p)) is not None:
        data = _load_split_image_folders(p, train_root, seed, task, val_fraction)
    elif any(d.is_dir() and _images_in(d) for d in files):
        data = _load_image_folder(p, seed, task, val_fraction)
    elif any(f.suffix == ".csv" for f in files):
        data = _load_csv_dir(p, files, target, seed, task, val_fraction)
    else:
        raise UserError(f"{p}: unknown data format (expected train.csv, .npz, X.npy/y.npy, "
                        "MNIST idx .gz files, one image sub-folder per class, or train/ and val/ "
                        "folders of those)")
    if target is not None and data.format != "csv":
        raise UserError(f"{p}: --target applies to CSV data only ({data.format} data found)")
    if data.format != "csv":
        ignored = sorted(f.name for f in files if f.suffix == ".csv")
        if ignored:
            data.notes.append(f"ignored: {', '.join(ignored)}")
    return data


def _image_files(d: Path) -> list[Path]:
    """PNG/JPEG files of a class folder, sorted; hidden ones (macOS ``._x.png`` resource forks
    that archives and USB sticks carry along) are not images."""
    return sorted(f for f in d.iterdir()
                  if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))


def _images_in(d: Path) -> bool:
    return bool(_image_files(d))


def _load_file(p: Path, target, seed, task, val_fraction) -> FitData:
    if p.suffix == ".csv":
        x, y, _, _ = _read_csv(p, target)
        return _finish(x, y, None, None, p, "csv", seed, task, val_fraction, tabular=True)
    if p.suffix == ".npz":
        if target is not None:
            raise UserError(f"{p}: --target applies to CSV data only")
        arrays = _read_npz(p)
        x, y = _xy(arrays, p)
        xv, yv = _xy(arrays, p, VAL_SUFFIXES) if _has_val(arrays) else (None, None)
        data = _finish(x, y, xv, yv, p, "npz", seed, task, val_fraction, tabular=x.ndim == 2)
        data.notes += _test_note(arrays, p.name)
        return data
    if p.stat().st_size == 0:
        raise UserError(f"{p}: data file is empty")
    raise UserError(f"{p}: unknown data format {p.suffix or '(no suffix)'!r} "
                    "(expected .csv, .npz or a directory)")


# -- formats ----------------------------------------------------------------------------------
def _read_csv(p: Path, target: str | None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Parse a CSV with a header row. Returns features, raw target strings, feature names and
    the target column's name.

    ``utf-8-sig`` drops the byte-order mark spreadsheet programs write, which would otherwise
    hide the first column's name; ``;`` and tab separators are recognised from the header."""
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text CSV file") from None
    first = text[:text.find("\n")] if "\n" in text else text
    delim = next((d for d in (";", "\t") if "," not in first and d in first), ",")
    # a StringIO keeps quoted fields with line breaks intact (str.splitlines would cut them)
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delim)
            if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{p}: CSV file is empty")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise UserError(f"{p}: CSV file has a header but no rows")
    if len(header) < 2:
        raise UserError(f"{p}: CSV needs at least one feature column and a target column "
                        "(separated by ',', ';' or tabs)")
    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if dup is not None:
        raise UserError(f"{p}: duplicate column name {dup!r}")
    if target is not None:
        if target not in header:
            raise UserError(f"{p}: target column {target!r} not found (columns: "
                            f"{', '.join(header[:10])}{', ...' if len(header) > 10 else ''})")
        t = header.index(target)
    else:
        t = next((header.index(c) for c in ("target", "label") if c in header), len(header) - 1)
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise UserError(f"{p}: line {i} has {len(r)} fields, the header has {len(header)}")
        if not r[t].strip():
            raise UserError(f"{p}: line {i}: missing target value (column {header[t]!r})")
    feats = [j for j in range(len(header)) if j != t]
    x = np.empty((len(body), len(feats)), dtype=np.float64)
    for i, r in enumerate(body):
        for k, j in enumerate(feats):
            if not r[j].strip():
                raise UserError(f"{p}: missing value (empty cell) in column {header[j]!r} "
                                f"(line {i + 2}); fill or drop it")
            try:
                x[i, k] = float(r[j])
            except ValueError:
                raise UserError(f"{p}: non-numeric value {r[j]!r} in column {header[j]!r} "
                                f"(line {i + 2})") from None
    y = np.array([r[t].strip() for r in body], dtype=object)
    return x, y, [header[j] for j in feats], header[t]


def _magic(p: Path, magic: bytes, what: str) -> None:
    # np.load treats a file without its magic as a pickle, and then blames pickling
    try:
        with open(p, "rb") as f:
            head = f.read(len(magic))
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from None
    if head != magic:
        raise UserError(f"{p}: not a valid {what} file (no {what} header)")


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    _magic(p, b"PK", "NPZ")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise UserError(f"{p}: cannot read NPZ without pickle ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError
        raise UserError(f"{p}: not a valid NPZ file ({type(e).__name__})") from None


def _read_npy(p: Path) -> np.ndarray:
    _magic(p, b"\x93NUMPY", "NPY")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{p}: cannot read NPY without pickle ({e})") from None
    except Exception as e:
        raise UserError(f"{p}: not a valid NPY file ({type(e).__name__})") from None


#: names of the training arrays, in order of preference: ``X``/``y``, or Keras' and many
#: tutorials' ``x_train``/``y_train`` (either case)
TRAIN_SUFFIXES = ("", "_train")
#: names of validation arrays in the same file: ``X_val``/``y_val`` or ``X_valid``/``y_valid``
VAL_SUFFIXES = ("_val", "_valid")


def _xy(arrays: dict[str, np.ndarray], p: Path,
        suffixes: tuple[str, ...] = TRAIN_SUFFIXES) -> tuple[np.ndarray, np.ndarray]:
    """The first (X, y) pair named with one of ``suffixes`` (X or x, y or Y)."""
    for suf in suffixes:
        xs = [k for k in (f"X{suf}", f"x{suf}") if k in arrays]
        ys = [k for k in (f"y{suf}", f"Y{suf}") if k in arrays]
        if xs and ys:
            return arrays[xs[0]], arrays[ys[0]]
        if xs or ys:  # half a pair: not silently replaced by another pair or a split
            break
    pairs = [f"'X{s}' and 'y{s}'" for s in suffixes]
    want = pairs[0] + (f" (or {', or '.join(pairs[1:])})" if len(pairs) > 1 else "")
    raise UserError(f"{p}: expected arrays {want}, found {', '.join(sorted(arrays)) or 'none'}")


def _has_val(arrays) -> bool:
    """Does an NPZ hold a validation split?  Any of its arrays (either case) counts, so a lone
    ``X_val`` is an error from :func:`_xy` rather than silently replaced by a random split."""
    return any(f"{a}{s}" in arrays for s in VAL_SUFFIXES for a in ("X", "x", "y", "Y"))


def _test_note(names, where: str) -> list[str]:
    """A test split is never used: model selection sees the validation split only, and using the
    test data for it would leave nothing unbiased to report on."""
    found = sorted(n for n in names if n.split(".")[0].lower() in ("x_test", "y_test"))
    return [f"{', '.join(found)} in {where} found: not used (selection uses the validation split "
            "only)"] if found else []


def _load_csv_dir(p, files, target, seed, task, val_fraction) -> FitData:
    names = {f.name: f for f in files}
    train = names.get("train.csv")
    if train is None:
        # val.csv and test.csv are never training data: training on them would validate on
        # the very rows the model was fitted to
        csvs = [f for f in files if f.suffix == ".csv" and f.name not in ("val.csv", "test.csv")]
        if not csvs:
            raise UserError(f"{p}: no training CSV (train.csv) beside "
                            f"{', '.join(f.name for f in files if f.suffix == '.csv')}")
        if len(csvs) != 1:
            raise UserError(f"{p}: several CSV files but no train.csv "
                            f"({', '.join(f.name for f in csvs)})")
        train = csvs[0]
    x, y, cols, tname = _read_csv(train, target)
    xv = yv = None
    if "val.csv" in names:
        # train.csv's target column by name: "the last column" may be another one in val.csv
        xv, yv, vcols, _ = _read_csv(names["val.csv"], tname)
        if sorted(vcols) != sorted(cols):
            raise UserError(f"{names['val.csv']}: feature columns differ from {train.name}'s "
                            f"({', '.join(sorted(set(vcols) ^ set(cols))) or 'count'})")
        xv = xv[:, [vcols.index(c) for c in cols]]  # match by name, not position
    data = _finish(x, y, xv, yv, train, "csv", seed, task, val_fraction, tabular=True)
    if "test.csv" in names:
        data.notes.append("test.csv found: not used (selection uses the validation split only)")
    return data


def _load_npz_dir(p, files, seed, task, val_fraction) -> FitData:
    npz = {f.name: f for f in files if f.suffix == ".npz"}
    train = npz.get("train.npz") or npz.get("data.npz")
    if train is None:
        if len(npz) != 1:
            raise UserError(f"{p}: several .npz files but no train.npz ({', '.join(npz)})")
        train = next(iter(npz.values()))
    arrays = _read_npz(train)
    x, y = _xy(arrays, train)
    xv = yv = None
    if "val.npz" in npz:
        xv, yv = _xy(_read_npz(npz["val.npz"]), npz["val.npz"], ("", *VAL_SUFFIXES))
    elif _has_val(arrays):
        xv, yv = _xy(arrays, train, VAL_SUFFIXES)
    data = _finish(x, y, xv, yv, train, "npz", seed, task, val_fraction, tabular=x.ndim == 2)
    data.notes += _test_note(arrays, train.name)
    if "test.npz" in npz and train.name != "test.npz":
        data.notes.append("test.npz found: not used (selection uses the validation split only)")
    return data


def _load_npy_dir(p, names, seed, task, val_fraction) -> FitData:
    def pick(*options: str) -> str | None:
        return next((n for n in options if n in names), None)

    xn, yn = pick("X.npy", "x.npy"), pick("y.npy", "Y.npy")
    if xn is None and yn is None:  # x_train.npy / y_train.npy, as Keras-style dumps name them
        xn, yn = pick("X_train.npy", "x_train.npy"), pick("y_train.npy", "Y_train.npy")
    if xn is None or yn is None:
        raise UserError(f"{p}: .npy data needs X.npy and y.npy (or X_train.npy and y_train.npy; "
                        f"found {', '.join(sorted(names))})")
    x, y = _read_npy(p / xn), _read_npy(p / yn)
    xv = yv = None
    xvn, yvn = pick("X_val.npy", "x_val.npy"), pick("y_val.npy", "Y_val.npy")
    if (xvn is None) != (yvn is None):  # half a validation split: not silently re-split
        raise UserError(f"{p}: found {xvn or yvn} but not {'y_val.npy' if yvn is None else 'X_val.npy'}")
    if xvn is not None:
        xv, yv = _read_npy(p / xvn), _read_npy(p / yvn)
    data = _finish(x, y, xv, yv, p / xn, "npy", seed, task, val_fraction, tabular=x.ndim == 2)
    data.notes += _test_note(names, p.name)
    return data


def _load_idx_dir(p, files, seed, task, val_fraction) -> FitData:
    def find(kind: str, split: str) -> Path | None:
        # "train-images-idx3-ubyte.gz" (LeCun's names) or "train-images.idx3-ubyte" (Kaggle's)
        for f in files:
            if f.name.startswith(split) and kind.replace("-", ".") in f.name.replace("-", "."):
                return f
        return None

    def pair(fi: Path, fl: Path) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read_idx(fi), read_idx(fl)
        if len(images) != len(labels):  # name both files: either may be the wrong one
            raise UserError(f"{fi}: {len(images)} images but {fl.name} has {len(labels)} labels")
        return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)

    ti, tl = find("images-idx3", "train"), find("labels-idx1", "train")
    if ti is None or tl is None:
        raise UserError(f"{p}: MNIST-style data needs train-images-idx3-ubyte.gz and "
                        "train-labels-idx1-ubyte.gz")
    x, y = pair(ti, tl)
    xv = yv = None
    vi, vl = find("images-idx3", "t10k"), find("labels-idx1", "t10k")
    if vi is not None and vl is not None:
        xv, yv = pair(vi, vl)
    data = _finish(x, y, xv, yv, ti, "idx", seed, task, val_fraction, tabular=False)
    if (vi is None) != (vl is None):  # half a test split cannot validate: say it was not used
        data.notes.append(f"ignored {(vi or vl).name}: no t10k "
                          f"{'labels' if vl is None else 'images'} file beside it")
    if xv is not None:
        data.split = "given (t10k files as validation)"
    return data


def _image_array(im) -> np.ndarray:
    """One image as float32 (channels, height, width) in [0, 1]: grey images (8- or 16-bit) as
    one channel, anything else as RGB.  16-bit images are scaled by 65535; ``convert("L")``
    would clip them at 255 and leave a nearly binary picture."""
    if im.mode.startswith("I;16") or im.mode == "I":  # "I": how Pillow opens many 16-bit PNGs
        a = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    elif im.mode in ("L", "1"):
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    else:
        return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return a[None]


def _class_folders(root: Path) -> tuple[list[str], list[str]]:
    """(classes, empty): the sub-folders of ``root`` with and without images, sorted."""
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    empty = sorted(d.name for d in subdirs if not _images_in(d))
    return sorted(d.name for d in subdirs if d.name not in empty), empty


def _read_images(root: Path, classes: list[str], index: dict[str, int],
                 size: tuple[int, int] | None) -> tuple[list[np.ndarray], list[int], tuple]:
    """Every image of ``root/<class>/`` as an array, its class index, and the common size (the
    first image's, or ``size`` when given: validation images must match the training ones)."""
    from PIL import Image, UnidentifiedImageError

    first = "" if size is None else "training "

    arrs, labels = [], []
    for c in classes:
        for f in _image_files(root / c):
            try:
                with Image.open(f) as im:
                    if size is None:
                        size = im.size
                    if im.size != size:
                        raise UserError(f"{f}: image size {im.size[0]}x{im.size[1]} differs from "
                                        f"{size[0]}x{size[1]} of the first {first}image")
                    arrs.append(_image_array(im))
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"{f}: cannot read image ({type(e).__name__})") from None
            labels.append(index[c])
    return arrs, labels, size


def _stack_images(arrs: list[np.ndarray], rgb: bool) -> np.ndarray:
    # a mixed folder: grey images as RGB, like PIL does
    return np.stack([np.repeat(a, 3, axis=0) if rgb and a.shape[0] == 1 else a for a in arrs])


def _load_image_folder(p, seed, task, val_fraction) -> FitData:
    classes, empty = _class_folders(p)
    if not classes:
        raise UserError(f"{p}: image folder has class sub-folders but no PNG/JPEG files")
    if len(classes) < 2:
        raise UserError(f"{p}: only one class sub-folder with images ({classes[0]}); "
                        "classification needs at least 2")
    arrs, y, _ = _read_images(p, classes, {c: i for i, c in enumerate(classes)}, None)
    x = _stack_images(arrs, any(a.shape[0] == 3 for a in arrs))
    data = _finish(x, np.array(y, dtype=np.int64), None, None, p, "images", seed,
                   task or "classification", val_fraction, tabular=False)
    data.classes, data.n_classes = classes, len(classes)
    if empty:
        data.notes.append(f"ignored sub-folders without images: {', '.join(empty)}")
    return data


#: validation folder names of the split layout (torchvision's ``ImageFolder`` per split)
VAL_DIRS = ("val", "valid", "validation")


def _subdirs(p: Path, names: tuple[str, ...]) -> list[Path]:
    """Sub-folders of ``p`` named one of ``names``, in any case (``Train/``, ``VAL/``)."""
    return sorted(d for d in p.iterdir() if d.is_dir() and d.name.lower() in names)


def _split_image_root(p: Path) -> Path | None:
    """``p/train`` when ``p`` holds ``train/<class>/*.png`` (a split layout), else None.  A
    ``train`` folder that holds images itself is a class named "train", not a split."""
    trains = _subdirs(p, ("train",))
    if len(trains) != 1 or _images_in(trains[0]):
        return None
    return trains[0] if _class_folders(trains[0])[0] else None


def _load_split_image_folders(p, train: Path, seed, task, val_fraction) -> FitData:
    """``train/<class>/`` (``train``, found by :func:`_split_image_root`) with optional
    ``val/<class>/`` (or valid/, validation/): class folders are matched by name, so a class
    missing from one split keeps its index."""
    vals = _subdirs(p, VAL_DIRS)
    if len(vals) > 1:
        raise UserError(f"{p}: several validation folders ({', '.join(v.name for v in vals)}); "
                        "keep one")
    classes, empty = _class_folders(train)
    if len(classes) < 2:  # what the model trains on; validation-only classes do not count
        raise UserError(f"{train}: only one class sub-folder with images ({classes[0]}); "
                        "classification needs at least 2")
    val_classes, val_empty = _class_folders(vals[0]) if vals else ([], [])
    every = sorted(set(classes) | set(val_classes))
    index = {c: i for i, c in enumerate(every)}
    arrs, y, size = _read_images(train, classes, index, None)
    xv = yv = None
    if vals:
        if not val_classes:
            raise UserError(f"{vals[0]}: validation folder has no class sub-folders with "
                            "PNG/JPEG files")
        varrs, yv, _ = _read_images(vals[0], val_classes, index, size)
        rgb = any(a.shape[0] == 3 for a in arrs + varrs)
        xv, yv = _stack_images(varrs, rgb), np.array(yv, dtype=np.int64)
    else:
        rgb = any(a.shape[0] == 3 for a in arrs)
    x = _stack_images(arrs, rgb)
    data = _finish(x, np.array(y, dtype=np.int64), xv, yv, train, "images", seed,
                   task or "classification", val_fraction, tabular=False, source=str(p))
    data.classes, data.n_classes = every, len(every)
    missing = sorted(set(val_classes) - set(classes))
    if missing:  # _finish notes classes only in validation by index; name them here
        data.notes = [n for n in data.notes if not n.startswith("classes only in the validation")]
        data.notes.append(f"classes only in {vals[0].name}/ (never trained on): "
                          f"{', '.join(missing)}")
    for folder, names in ((train, empty), (vals[0] if vals else None, val_empty)):
        if folder is not None and names:
            data.notes.append(f"ignored sub-folders of {folder.name}/ without images: "
                              f"{', '.join(names)}")
    for test in _subdirs(p, ("test",)):
        data.notes.append(f"{test.name}/ found: not used (selection uses the validation split "
                          "only)")
    return data


def _builtin(name: str, seed, task, val_fraction) -> FitData:
    from sklearn import datasets

    if name == "digits":
        d = datasets.load_digits()
        return _finish(d.data, d.target, None, None, "digits", "sklearn digits", seed, task,
                       val_fraction, tabular=True, source="digits (scikit-learn, bundled)")
    d = datasets.load_diabetes()
    # the raw target is in the hundreds; unit scale keeps the example's MSE readable
    target = (d.target - d.target.mean()) / d.target.std()
    return _finish(d.data, target, None, None, "diabetes", "sklearn diabetes",
                   seed, task or "regression", val_fraction, tabular=True,
                   source="diabetes (scikit-learn, bundled; target standardised)")


# -- common finishing: checks, labels, split, standardisation ---------------------------------
def _labels(y: np.ndarray, where, task: str | None) -> tuple[np.ndarray, str]:
    """Targets as numbers and the inferred task (integers -> classification)."""
    if y.dtype == object or y.dtype.kind in "US":
        strs = [str(v) for v in y]
        try:
            vals = np.array([float(s) for s in strs])
        except ValueError:
            bad = next(s for s in strs if not _is_float(s))
            if task == "regression":
                raise UserError(f"{where}: non-numeric target {bad!r} in a regression task") from None
            return np.array(strs, dtype=object), "classification"
        integral = all(_is_int(s) for s in strs)
        # integer labels as integers: through float64, IDs above 2**53 would merge into one class
        y = np.array([int(s) for s in strs]) if integral else vals
        inferred = "classification" if integral else "regression"
    elif y.dtype.kind in "iub":
        inferred = "classification"
    elif y.dtype.kind == "f":
        inferred = "regression"
    else:
        raise UserError(f"{where}: unsupported target dtype {y.dtype}")
    return y, task or inferred


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _check(x: np.ndarray, y: np.ndarray, where) -> None:
    if x.ndim == 0 or y.ndim == 0:
        raise UserError(f"{where}: {'X' if x.ndim == 0 else 'y'} is a scalar; expected one row "
                        "per example")
    if x.shape[0] == 0:
        raise UserError(f"{where}: no examples")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{where}: X has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.dtype.kind not in "fiub":
        raise UserError(f"{where}: non-numeric inputs (dtype {x.dtype})")
    if not np.isfinite(x).all():
        raise UserError(f"{where}: inputs contain NaN or inf ({_count(~np.isfinite(x))})")


def _check_targets(y: np.ndarray, where, which: str = "") -> None:
    # after _labels, so CSV strings such as "nan" or "inf" are caught too
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise UserError(f"{where}: {which}targets contain NaN or inf ({_count(~np.isfinite(y))})")


def _count(mask: np.ndarray) -> str:
    n = int(mask.sum())
    return f"{n} value{'s' if n != 1 else ''}"


def _finish(x, y, xv, yv, where, fmt, seed, task, val_fraction, *, tabular,
            source=None, val_where=None) -> FitData:
    from sklearn.model_selection import train_test_split

    x, y = np.asarray(x), np.asarray(y)
    reshape = x.ndim == 1 and fmt != "tensors"  # files: one feature per example (the API's
    if reshape:                                  # loaders feed the model as they are)
        x, tabular = x[:, None], True
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    _check(x, y, where)
    y, task = _labels(y, where, task)
    _check_targets(y, where)
    vw = val_where or where  # the API's validation data have their own name: blame it
    if xv is not None:
        xv, yv = np.asarray(xv), np.asarray(yv)
        if reshape and xv.ndim == 1:
            xv = xv[:, None]
        if yv.ndim == 2 and yv.shape[1] == 1:
            yv = yv[:, 0]
        _check(xv, yv, vw)
        if xv.shape[1:] != x.shape[1:]:
            raise UserError(f"{vw}: validation inputs have shape {xv.shape[1:]}, "
                            f"training inputs {x.shape[1:]}")
        yv, _ = _labels(yv, vw, task)
        _check_targets(yv, vw, "validation ")
    if task not in ("classification", "regression"):
        raise UserError(f"{where}: task must be 'classification' or 'regression', got {task!r}")

    classes = None
    n_classes = None
    notes: list[str] = []
    if task == "classification":
        if y.ndim != 1:
            raise UserError(f"{where}: classification targets must be 1-D labels, got shape "
                            f"{tuple(y.shape)}")
        both = y if yv is None else np.concatenate([y, yv])
        if both.dtype == object or both.dtype.kind == "f":
            if both.dtype.kind == "f" and not np.all(both == np.round(both)):
                bad = where if not np.all(y == np.round(y)) else vw
                raise UserError(f"{bad}: classification targets must be integers or names")
            if both.dtype.kind == "f":
                both = both.astype(np.int64)
                y = y.astype(np.int64)
                yv = None if yv is None else yv.astype(np.int64)
        values = set(both.tolist())
        # class indices must be 0..K-1: names, negative or gappy labels (e.g. years) are mapped
        # in sorted order, and `classes` records the original label of each index
        if both.dtype == object or values != set(range(len(values))):
            numeric = both.dtype != object
            classes = sorted(values, key=float if numeric else str)
            index = {c: i for i, c in enumerate(classes)}
            y = np.array([index[v] for v in y.tolist()], dtype=np.int64)
            yv = None if yv is None else np.array([index[v] for v in yv.tolist()], dtype=np.int64)
            n_classes = len(classes)
        else:
            n_classes = int(both.max()) + 1
        if n_classes < 2:  # nothing to learn: every loss would be 0 and every optimizer "win"
            raise UserError(f"{where}: all targets are one class "
                            f"({classes[0] if classes else 0!r}); classification needs at least 2")
        y = y.astype(np.int64)
        if yv is not None:  # a class the model never trains on caps the validation accuracy
            unseen = sorted(set(yv.tolist()) - set(y.tolist()))
            if unseen:
                names = [classes[i] if classes else i for i in unseen]
                notes.append(f"classes only in the validation data (never trained on): "
                             f"{', '.join(str(c) for c in names)}")
    else:
        y = y.astype(np.float64)

    split = "given"
    if xv is None:
        if len(x) < 2:
            raise UserError(f"{where}: need at least 2 examples to split off validation data")
        strat = None
        if task == "classification":
            _, counts = np.unique(y, return_counts=True)
            n_val = max(1, int(round(val_fraction * len(y))))
            if counts.min() >= 2 and n_val >= len(counts) and len(y) - n_val >= len(counts):
                strat = y
        x, xv, y, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed,
                                        stratify=strat)
        split = f"random {round(100 * (1 - val_fraction))}/{round(100 * val_fraction)}, seed {seed}"

    mean = std = None
    if fmt in ("npz", "npy") and not tabular:
        # arrays of images: 8-bit ones are scaled like image files; others are used as given
        if x.dtype == np.uint8 and xv.dtype == np.uint8:
            x, xv = x / 255.0, xv / 255.0
            notes.append(f"{x.ndim - 1}-D uint8 inputs scaled to [0, 1] (x / 255)")
        else:
            notes.append(f"{x.ndim - 1}-D inputs used as given (not standardised or rescaled)")
    x = x.astype(np.float64)
    xv = xv.astype(np.float64)
    if tabular:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std == 0] = 1.0
        x, xv = (x - mean) / std, (xv - mean) / std
    ydt = torch.int64 if task == "classification" else torch.float32
    return FitData(
        x_train=torch.as_tensor(x, dtype=torch.float32), y_train=torch.as_tensor(y, dtype=ydt),
        x_val=torch.as_tensor(xv, dtype=torch.float32),
        y_val=torch.as_tensor(np.asarray(yv, dtype=np.int64 if task == "classification"
                                         else np.float64), dtype=ydt),
        task=task, source=source or str(where), format=fmt, n_classes=n_classes, classes=classes,
        standardized=tabular, mean=mean, std=std, split=split, notes=notes,
    )


def from_tensors(x: Tensor, y: Tensor, x_val: Tensor | None = None, y_val: Tensor | None = None,
                 *, seed: int = 0, task: str | None = None,
                 val_fraction: float = 0.2) -> FitData:
    """In-memory tensors (the Python API) with the same checks and split; no standardisation
    (the caller's loaders already preprocess)."""
    def np_(t):
        return None if t is None else torch.as_tensor(t).detach().cpu().numpy()

    return _finish(np_(x), np_(y), np_(x_val), np_(y_val), "train_loader", "tensors", seed, task,
                   val_fraction, tabular=False, source="data loaders", val_where="val_loader")
