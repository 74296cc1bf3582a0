"""Train the default world model on a built-in linear-Gaussian system.

The system's exact log-likelihood is known, so the printout shows how close
the learned model's held-out ELBO and IWAE estimate come to the truth.

    python examples/quickstart.py            # about two minutes on 2 CPU cores
    python examples/quickstart.py --tiny     # seconds: what the tests run
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from pyro_worldmodel import (
    ActionSpace,
    FilterGuide,
    LinearGaussianSSM,
    WorldModel,
    elbo_terms,
    fit,
    iwae_log_likelihood,
)


@dataclass
class Config:
    steps: int = 1000
    """SVI steps."""
    episodes: int = 256
    """Training episodes (as many again are held out)."""
    T: int = 20
    """Steps per episode."""
    latent_dim: int = 4
    """Size of z_t in the learned model (the true system has 2)."""
    seed: int = 0
    """Seeds the data, the initial parameters and SVI."""
    out: Path = Path("runs/quickstart.ckpt")
    """Checkpoint file, written atomically while training."""

    @classmethod
    def tiny(cls, **kwargs) -> Config:
        return cls(steps=20, episodes=16, T=8, **kwargs)


def main(cfg: Config) -> dict[str, float]:
    pyro.set_rng_seed(cfg.seed)
    system = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, action_dim=1, seed=cfg.seed)
    obs, actions, _ = system.sample(cfg.episodes, cfg.T, seed=cfg.seed + 1)
    test_obs, test_actions, _ = system.sample(cfg.episodes, cfg.T, seed=cfg.seed + 2)

    model = WorldModel.default(
        obs_dim=3, action_space=ActionSpace.box(1), latent_dim=cfg.latent_dim, hidden=(32, 32)
    )
    guide = FilterGuide.for_model(model, rnn_dim=32)
    history = fit(
        model,
        guide,
        obs,
        actions,
        num_steps=cfg.steps,
        lr=3e-3,
        seed=cfg.seed,
        terms_every=max(cfg.steps // 10, 1),
        checkpoint=cfg.out,
    )

    n = cfg.episodes * cfg.T
    terms = elbo_terms(model, guide, test_obs, test_actions, num_particles=4)
    iwae = iwae_log_likelihood(model, guide, test_obs, test_actions, num_particles=100).sum().item() / n
    exact = system.log_prob(test_obs, test_actions).sum().item() / n
    print(f"trained {len(history.loss)} steps; checkpoint at {cfg.out}")
    print("held-out, nats per timestep:")
    print(f"  log p(x|z) {terms.log_px:8.3f}   log π(a|z) {terms.log_pa:8.3f}   KL {terms.kl:8.3f}")
    print(f"  ELBO       {terms.elbo:8.3f}")
    print(f"  IWAE-100   {iwae:8.3f}")
    print(f"  exact      {exact:8.3f}   (the true system's log p(x, a))")
    return {"elbo": terms.elbo, "iwae": iwae, "exact": exact}


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a run of seconds, for tests")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Config.out)
    args = parser.parse_args(argv)
    cfg = Config.tiny(seed=args.seed, out=args.out) if args.tiny else Config(seed=args.seed, out=args.out)
    if args.steps is not None:
        cfg.steps = args.steps
    return cfg


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread is 5-10% faster at these sizes (docs/pyro_pitfalls.md)
    main(parse_args())
