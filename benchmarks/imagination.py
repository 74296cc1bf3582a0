"""Open-loop imagination against the baselines, on several environments and seeds.

Runs what a new user runs, `pyro-worldmodel train --env ENV --seed SEED` (collect
60 random-policy episodes, train the default spec for the default steps,
evaluate on the held-out fifth), through the same workflow functions, then
gathers every open-loop score of `metrics.json` over the seeds:

    python benchmarks/imagination.py                         # 4 environments x 3 seeds
    python benchmarks/imagination.py --envs Acrobot-v1 --seeds 0 1 2 3 4
    python benchmarks/imagination.py --tiny                  # seconds: a smoke test
    python benchmarks/imagination.py --set transition.name=ensemble --set train.num_steps=4500

It prints, per environment, predictor and horizon 1 ... 15, the mean over
seeds and (in brackets) the spread, max - min, of: MSE, the sample mixture's
log-likelihood, the moment-matched Gaussian's, its median and 10th percentile,
CRPS, and the coverage of the central 50% and 90% intervals; then the targets,
for the model as trained ("model") and with its spread recalibrated on other
held-out episodes ("calibrated", `open_loop(calibrate=True)`): whether it has
the best mean log-likelihood, CRPS and MSE of it and the baselines at every
horizon, whether its coverage is in [0.85, 0.95] (90%) and [0.42, 0.58] (50%)
at h = 1, 5 and 15, and the training time. `--out DIR` keeps every run and
writes `imagination.json` and `imagination.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ENVS = ("Pendulum-v1", "CartPole-v1", "Acrobot-v1", "MountainCar-v0")
HORIZONS = (1, 5, 15)
# The model's predictors: as trained, and with its spread recalibrated (cross-fitted).
MODELS = ("model", "calibrated")
SCORES = (
    ("mse", "MSE", "{:.3g}", "low"),
    ("log_lik", "log-lik (mixture)", "{:.3g}", "high"),
    ("log_lik_gaussian", "log-lik (Gaussian)", "{:.3g}", "high"),
    ("log_lik_median", "median log-lik", "{:.3g}", None),
    ("log_lik_p10", "10th pct log-lik", "{:.3g}", None),
    ("crps", "CRPS", "{:.3g}", "low"),
    ("coverage50", "50% cov.", "{:.2f}", None),
    ("coverage90", "90% cov.", "{:.2f}", None),
)


def run_one(env_id: str, seed: int, out: Path, tiny: bool, presets=(), overrides=None) -> dict:
    from pyro_worldmodel import Spec, workflow
    from pyro_worldmodel.data import collect

    episodes = collect(env_id, 12 if tiny else 60, seed=seed, num_envs=4 if tiny else 8, progress=False)
    spec = Spec.preset(*presets, *(["smoke"] if tiny else []))
    spec = workflow.training_spec(spec.with_overrides(overrides or {}))
    settings = workflow.TrainSettings(seed=seed)
    if tiny:
        settings.evaluate = workflow.EvalSettings(
            horizon=5, num_samples=10, iwae_particles=2, max_windows=50, seed=seed
        )
    else:
        settings.evaluate = workflow.EvalSettings(seed=seed)
    t0 = time.perf_counter()
    metrics = workflow.train_run(episodes, spec, out, settings, progress=False, log=lambda *a: None)
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def gather(results: list[dict]) -> dict:
    """score → predictor → [H] lists of per-seed values."""
    out: dict = {}
    for m in results:
        ol = m["open_loop"]
        for key, *_ in SCORES:
            if key.startswith("coverage"):
                table = ol["coverage"][f"0.{key[-2]}"]
            else:
                table = ol[key]
            for name, values in table.items():
                out.setdefault(key, {}).setdefault(name, []).append(values)
    return out


def fmt(values, h, spec) -> str:
    xs = [v[h - 1] for v in values if v[h - 1] is not None]
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    spread = max(xs) - min(xs)
    return spec.format(mean) + (f" ({spec.format(spread)})" if len(xs) > 1 else "")


def mean_at(values, h):
    xs = [v[h - 1] for v in values if v[h - 1] is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None, help="keep the runs and write the tables here")
    p.add_argument("--tiny", action="store_true", help="one small run per environment, to check the script")
    p.add_argument("--preset", nargs="+", default=[], help="presets laid over Spec(), as train's --preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as train's --set")
    args = p.parse_args(argv)
    from pyro_worldmodel.config import yaml_value

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml_value(value, f"--set {key.strip()}")
    if args.tiny:
        args.seeds = args.seeds[:1]
    work = args.out or Path(tempfile.mkdtemp(prefix="imagination-"))
    H = 5 if args.tiny else 15
    report, lines = {}, []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    for env_id in args.envs:
        results = []
        for seed in args.seeds:
            m = run_one(env_id, seed, work / env_id / f"seed{seed}", args.tiny, args.preset, overrides)
            results.append(m)
            print(
                f"{env_id} seed {seed}: trained and evaluated in {m['wall_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        scores = gather(results)
        report[env_id] = {"scores": scores, "wall_s": [m["wall_s"] for m in results], "seeds": args.seeds}
        spec = " ".join([*(f"--preset {p}" for p in args.preset), *(f"--set {x}" for x in args.set)])
        say(f"## {env_id}: mean over seeds {args.seeds} (max − min){': ' + spec if spec else ''}")
        say()
        say("| h | predictor | " + " | ".join(label for _, label, _, _ in SCORES) + " |")
        say("|---:|---|" + "---:|" * len(SCORES))
        for h in range(1, H + 1):
            for name in scores["mse"]:
                cells = [fmt(scores[k].get(name, []), h, f) for k, _, f, _ in SCORES]
                say(f"| {h} | {name} | " + " | ".join(cells) + " |")
        say()
        say(f"targets for {env_id} (mean over seeds):")
        for predictor in [n for n in MODELS if n in scores["mse"]]:
            say(f"- {predictor}:")
            for key, label, _, better in SCORES:
                if better is None:
                    continue
                lost = []
                for h in range(1, H + 1):
                    mine = mean_at(scores[key][predictor], h)
                    others = [mean_at(v, h) for n, v in scores[key].items() if n not in MODELS]
                    best = max(others) if better == "high" else min(others)
                    if not (mine > best if better == "high" else mine < best):
                        lost.append(h)
                say(
                    f"  - best {label} at every horizon: {'yes' if not lost else 'no, not at h = ' + ', '.join(map(str, lost))}"
                )
            for key, lo, hi in (("coverage90", 0.85, 0.95), ("coverage50", 0.42, 0.58)):
                got = [mean_at(scores[key][predictor], h) for h in HORIZONS if h <= H]
                ok = all(lo <= g <= hi for g in got)
                say(
                    f"  - {key[-2:]}% coverage in [{lo}, {hi}] at h = {', '.join(str(h) for h in HORIZONS if h <= H)}: "
                    f"{'yes' if ok else 'no'} ({', '.join(f'{g:.2f}' for g in got)})"
                )
        walls = report[env_id]["wall_s"]
        say(f"- collect, train and evaluate: {min(walls):.0f}–{max(walls):.0f} s per seed")
        say()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "imagination.json").write_text(json.dumps(report, indent=1, allow_nan=True))
        (args.out / "imagination.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
