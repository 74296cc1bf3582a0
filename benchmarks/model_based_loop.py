"""The model-based loop against its targets: Pendulum-v1, CartPole-v1, and MountainCar-v0's sparse reward.

    python benchmarks/model_based_loop.py              # every environment, the figures in the README
    python benchmarks/model_based_loop.py --env CartPole-v1
    python benchmarks/model_based_loop.py --tiny       # seconds: checks the script runs

For each environment it runs :func:`pyro_worldmodel.loop.model_based_loop`
with the settings below (the CEM planner, the loop's default model) within
the environment-step budget, stopping at the first evaluation that reaches
the target, and prints one row: the environment steps at that evaluation,
its return, and the wall time on this machine. Environment steps are those of the episodes in
the training data (random seed episodes included); evaluation episodes (10,
no exploration noise; 3 on MountainCar-v0) are not counted. One thread, as the CLI uses.
Writes ``<out>/<env>/loop.json``, ``loop.png`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pyro_worldmodel import Spec
from pyro_worldmodel.loop import model_based_loop
from pyro_worldmodel.plots import plot_loop

# target: the mean return over the evaluation episodes (10; 3 on MountainCar-v0, whose
# 200-step episodes of planning are slow); budget: environment steps.
TARGETS = {
    "Pendulum-v1": {"target": -250.0, "budget": 15_000},
    "CartPole-v1": {"target": 475.0, "budget": 10_000},
    # −1 per step until the goal; random play never reaches it (−200 in 60 of 60 episodes).
    "MountainCar-v0": {"target": -190.0, "budget": 5_000},
}
SETTINGS = {
    "Pendulum-v1": dict(
        planner={"name": "cem", "horizon": 15, "candidates": 300, "top_k": 30, "iterations": 4},
        loop=dict(iterations=30, seed_episodes=5, train_steps=300, eval_every=2, explore=0.3),
    ),
    "CartPole-v1": dict(
        planner={
            "name": "cem",
            "horizon": 25,
            "candidates": 300,
            "top_k": 30,
            "iterations": 4,
            "terminal_value": True,
        },
        loop=dict(
            iterations=60,
            seed_episodes=30,
            episodes_per_iteration=2,
            train_steps=300,
            eval_every=3,
            explore=0.1,
        ),
    ),
    # A sparse reward: the planner explores where an ensemble's members disagree.
    "MountainCar-v0": dict(
        spec={"transition.name": "ensemble"},
        planner={
            "name": "cem",
            "horizon": 20,
            "candidates": 300,
            "top_k": 50,
            "iterations": 4,
            "explore": 1.0,
        },
        loop=dict(
            iterations=20, seed_episodes=5, train_steps=300, eval_every=2, eval_episodes=3, explore=0.1
        ),
    ),
}
TINY = dict(
    planner={"name": "cem", "horizon": 4, "candidates": 30, "top_k": 3, "iterations": 2},
    loop=dict(iterations=2, seed_episodes=2, train_steps=5, eval_every=1, eval_episodes=2, window=10),
)


def run(
    env_id: str,
    out: Path,
    tiny: bool,
    seed: int,
    planner: str = "cem",
    budget: int | None = None,
    keep_going: bool = False,
) -> dict:
    settings = TINY if tiny else SETTINGS[env_id]
    target = TARGETS[env_id]["target"]
    budget = budget or TARGETS[env_id]["budget"]
    if planner == "cem":
        spec = Spec.preset("loop").with_overrides(
            {**settings.get("spec", {}), **{f"planner.{k}": v for k, v in settings["planner"].items()}}
        )
    else:  # the other planners with their defaults
        spec = Spec.preset("loop").with_overrides({"planner": {"name": planner}})
    start = time.perf_counter()
    # Stops at the first evaluation that reaches the target, or at the budget.
    stop_at = None if tiny or keep_going else target
    result = model_based_loop(
        env_id,
        spec,
        max_env_steps=budget,
        stop_at=stop_at,
        seed=seed,
        out=out / env_id,
        progress=False,
        **settings["loop"],
    )
    seconds = time.perf_counter() - start
    plot_loop(result, out / env_id / "loop.png", target=target)
    evaluated = [r for r in result.iterations if r["eval_return"] is not None]
    reached = result.first_reaching(target)
    final = evaluated[-1]
    return {
        "env": env_id,
        "planner": result.planner,
        "target": target,
        "budget": budget,
        "reached_at_env_steps": None if reached is None else reached["env_steps"],
        "final_env_steps": final["env_steps"],
        "final_return": final["eval_return"],
        "final_return_std": final["eval_return_std"],
        "best_return": max(r["eval_return"] for r in evaluated),
        "met": reached is not None and reached["env_steps"] <= budget,
        "seconds": seconds,
        "settings": settings,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=sorted(TARGETS), action="append", help="default: every one")
    p.add_argument("--tiny", action="store_true", help="tiny settings: checks that the script runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--planner",
        default="cem",
        choices=["cem", "actor_critic", "policy"],
        help="default: cem, as in the README",
    )
    p.add_argument(
        "--budget", type=int, default=None, help="environment steps (default: the target's budget)"
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="do not stop at the target: spend the budget (or the iterations)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/model_based_loop"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    envs = args.env or list(TARGETS)
    rows = [
        run(env, args.out, args.tiny, args.seed, args.planner, args.budget, args.keep_going) for env in envs
    ]
    print(
        f"model-based loop, {args.planner} planner; {platform.processor() or platform.machine()}, 1 thread;"
        f" seed {args.seed}"
    )
    print()
    print(
        "| environment | target (mean return) | budget (env steps) | reached at (env steps) | final return ± std (at env steps) | wall time |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        reached = "not reached" if r["reached_at_env_steps"] is None else f"{r['reached_at_env_steps']:,}"
        print(
            f"| {r['env']} | ≥ {r['target']:g} | {r['budget']:,} | {reached} |"
            f" {r['final_return']:.1f} ± {r['final_return_std']:.1f} ({r['final_env_steps']:,}) |"
            f" {r['seconds'] / 60:.1f} min |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    if not args.tiny and not all(r["met"] for r in rows):
        print("\ntarget missed:", ", ".join(r["env"] for r in rows if not r["met"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
