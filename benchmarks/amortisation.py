"""The amortisation gap: what narrows the gap between a guide's bound on its training
sequences and on held-out ones, on a linear-Gaussian anchor with the model at the truth.

    python benchmarks/amortisation.py                    # the filter, every setting, seeds 0-2
    python benchmarks/amortisation.py --guides filter iaf_filter --seeds 0
    python benchmarks/amortisation.py --guides smoothing --steps 5000 --iwae 1000

Each run trains only the guide (`train="guide"`, lr 3e-3, batch 32) for up to
`--steps` steps, monitoring the held-out sequences every 100 steps. It prints, per
setting, the gap to the exact log-likelihood in nats per sequence on the training and
on the held-out sequences (the ELBO from 16 draws), at the end of the run and at the
best held-out check (what early stopping keeps), as the mean over seeds with the
spread (max - min), and the ratio held-out / training.

Settings: the default; 4 times the training sequences; Adam's weight decay; Gaussian
noise on what the guide reads (`input_noise`); a smaller recurrent state (`rnn_dim`);
a full covariance for q(z_t | ·) (`covariance: full`, the smoothing guide's second row).
Guides: the filter, the IAF filter (trained by `Trace_ELBO`, on Pyro's traces), the
smoothing guide and the mean-field one. With `--iwae K` it also prints the gap of IWAE-K
at the best check; the least gap any diagonal guide can reach is printed with the anchor.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

ANCHOR = dict(latent_dim=3, obs_dim=5, action_dim=2, seed=21)
T, TRAIN, VAL = 40, 64, 64
SETTINGS = {
    "default": {},
    "4x sequences": {"episodes": 4 * TRAIN},
    "weight decay 1e-3": {"weight_decay": 1e-3},
    "input noise 0.3": {"guide": {"input_noise": 0.3}},
    "rnn_dim 16": {"guide": {"rnn_dim": 16}},
    "full covariance": {"guide": {"covariance": "full"}},
}
# The settings each guide runs by default (--settings overrides).
GUIDES = {
    "filter": [label for label in SETTINGS if label != "full covariance"],
    "iaf_filter": ["default"],
    "smoothing": ["default", "full covariance"],
    "mean_field": ["default"],
}


def measure(guide_name: str, setting: dict, seed: int, steps: int, iwae: int = 0) -> dict:
    """The gaps at the end of the run and at its best held-out check (early stopping's parameters)."""
    from pyro.infer import Trace_ELBO

    from pyro_worldmodel import LinearGaussianSSM, TraceMeanField_ELBO, fit
    from pyro_worldmodel.infer.validation import bound_per_step, iwae_per_step
    from pyro_worldmodel.model.guides import FilterGuide, IAFFilterGuide, MeanFieldGuide, SmoothingGuide

    ssm = LinearGaussianSSM.random(**ANCHOR)
    data = {
        "train": ssm.sample(setting.get("episodes", TRAIN), T, seed=100 + seed)[:2],
        "val": ssm.sample(VAL, T, seed=200 + seed)[:2],
    }
    exact = {name: ssm.log_prob(*d).mean().item() for name, d in data.items()}
    pyro.clear_param_store()
    model = ssm.world_model()
    pyro.set_rng_seed(seed)
    cls = {"filter": FilterGuide, "iaf_filter": IAFFilterGuide, "smoothing": SmoothingGuide,
           "mean_field": MeanFieldGuide}[guide_name]  # fmt: skip
    guide = cls.for_model(model, **setting.get("guide", {})).double()
    elbo = (
        Trace_ELBO(max_plate_nesting=2)
        if guide_name == "iaf_filter"
        else TraceMeanField_ELBO(max_plate_nesting=2)
    )
    optim = pyro.optim.ClippedAdam({"lr": 3e-3, "weight_decay": setting.get("weight_decay", 0.0)})

    def gaps(particles=0):
        guide.eval()  # as evaluated: without training-time noise
        out = {}
        for name, (o, a) in data.items():
            mask = torch.ones(o.shape[:2], dtype=torch.bool)
            out[name] = exact[name] - T * bound_per_step(model, guide, o, a, mask, num_particles=16)
            if particles:
                out[f"{name}_iwae"] = exact[name] - T * iwae_per_step(
                    model, guide, o, a, mask, num_particles=particles
                )
        guide.train()
        return out

    result = {}

    def at_the_end(step, history):
        if step == steps - 1:
            result["end"] = gaps()

    t0 = time.perf_counter()
    # patience longer than the run: nothing stops early, and fit loads the best check back at the end
    history = fit(model, guide, *data["train"], num_steps=steps, elbo=elbo, optim=optim, train="guide",
                  seed=seed, progress=False, val=data["val"], val_every=100, patience=steps,
                  callback=at_the_end)  # fmt: skip
    result["wall_s"] = time.perf_counter() - t0
    result["best"] = gaps(iwae)
    result["best_step"] = history.best_step
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guides", nargs="+", default=["filter"], choices=list(GUIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        choices=list(SETTINGS),
        help="default: every setting but 'full covariance' for the filter, the default for others",
    )
    parser.add_argument("--iwae", type=int, default=0, metavar="K",
                        help="also the gap of IWAE-K at the best check, e.g. 1000")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"anchor {ANCHOR}, T = {T}, {TRAIN} training and {VAL} held-out sequences, up to {args.steps} steps"
    )
    from pyro_worldmodel import LinearGaussianSSM

    floor = LinearGaussianSSM.random(**ANCHOR).diagonal_guide_gap(T)
    print(f"the least gap a guide with diagonal factors can reach: {floor:.2f} nats per sequence")
    print("gap to the exact log-likelihood, nats per sequence: mean over seeds (max - min)\n")
    print(
        "| guide | setting | training gap, end | held-out gap, end | ratio | training gap, best check"
        " | held-out gap, best check | ratio | best step |"
        + (
            f" training IWAE-{args.iwae} gap, best | held-out IWAE-{args.iwae} gap, best |"
            if args.iwae
            else ""
        )
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.iwae else ""))
    for guide_name in args.guides:
        for label in args.settings or GUIDES[guide_name]:
            rows = [measure(guide_name, SETTINGS[label], seed, args.steps, args.iwae) for seed in args.seeds]
            cells = []
            for when in ("end", "best"):
                tr = torch.tensor([r[when]["train"] for r in rows])
                va = torch.tensor([r[when]["val"] for r in rows])
                cells += [
                    f"{tr.mean():.1f} ({tr.max() - tr.min():.1f})",
                    f"{va.mean():.1f} ({va.max() - va.min():.1f})",
                    f"{(va / tr).mean():.2f}",
                ]
            cells.append("/".join(str(r["best_step"]) for r in rows))
            if args.iwae:
                for name in ("train_iwae", "val_iwae"):
                    g = torch.tensor([r["best"][name] for r in rows])
                    cells.append(f"{g.mean():.2f} ({g.max() - g.min():.2f})")
            print(f"| {guide_name} | {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
