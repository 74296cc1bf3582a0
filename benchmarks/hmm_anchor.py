"""The categorical state against an exact anchor: an HMM with actions (``CategoricalHMM``).

For each seed s, data from the 4-state anchor (``CategoricalHMM.random(4, 2, 1, seed=0,
spread=2.5)``, 2 observation and 1 action dimensions; episodes drawn with seed s):

1. exactness: the largest difference, over the episodes, between the enumerated loss
   (``TraceEnum_ELBO``) and ``DiscreteHMM``'s forward algorithm, float64;
2. at the true parameters, with an untrained categorical filter guide: the ELBO
   (straight-through, analytic KL) and IWAE-K for K = 1, 10, 100, 1000, against the exact value;
3. the same after training the guide alone (``train="guide"``): the share of the gap closed;
4. fitted from a start (``CategoricalHMM.initial_guess``: k-means centres, seed s) on 100
   episodes: by enumeration (``TraceEnum_ELBO``) and by the ELBO with the categorical
   filter guide; the held-out exact log-likelihood of each against the true model's, on
   50 other episodes, as a relative gap (true − fitted) / |true|.

Every figure is in nats per observed step. It prints each seed's row, then the mean and
the spread (max − min) over the seeds:

    python benchmarks/hmm_anchor.py                 # seeds 0-2, a few minutes
    python benchmarks/hmm_anchor.py --seeds 0 --quick
    python benchmarks/hmm_anchor.py --tiny          # seconds: checks the script
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from pyro_worldmodel.evaluate import CategoricalHMM, iwae_log_likelihood
from pyro_worldmodel.infer import TraceEnum_ELBO, TraceMeanField_ELBO, default_optim, fit
from pyro_worldmodel.model.guides import CategoricalFilterGuide

STATES, OBS, ACT, T = 4, 2, 1, 20
IWAE_K = (1, 10, 100, 1000)


def guide_for(model, seed):
    pyro.set_rng_seed(seed)
    return CategoricalFilterGuide.for_model(model, rnn_dim=16, hidden=(16,)).double()


def elbo_per_step(model, guide, obs, actions, draws=10):
    elbo = TraceMeanField_ELBO(monte_carlo_kl="error")
    with torch.no_grad():
        return (
            -sum(elbo.loss(model.model, guide, obs, actions) for _ in range(draws))
            / draws
            / obs.shape[:2].numel()
        )


def run(seed, quick, tiny=False):
    torch.set_default_dtype(torch.float64)
    hmm = CategoricalHMM.random(STATES, OBS, ACT, seed=0, spread=2.5)
    obs, actions, _ = hmm.sample(150, 5 if tiny else T, seed=100 + seed)
    train, test = (obs[:100], actions[:100]), (obs[100:], actions[100:])
    n_test = test[0].shape[:2].numel()
    row = {}
    truth = hmm.world_model()
    exact = hmm.log_prob(*train)
    enumerated = TraceEnum_ELBO().log_likelihood(truth, *train)
    row["max |enumerated − exact|"] = float((enumerated - exact).abs().max())
    exact_step = float(exact.sum()) / train[0].shape[:2].numel()
    row["exact"] = exact_step
    sub = (train[0][:40], train[1][:40])
    exact_sub = float(hmm.log_prob(*sub).sum()) / sub[0].shape[:2].numel()
    guide = guide_for(truth, seed)
    pyro.set_rng_seed(seed)
    row["ELBO, untrained guide"] = elbo_per_step(truth, guide, *sub) - exact_sub
    for k in IWAE_K[:3] if quick or tiny else IWAE_K:
        iwae = iwae_log_likelihood(truth, guide, *sub, num_particles=k)
        row[f"IWAE-{k}, untrained guide"] = float(iwae.sum()) / sub[0].shape[:2].numel() - exact_sub
    fit(truth, guide, *sub, num_steps=5 if tiny else 100 if quick else 300, batch_size=40, lr=3e-3, train="guide",
        progress=False, seed=seed)  # fmt: skip
    pyro.set_rng_seed(seed)
    row["ELBO, guide trained"] = elbo_per_step(truth, guide, *sub) - exact_sub
    row["share of the gap closed"] = 1 - row["ELBO, guide trained"] / row["ELBO, untrained guide"]
    true_test = float(hmm.log_prob(*test).sum()) / n_test
    for name, elbo, steps, batch, lr in (
        ("enumeration", TraceEnum_ELBO(), 5 if tiny else 200, 100, 0.1),
        (
            "ELBO",
            TraceMeanField_ELBO(monte_carlo_kl="error"),
            5 if tiny else 300 if quick else 1000,
            50,
            0.02,
        ),
    ):
        model = CategoricalHMM.initial_guess(*train, STATES, seed=seed).world_model()
        guide = guide_for(model, seed)
        start = time.perf_counter()
        fit(model, guide, *train, num_steps=steps, batch_size=batch, elbo=elbo,
            optim=default_optim(lr, lrd=0.1 ** (1 / steps)), progress=False, seed=seed)  # fmt: skip
        with torch.no_grad():
            fitted = float(CategoricalHMM.from_world_model(model).log_prob(*test).sum()) / n_test
        row[f"held-out gap, fitted by {name}"] = (true_test - fitted) / abs(true_test)
        row[f"seconds, fitted by {name}"] = time.perf_counter() - start
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="fewer steps and particles")
    p.add_argument(
        "--tiny", action="store_true", help="episodes of 5 steps, 5 training steps: to check the script"
    )
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run(seed, args.quick, args.tiny))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()), flush=True)
    print()
    print(f"| figure (nats per step, or a ratio) | mean over seeds {args.seeds} | spread (max − min) |")
    print("|---|---:|---:|")
    for key in rows[0]:
        values = [r[key] for r in rows]
        mean = sum(values) / len(values)
        print(f"| {key} | {mean:.3g} | {max(values) - min(values):.2g} |")


if __name__ == "__main__":
    main()
