"""What fit's divergence checks cost: a step of fit against a bare SVI.step, in one run.

fit checks the loss before each update and the gradients and parameters after
it (a fused infinity-norm reduction, one host-device sync), and keeps two
snapshots of the parameters. This times N steps of ``fit`` and N steps of
``pyro.infer.SVI.step`` on the same model, minibatches and ELBO, interleaved,
and prints the median milliseconds per step and their ratio. On a GPU it
also counts the synchronising CUDA calls of one fit step beyond SVI's.

    python benchmarks/fit_checks.py                  # CPU, B = 32, T = 50
    python benchmarks/fit_checks.py --device cuda
    python benchmarks/fit_checks.py --tiny           # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pyro
import torch

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel, default_elbo, fit
from pyro_worldmodel.infer import default_optim


def build(device, latent, hidden, obs_dim=8, action_dim=2):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = WorldModel.default(
        obs_dim, ActionSpace.box(action_dim), latent_dim=latent, hidden=(hidden, hidden)
    )
    guide = FilterGuide.for_model(model, rnn_dim=hidden, hidden=(hidden,))
    return model.to(device), guide.to(device)


def time_fit(data, steps, device, latent, hidden, batch) -> float:
    model, guide = build(device, latent, hidden)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit(model, guide, *data, num_steps=steps, batch_size=batch, seed=0, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def time_svi(data, steps, device, latent, hidden, batch) -> float:
    model, guide = build(device, latent, hidden)
    svi = pyro.infer.SVI(model.model, guide, default_optim(), loss=default_elbo())
    obs, actions = data
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randperm(obs.shape[0], generator=generator)[:batch].to(device) for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for idx in batches:
        svi.step(obs[idx], actions[idx], None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def count_fit_syncs(data, device, latent, hidden, batch) -> int:
    """Synchronising CUDA calls in one step of fit (by torch's sync debug mode)."""
    model, guide = build(device, latent, hidden)
    fit(model, guide, *data, num_steps=2, batch_size=batch, seed=0, progress=False)  # warm up
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, guide, *data, num_steps=1, batch_size=batch, seed=0, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--T", type=int, default=50)
    p.add_argument("--steps", type=int, default=100, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings of each")
    p.add_argument("--tiny", action="store_true", help="a few steps at small sizes")
    args = p.parse_args(argv)
    latent, hidden = (16, 64) if not args.tiny else (2, 8)
    if args.tiny:
        args.batch, args.T, args.steps, args.repeats = 4, 5, 5, 2
    torch.set_num_threads(1)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    data = (
        torch.randn(4 * args.batch, args.T, 8, generator=generator).to(device),
        torch.randn(4 * args.batch, args.T, 2, generator=generator).to(device),
    )
    times = {"fit": [], "SVI.step": []}
    with pyro.validation_enabled(False):
        time_fit(data, 3, device, latent, hidden, args.batch)  # warm-up
        for _ in range(args.repeats):
            times["fit"].append(time_fit(data, args.steps, device, latent, hidden, args.batch))
            times["SVI.step"].append(time_svi(data, args.steps, device, latent, hidden, args.batch))
    fit_ms, svi_ms = (1e3 * statistics.median(times[k]) for k in ("fit", "SVI.step"))
    print(f"device {device}, 1 thread; B={args.batch}, T={args.T}, latent {latent}, hidden {hidden}")
    print("| path | ms per step (median) |\n|---|---:|")
    print(f"| fit (checks, snapshots, minibatches) | {fit_ms:.2f} |\n| SVI.step | {svi_ms:.2f} |")
    print(f"fit / SVI.step: {fit_ms / svi_ms:.3f}")
    if device.type == "cuda":
        with pyro.validation_enabled(False):
            print(
                f"synchronising CUDA calls in one fit step: {count_fit_syncs(data, device, latent, hidden, args.batch)}"
            )


if __name__ == "__main__":
    main()
