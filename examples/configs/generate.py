"""Write one spec per built-in combination of transition, emission and guide.

    python examples/configs/generate.py

Each file is the CLI's default spec with three parts swapped; every one is
built by the test suite (tests/test_config.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from pyro_worldmodel.config import REGISTRY

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "transition": {
        "gaussian_mlp": {"hidden": [64, 64]},
        "gated": {"hidden": [64]},
        "rssm": {"deter_dim": 64, "hidden": [64]},
        "student_t": {"hidden": [64, 64]},
    },
    "emission": {
        "gaussian_mlp": {"hidden": [64, 64]},
        "student_t": {"hidden": [64, 64]},
        "bernoulli": {"hidden": [64, 64]},
    },
    "guide": {
        "filter": {"rnn_dim": 64},
        "smoothing": {"rnn_dim": 64},
        "mean_field": {"hidden": [64]},
        "iaf_filter": {"rnn_dim": 64, "num_iafs": 2},
    },
}
NOTES = {
    ("emission", "bernoulli"): "For binary observations (every x in {0, 1}).",
    (
        "transition",
        "student_t",
    ): "KL(Normal ‖ StudentT) has no closed form: TraceMeanField_ELBO estimates those"
    " KL terms by Monte Carlo, as declared below.",
    ("guide", "iaf_filter"): "KL(flow ‖ prior) has no closed form: TraceMeanField_ELBO estimates the KL terms"
    " by Monte Carlo, as declared below.",
    ("transition", "rssm"): "The emission and the policy read [h_t, z_t]: 64 deterministic + 8 stochastic.",
}


def monte_carlo_pairs(transition: str, guide: str) -> list[str]:
    """The pairs of distributions with no analytic KL in this combination, as the ELBO names them."""
    q = "TransformedDistribution" if guide == "iaf_filter" else "Normal"
    priors = ["Normal", "StudentT"] if transition == "student_t" else ["Normal"]  # z_0's, then the others'
    return [f"KL({q} ‖ {p})" for p in priors if q != "Normal" or p != "Normal"]


def flow(value) -> str:
    return yaml.safe_dump(
        value, default_flow_style=True, sort_keys=False, width=200, allow_unicode=True
    ).strip()


def main() -> None:
    for old in HERE.glob("*.yaml"):
        old.unlink()
    for t, e, g in itertools.product(REGISTRY["transition"], REGISTRY["emission"], REGISTRY["guide"]):
        name = f"{t}_transition__{e}_emission__{g}_guide"
        chosen = {"transition": t, "emission": e, "guide": g}
        notes = [NOTES[k] for k in chosen.items() if k in NOTES]
        elbo = {"name": "TraceMeanField_ELBO", "num_particles": 1}
        pairs = monte_carlo_pairs(t, g)
        if pairs:  # declared, so any other fallback still warns
            elbo["monte_carlo_kl"] = pairs
        lines = [
            f"# Transition {t}, emission {e}, guide {g}.",
            *(f"# {note}" for note in notes),
            f"#   pyro-worldmodel train --config examples/configs/{name}.yaml",
            "latent_dim: 8",
            "init: {name: standard_normal}",
            *(
                f"{slot}: {flow({'name': chosen[slot], **SETTINGS[slot].get(chosen[slot], {})})}"
                for slot in ("transition", "emission")
            ),
            "policy: {name: auto}",
            f"guide: {flow({'name': g, **SETTINGS['guide'].get(g, {})})}",
            f"elbo: {flow(elbo)}",
            "optim: {name: ClippedAdam, lr: 0.001, clip_norm: 10.0}",
            "train: {num_steps: 1500, batch_size: 32}",
        ]
        (HERE / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
