"""Review fixes in autol2o.meta: corrupt gzip data, unknown splits, the convex term's size, the
curriculum horizon in the history, and divergences counted over all torchrun ranks."""

import gzip
import struct

import numpy as np
import pytest
import torch

import autol2o.meta.trainer as trainer_mod
from autol2o.errors import UserError
from autol2o.meta import MLPTask, TrainConfig, build_task, meta_train, read_idx
from autol2o.optimizers import RNNprop

pytestmark = pytest.mark.usefixtures("one_thread")


def _rule(seed=0):
    torch.manual_seed(seed)
    return RNNprop()


def test_corrupt_deflate_stream_is_a_one_line_user_error(tmp_path):
    """A damaged .gz whose deflate data is invalid raises zlib.error (not an OSError) inside
    gzip; it must still be a UserError naming the file, not a traceback."""
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", *arr.shape) + arr.tobytes()
    data = bytearray(gzip.compress(raw))
    data[10] = 0x07  # first deflate block header: final block, reserved block type 11
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read IDX file"):
        read_idx(path)


def test_an_unknown_data_split_is_refused_not_read_as_test():
    with pytest.raises(UserError, match="unknown data split 'tests'"):
        MLPTask("digits", split="tests")
    with pytest.raises(UserError, match="unknown data split"):
        build_task({**build_task("synthetic-nn-relu").spec, "split": "validation"})
    assert MLPTask("digits", split="test").x.shape[0] == 360


def test_convex_combination_needs_at_least_one_extra_parameter():
    with pytest.raises(UserError, match="convex_dim must be >= 1"):
        TrainConfig(convex_combination=True, convex_dim=0)
    TrainConfig(convex_combination=False, convex_dim=0)  # unused: fine


def test_history_records_the_horizon_each_iteration_actually_trained():
    """A run started before a curriculum boundary keeps its horizon (runs are not cut): the
    history must say so, not the stage the iteration number falls in."""
    res = meta_train(_rule(), build_task("quadratic"),
                     TrainConfig(horizon=4, unroll=2, iterations=5, batch=2,
                                 curriculum=((0, 4), (1, 6))), progress=False)
    # iteration 1 finishes the 4-step run begun at iteration 0; the 6-step runs start after it
    assert [h["horizon"] for h in res.history] == [4, 4, 6, 6, 6]


def test_diverged_runs_of_every_rank_are_counted(monkeypatch):
    """Under torchrun a rank whose run diverged contributes no meta-gradient; its dropped run
    must still be counted (the card reports rank 0's count).  Simulated: world 2 where the other
    rank diverges every iteration (all_reduce adds its zero gradient and zero 'ok' flag)."""
    task = build_task("quadratic")
    cfg = TrainConfig(horizon=6, unroll=3, iterations=3, batch=2, meta_lr=1e-2, seed=5)
    ref_rule = _rule()
    ref = meta_train(ref_rule, task, cfg, progress=False)
    assert ref.diverged == 0

    monkeypatch.setattr(trainer_mod, "_world", lambda: (0, 2))
    monkeypatch.setattr(trainer_mod.dist, "broadcast", lambda tensor, src: None)
    monkeypatch.setattr(trainer_mod.dist, "all_reduce", lambda tensor: None)
    rule = _rule()
    res = meta_train(rule, task, cfg, progress=False)
    assert res.diverged == 3 and res.card_fields["training"]["diverged"] == 3
    assert [h["diverged"] for h in res.history] == [1, 2, 3]
    # the surviving rank's gradient alone makes the step: same weights as one process
    for a, b in zip(ref_rule.parameters(), rule.parameters(), strict=True):
        assert torch.equal(a, b)
