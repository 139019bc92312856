"""Cost of one optimizer step: RNNprop, DMoptimizer and torch.optim.Adam (foreach).

For 1e4, 1e5 and 1e6 parameters (``--sizes``) on the current device this prints ms/step, the
ratio to Adam, the RNNprop step's achieved GFLOP/s (matmul FLOPs of the network, ~13k per
coordinate) against the machine's measured float32 matmul GFLOP/s, and optimizer-state bytes
per parameter.  Results go to ``benchmarks/results/step_overhead.md``.

``--chunk`` sets the rows per network call (default: the rule's own for the device, 8192 on the
CPU for its caches, 2^20 on a GPU).  On a GPU 8192-row chunks make the step kernel-launch-bound
(an H200, by hand: RNNprop 59 ms at 1e6 parameters and 375 ms at 1e7, against 5.7 and 37 ms with
all rows in one call, ``--chunk 0``), which is why the GPU chunk is larger.

    python benchmarks/step_overhead.py [--device cpu|cuda] [--sizes 1e4 1e5 1e6] [--chunk 32768]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from autol2o.optimizers import DMOptimizer, LearnedOptimizer, RNNprop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, min_time: float = 1.0, warmup: int = 2) -> float:
    """Median seconds per call over repeats lasting at least ``min_time``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_gflops(device: torch.device, n: int = 2048) -> tuple[float, float]:
    """float32 GFLOP/s of (a) a square n x n matmul, (b) the LSTM's skinny shape (1e6x40 @ 40x80)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sq = 2 * n**3 / timeit(lambda: a @ b, device) / 1e9
    x = torch.randn(1_000_000, 40, device=device)
    w = torch.randn(40, 80, device=device)
    skinny = 2 * 1_000_000 * 40 * 80 / timeit(lambda: x @ w, device) / 1e9
    return sq, skinny


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.numel() > 1:
                key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
    return total


def bench(size: int, device: torch.device, chunk: int | None) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    makers = {
        "RNNprop": lambda ps: LearnedOptimizer(ps, RNNprop()),
        "DMoptimizer": lambda ps: LearnedOptimizer(ps, DMOptimizer()),
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    }
    for name, make in makers.items():
        # a few tensors of mixed shapes, like a real model, totalling `size`
        shapes = [(size // 2,), (size // 4,), (size - size // 2 - size // 4,)]
        params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt = make(params)
        if isinstance(opt, LearnedOptimizer):
            if chunk is not None:  # else the rule's own chunk for the device
                opt.rule.chunk_size = opt.rule.gpu_chunk_size = chunk
        opt.step()  # materialise state
        sec = timeit(opt.step, device)
        out[name] = {"ms": sec * 1e3, "bytes_per_param": state_bytes(opt) / size}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); use 1 on a machine shared with other jobs")
    ap.add_argument("--chunk", type=int, default=None,
                    help="rows per network call (0: all); default the rule's own for the device "
                         f"({RNNprop.chunk_size} on the CPU, {RNNprop.gpu_chunk_size} on a GPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_overhead.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    flops_per_coord = RNNprop().lstm.flops_per_row() + 2 * (2 * 20 + 20 * 1)
    sq, skinny = matmul_gflops(device)
    rows = []
    for s in args.sizes:
        n = int(s)
        r = bench(n, device, args.chunk)
        adam = r["Adam (foreach)"]["ms"]
        for name, v in r.items():
            gf = flops_per_coord * n / (v["ms"] / 1e3) / 1e9 if name == "RNNprop" else None
            rows.append((n, name, v["ms"], v["ms"] / adam, gf, v["bytes_per_param"]))
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or platform.machine()
    lines = [
        "# Optimizer step overhead",
        "",
        f"Device: {device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"CPUs {os.cpu_count()}, chunk "
        f"{RNNprop().chunk_rows(device) if args.chunk is None else args.chunk} rows (0: all), "
        "load average before the run "
        f"{os.getloadavg()[0]:.2f}.",
        f"Measured float32 matmul: {sq:.1f} GFLOP/s (2048^2 square), {skinny:.1f} GFLOP/s "
        "(the LSTM's shape, 1e6x40 @ 40x80).",
        f"RNNprop network FLOPs per coordinate (matmuls only): {flops_per_coord}.",
        "",
        "| params | optimizer | ms/step | x Adam | RNNprop GFLOP/s | % of square matmul | state B/param |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, name, ms, ratio, gf, bpp in rows:
        gfs = f"{gf:.1f}" if gf is not None else ""
        pct = f"{100 * gf / sq:.0f}%" if gf is not None else ""
        lines.append(f"| {n:.0e} | {name} | {ms:.2f} | {ratio:.1f} | {gfs} | {pct} | {bpp:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
