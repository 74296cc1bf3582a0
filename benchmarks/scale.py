"""Data-parallel training: throughput against the number of ranks (torch.distributed, gloo on CPU).

    python benchmarks/scale.py                      # 1 and 2 ranks, B = 32, T = 50, the default spec
    python benchmarks/scale.py --ranks 1 2 4 --batch 64
    python benchmarks/scale.py --tiny               # seconds: checks the script

Each configuration runs :func:`~pyro_worldmodel.fit` in N processes of one thread each, joined
in a gloo process group, as ``torchrun --nproc-per-node N -m pyro_worldmodel train`` runs them:
every rank computes its B / N episodes of each minibatch of B and the gradients are summed in
one all-reduce. The default spec (``Spec()``) on random sequences of X = 3, A = 1. It times
the steps after a warm-up, on rank 0, and prints sequences per second, the speed-up over one
rank and the parallel efficiency (speed-up / N). The ranks share this machine's cores: with
more ranks than free cores, they wait for each other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, out, batch, T, steps, warmup):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import pyro

        from pyro_worldmodel import ActionSpace, Spec, build, fit

        g = torch.Generator().manual_seed(0)
        N = 4 * batch
        obs, actions = torch.randn(N, T, 3, generator=g), torch.randn(N, T, 1, generator=g)
        pyro.set_rng_seed(0)
        b = build(Spec(), 3, ActionSpace.box(1))
        marks = {}

        def callback(step, history):
            if step == warmup - 1:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

        with pyro.validation_enabled(False):
            fit(b.model, b.guide, obs, actions, num_steps=steps, batch_size=batch, seed=0, progress=False,
                callback=callback)  # fmt: skip
        if rank == 0:
            seconds = marks["end"] - marks["start"]
            Path(out).write_text(f"{(steps - warmup) * batch / seconds}\n")
    finally:
        if world > 1:
            dist.destroy_process_group()


def throughput(world, batch, T, steps, warmup) -> float:
    """Sequences per second of ``world`` ranks at batch ``batch`` (the whole minibatch)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rate"
        args = (world, str(Path(tmp) / "init"), str(out), batch, T, steps, warmup)
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
        return float(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=32, help="sequences per minibatch, all ranks together")
    p.add_argument("--length", type=int, default=50, help="T, steps per sequence")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.length, args.steps, args.warmup = 4, 5, 6, 2
    rates = {n: throughput(n, args.batch, args.length, args.steps, args.warmup) for n in args.ranks}
    base = rates[min(rates)]
    print(f"data-parallel fit, gloo, one thread per rank; B = {args.batch}, T = {args.length}, Spec()")
    print()
    print("| ranks | sequences / s | speed-up | parallel efficiency |")
    print("|---:|---:|---:|---:|")
    for n, rate in rates.items():
        speedup = rate / base * min(rates)
        print(f"| {n} | {rate:.0f} | {speedup:.2f} | {speedup / n:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
