"""Atomic file writes, shared by the zoo and the fit reports: a reader (or a crash) never sees a
half-written card, report or state file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to a unique temporary beside ``path``, flush it to disk, rename it over
    ``path``.  The unique name lets parallel writers (workers sharing a run directory, two saves
    of one zoo entry) never write into each other's temporary; the file is created with mode
    0666 so the umask applies as to any other file (mkstemp would force 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())
