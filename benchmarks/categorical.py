"""Gaussian and categorical latents side by side, both with the RSSM, on Pendulum-v1 and CartPole-v1.

    python benchmarks/categorical.py                  # both environments, seeds 0-2, the loop on seed 0
    python benchmarks/categorical.py --envs CartPole-v1 --seeds 0 --no-loop
    python benchmarks/categorical.py --tiny           # seconds: checks the script runs

The two states:

- ``gaussian``: the ``planet`` preset, PlaNet's RSSM (deter_dim 32) with a Gaussian z_t of 8;
- ``categorical``: the ``categorical`` preset (z_t 8 groups of 4 classes, the categorical
  filter guide) with the categorical RSSM (deter_dim 32): DreamerV2's state.

For each environment, state and seed it runs what `pyro-worldmodel train --preset ...` runs
(60 random-action episodes, the default steps, evaluation on the held-out fifth) and reports
the held-out ELBO per step and the open-loop MSE and Gaussian log-likelihood of the model at
h = 1, 5 and 15 (5 context steps). Then, on the first seed, the model-based loop with the CEM
planner of ``benchmarks/model_based_loop.py`` over each state (``planet`` then ``loop``, and
``loop`` then ``categorical``), spending a fixed budget of environment steps, and the mean
evaluation return at its end. It prints the mean over seeds and, in brackets, the spread
(max − min). `--out DIR` keeps every run and writes ``categorical.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ENVS = ("Pendulum-v1", "CartPole-v1")
HORIZONS = (1, 5, 15)
CATEGORICAL_RSSM = {"transition": {"name": "categorical_rssm", "deter_dim": 32}}
STATES = {
    "gaussian": {"presets": ("planet",), "loop_presets": ("planet", "loop"), "overrides": {}},
    "categorical": {
        "presets": ("categorical",),
        "loop_presets": ("loop", "categorical"),
        "overrides": CATEGORICAL_RSSM,
    },
}
BUDGET = 2_000  # environment steps of the loop, random seed episodes included


def _sibling(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_one(env_id, state, seed, out, tiny):
    imagination = _sibling("imagination")
    s = STATES[state]
    return imagination.run_one(env_id, seed, out, tiny, presets=s["presets"], overrides=s["overrides"])


def loop_one(env_id, state, seed, out, tiny, budget):
    from pyro_worldmodel import Spec
    from pyro_worldmodel.loop import model_based_loop

    mbl = _sibling("model_based_loop")
    settings = mbl.TINY if tiny else mbl.SETTINGS[env_id]
    s = STATES[state]
    spec = Spec.preset(*s["loop_presets"]).with_overrides(
        {**s["overrides"], **{f"planner.{k}": v for k, v in settings["planner"].items()}}
    )
    start = time.perf_counter()
    result = model_based_loop(
        env_id, spec, max_env_steps=budget, seed=seed, out=out, progress=False, **settings["loop"]
    )
    evaluated = [r for r in result.iterations if r["eval_return"] is not None]
    return {
        "env_steps": evaluated[-1]["env_steps"],
        "return": evaluated[-1]["eval_return"],
        "return_std": evaluated[-1]["eval_return_std"],
        "seconds": time.perf_counter() - start,
    }


def summary(values, digits):
    xs = [v for v in values if v is not None and v == v]
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    return format(mean, digits) + (f" ({format(max(xs) - min(xs), digits)})" if len(xs) > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--no-loop", action="store_true", help="leave out the model-based loop")
    p.add_argument("--budget", type=int, default=BUDGET, help="the loop's environment steps")
    p.add_argument("--out", type=Path, default=None, help="keep the runs and write categorical.json here")
    p.add_argument("--tiny", action="store_true", help="smoke sizes: checks that the script runs")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.tiny:
        args.seeds = args.seeds[:1]
    work = args.out or Path(tempfile.mkdtemp(prefix="categorical-"))
    report = {}
    for env_id in args.envs:
        for state in STATES:
            runs = []
            for seed in args.seeds:
                m = train_one(env_id, state, seed, work / env_id / state / f"seed{seed}", args.tiny)
                runs.append(
                    {
                        "seed": seed,
                        "heldout_elbo": m["heldout"]["elbo"],
                        "mse": m["open_loop"]["mse"]["model"],
                        "log_lik_gaussian": m["open_loop"]["log_lik_gaussian"]["model"],
                        "train_s": m["wall_s"],
                    }
                )
                print(f"{env_id} {state} seed {seed}: trained in {m['wall_s']:.0f} s", file=sys.stderr)
            loop = None
            if not args.no_loop:
                budget = 300 if args.tiny else args.budget
                loop = loop_one(
                    env_id, state, args.seeds[0], work / env_id / state / "loop", args.tiny, budget
                )
                print(
                    f"{env_id} {state} loop: {loop['return']:.1f} in {loop['seconds']:.0f} s", file=sys.stderr
                )
            report.setdefault(env_id, {})[state] = {"runs": runs, "loop": loop}
    horizons = [h for h in HORIZONS if h <= (5 if args.tiny else 15)]
    print(
        f"Gaussian and categorical states, both with the RSSM; seeds {args.seeds}: mean (spread, max − min)"
    )
    print()
    head = "| environment | state | held-out ELBO / step |"
    head += "".join(f" MSE h={h} |" for h in horizons) + "".join(f" log-lik h={h} |" for h in horizons)
    head += f" loop return at {args.budget if not args.tiny else 300:,} env steps (seed {args.seeds[0]}) |"
    print(head)
    print("|---|---|" + "---:|" * (2 + 2 * len(horizons)))
    for env_id, states in report.items():
        for state, r in states.items():
            runs = r["runs"]
            cells = [summary([x["heldout_elbo"] for x in runs], ".3g")]
            cells += [summary([x["mse"][h - 1] for x in runs], ".3g") for h in horizons]
            cells += [summary([x["log_lik_gaussian"][h - 1] for x in runs], ".3g") for h in horizons]
            cells.append(
                "–" if r["loop"] is None else f"{r['loop']['return']:.0f} ± {r['loop']['return_std']:.0f}"
            )
            print(f"| {env_id} | {state} | " + " | ".join(cells) + " |")
    (work / "categorical.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nruns and categorical.json: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
