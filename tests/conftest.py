"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP thrashing on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_dir(tmp_path):
    """A small CSV classification dataset (``data/train.csv``) for ``autol2o fit``."""
    from test_fit_support import blobs, write_csv

    x, y = blobs()
    return write_csv(tmp_path / "data" / "train.csv", x, y).parent
