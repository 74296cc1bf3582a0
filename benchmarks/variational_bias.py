"""Variational bias: how far a model learned through its bound falls from the true model,
against exact maximum likelihood on the same data, on a linear-Gaussian anchor.

    python benchmarks/variational_bias.py                 # every recipe, seed 0
    python benchmarks/variational_bias.py --seeds 0 1 2 --steps 6000

The model starts at a random linear-Gaussian system and is trained jointly with its guide
(lr 3e-3, batch 32) on 64 sequences, with held-out monitoring on 64 more and early
stopping (patience 10 checks of 200 steps); exact maximum likelihood starts at the same
system and optimises the exact log-likelihood by L-BFGS (`maximum_likelihood(method="lbfgs")`). Each learned model is read back
as its system (`LinearGaussianSSM.from_world_model`) and scored on 256 test sequences by
its exact log-likelihood, against the true system's, and by its dynamics' spectral radius.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

ANCHOR = dict(latent_dim=3, obs_dim=5, action_dim=2, seed=21)
T, TRAIN, VAL, TEST = 40, 64, 64, 256
RECIPES = (
    "ELBO, filter",
    "ELBO, smoothing",
    "ELBO, smoothing, full covariance",
    "IWAE-8, smoothing",
    "exact ML",
)


def run(recipe: str, seed: int, steps: int, tiny: bool = False) -> dict:
    from pyro.infer import RenyiELBO

    from pyro_worldmodel import LinearGaussianSSM, TraceMeanField_ELBO, fit
    from pyro_worldmodel.evaluate import maximum_likelihood
    from pyro_worldmodel.model.guides import FilterGuide, SmoothingGuide

    truth = LinearGaussianSSM.random(**ANCHOR)
    n, length = (8, 10) if tiny else (1, T)  # --tiny: 8 times fewer sequences, of 10 steps
    train = truth.sample(TRAIN // n, length, seed=100 + seed)[:2]
    val = truth.sample(VAL // n, length, seed=200 + seed)[:2]
    test = truth.sample(TEST // n, length, seed=300 + seed)[:2]
    pyro.clear_param_store()
    start = {**ANCHOR, "seed": 1000 + seed}
    model = LinearGaussianSSM.random(**start).world_model()
    t0 = time.perf_counter()
    info = {}
    if recipe == "exact ML":
        losses = maximum_likelihood(model, *train, num_steps=10 if tiny else 200, lr=1.0, method="lbfgs")
        info["steps"] = len(losses)  # evaluations of the exact log-likelihood
    else:
        pyro.set_rng_seed(seed)
        covariance = "full" if recipe.endswith("full covariance") else "diagonal"
        guide = (SmoothingGuide if "smoothing" in recipe else FilterGuide).for_model(
            model, covariance=covariance
        )
        guide = guide.double()
        if recipe.startswith("IWAE"):
            elbo = RenyiELBO(alpha=0.0, num_particles=8, vectorize_particles=True, max_plate_nesting=3)
        else:
            elbo = TraceMeanField_ELBO(max_plate_nesting=2)
        history = fit(model, guide, *train, num_steps=steps, lr=3e-3, elbo=elbo, seed=seed, progress=False,
                      val=val, val_every=5 if tiny else 200, patience=10)  # fmt: skip
        info["steps"] = history.stopped_at or steps
    learned = LinearGaussianSSM.from_world_model(model)
    with torch.no_grad():
        ll, true_ll = learned.log_prob(*test).mean().item(), truth.log_prob(*test).mean().item()
    return {
        "shortfall": 100 * (true_ll - ll) / abs(true_ll),
        "radius": learned.spectral_radius,
        "true_radius": truth.spectral_radius,
        "wall_s": time.perf_counter() - t0,
        **info,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument(
        "--tiny", action="store_true", help="seconds: small data, few steps, to check the script"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 20)
    torch.set_num_threads(1)
    print(
        f"anchor {ANCHOR}, T = {T}: {TRAIN} training, {VAL} held-out (early stopping), {TEST} test sequences"
    )
    print("test log-likelihood below the true system's, % (mean over seeds, max - min); spectral radius\n")
    print("| recipe | below the truth, % | spectral radius (truth 0.90) | steps | wall s |")
    print("|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        rows = [run(recipe, seed, args.steps, args.tiny) for seed in args.seeds]
        short = torch.tensor([r["shortfall"] for r in rows])
        radius = torch.tensor([r["radius"] for r in rows])
        steps = "/".join(str(int(r["steps"])) for r in rows)
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        print(
            f"| {recipe} | {short.mean():.2f} ({short.max() - short.min():.2f}) |"
            f" {radius.mean():.2f} ({radius.max() - radius.min():.2f}) | {steps} | {wall:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
