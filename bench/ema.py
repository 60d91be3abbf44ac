"""Benchmark of ShardedEMA: fp32 EMA memory per rank and update time per step, N = 1 and 2 gloo ranks (CPU).

    python bench/ema.py

Compared with an unsharded EMA: a plain fp32 copy of all parameters updated with torch._foreach_lerp_.
Each rank runs on one thread (one core), as each rank would own one GPU in training.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root: `import ema` must not find this file

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from ema import ShardedEMA  # noqa: E402

LAYERS, WIDTH = 16, 1536  # 16 x Linear(1536, 1536): 37.8M parameters, 151 MB in fp32
STEPS = 50  # timed updates (3 for the export) after 2 warm-up calls; the median is reported


def timed(fn, *args, repeats=STEPS):
    """Seconds per call of fn(*args): each rank's median over `repeats` calls that start together, max over ranks."""
    for _ in range(2):  # the first call also pays one-off costs (page faults of new buffers, DTensor set-up)
        fn(*args)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(statistics.median(times))
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def bench(rank, world, store_file, results):
    """One rank: time the EMA of a replicated and of an FSDP2-sharded model (and, alone, of an unsharded copy)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    rows = []
    for layout in ("replicated", "FSDP2"):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
        if layout == "FSDP2":
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
        ema = ShardedEMA(model)
        mib = sum(s.numel() * s.element_size() for s in ema.shards.values()) / 2**20
        update_ms = 1e3 * timed(ema.update, model)
        export_s = timed(ema.full_state_dict, repeats=3)
        rows.append(("ShardedEMA", layout, world, mib, update_ms, export_s))
        if world == 1 and layout == "replicated":
            params = list(model.parameters())
            copy = [p.detach().float().clone() for p in params]
            mib = sum(c.numel() * c.element_size() for c in copy) / 2**20
            update_ms = 1e3 * timed(torch._foreach_lerp_, copy, params, 0.001)
            rows.insert(0, ("unsharded", layout, 1, mib, update_ms, 0.0))
    if rank == 0:
        results.extend(rows)  # rank 0's memory; the times are already the slowest rank's
    dist.destroy_process_group()


def main():
    n_params = LAYERS * (WIDTH * WIDTH + WIDTH)
    print(f"model: {LAYERS} x Linear({WIDTH}, {WIDTH}) = {n_params / 1e6:.1f}M params, all trainable, fp32; "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.list()
        for world in (1, 2):
            mp.spawn(bench, args=(world, f"{tmp}/store{world}", results), nprocs=world)
        results = list(results)
    print("| EMA | model layout | ranks | EMA MiB per rank | update ms/step | full_state_dict s |")
    print("|---|---|---|---|---|---|")
    for name, layout, world, mib, update_ms, export_s in results:
        export = f"{export_s:.2f}" if name == "ShardedEMA" else "-"
        print(f"| {name} | {layout} | {world} | {mib:.1f} | {update_ms:.1f} | {export} |")


if __name__ == "__main__":
    main()
