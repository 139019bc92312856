"""Data-parallel meta-training: 2 CPU processes under torchrun (gloo) end with identical weights."""

import os
import subprocess
import sys

import torch


def test_two_process_gloo_meta_training_keeps_ranks_in_sync(tmp_path):
    out = tmp_path / "weights"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "-m", "autol2o.meta.launch", "--task", "quadratic",
           "--iterations", "4", "--horizon", "10", "--unroll", "5", "--batch", "2",
           "--meta-lr", "0.01", "--ema", "0.5", "--threads", "1", "--dump-weights", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in ("final", "result"):  # the last iterate and the Polyak average alike
        for k, v in r0[key].items():
            assert torch.equal(v, r1[key][k]), (key, k)
    # --ema 0.5: the returned weights are the average, not the last iterate
    assert any(not torch.equal(v, r0["final"][k]) for k, v in r0["result"].items())
    # each rank optimized its own instances (different meta-losses), yet the weights agree
    losses0 = [h["meta_loss"] for h in r0["history"]]
    losses1 = [h["meta_loss"] for h in r1["history"]]
    assert losses0 != losses1
    # and the shared weights did move away from the common initialization
    torch.manual_seed(0)
    from autol2o.optimizers import RNNprop

    init = RNNprop().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in r0["final"].items())
