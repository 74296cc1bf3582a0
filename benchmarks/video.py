"""Open-loop video prediction and the state probe of models of frames, over environments and seeds.

Runs what a user runs, `pyro-worldmodel collect --pixels` then `train --preset pixels`,
through the same workflow functions (collect frames with random actions, train the
`pixels` preset, evaluate on the held-out fifth), and gathers the video scores and the
state probe of `metrics.json` over the seeds:

    python benchmarks/video.py                                  # Pendulum-v1 and CartPole-v1, 64×64 RGB, seeds 0-2
    python benchmarks/video.py --envs Pendulum-v1 --seeds 0 --frame-size 32 --steps 3000
    python benchmarks/video.py --tiny                           # seconds: a smoke test

It prints, per environment, the mean over seeds and (in brackets) the spread, max −
min, of the MSE per pixel and the PSNR of the model, the last context frame and the
mean training frame at horizons 1, 5, 15 and 45 (5 context frames), and the probe's
held-out R² (filtered, and imagined at those horizons); then the issue's targets: the
model beats both baselines in MSE and PSNR at every one of those horizons, and the
filtered R² is at least 0.9. `--out DIR` keeps every run and writes `video.json` and
`video.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pyro_worldmodel.cli import key_value

ENVS = ("Pendulum-v1", "CartPole-v1")
HORIZONS = (1, 5, 15, 45)
PREDICTORS = ("model", "copy_last", "mean_frame")
R2_TARGET = 0.9


def run_one(env_id, seed, out, args, overrides) -> dict:
    from pyro_worldmodel import Spec, workflow
    from pyro_worldmodel.data import Pixels, collect

    tiny = args.tiny
    pixels = Pixels(args.frame_size, grayscale=args.grayscale)
    episodes = collect(
        env_id,
        8 if tiny else args.episodes,
        seed=seed,
        num_envs=4 if tiny else 8,
        max_episode_steps=30 if tiny else None,
        pixels=pixels,
        progress=False,
    )
    spec = Spec.preset("pixels")
    spec = spec.with_overrides(
        {"train.num_steps": args.steps, "train.batch_size": args.batch_size, **overrides}
    )
    spec = workflow.training_spec(spec)
    horizon = 5 if tiny else max(HORIZONS)
    settings = workflow.TrainSettings(seed=seed, overwrite=True)
    settings.evaluate = workflow.EvalSettings(
        context=3 if tiny else 5,
        horizon=horizon,
        num_samples=3 if tiny else 10,
        iwae_particles=2 if tiny else 20,
        max_windows=20 if tiny else 200,
        seed=seed,
    )
    t0 = time.perf_counter()
    metrics = workflow.train_run(episodes, spec, out, settings, progress=False, log=lambda *a: None)
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def summary(values: list[float], digits: str) -> str:
    xs = [v for v in values if v is not None and v == v]
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    return format(mean, digits) + (f" ({format(max(xs) - min(xs), digits)})" if len(xs) > 1 else "")


def mean(values: list[float]) -> float:
    xs = [v for v in values if v is not None and v == v]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--frame-size", type=int, default=64)
    p.add_argument("--grayscale", action="store_true")
    p.add_argument("--episodes", type=int, default=60, help="random-action episodes collected per run")
    p.add_argument("--steps", type=int, default=3000, help="SVI steps per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="keep the runs and write the tables here")
    p.add_argument("--tiny", action="store_true", help="16×16 frames, a few steps: to check the script")
    p.add_argument(
        "--set", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="as train's --set"
    )
    args = p.parse_args(argv)
    overrides = dict(args.set)
    if args.tiny:
        args.seeds, args.frame_size, args.grayscale, args.steps = args.seeds[:1], 16, True, 5
        overrides = {"encoder.layers": 2, "emission.layers": 2, **overrides}
    horizons = [h for h in HORIZONS if h <= (5 if args.tiny else max(HORIZONS))]
    work = args.out or Path(tempfile.mkdtemp(prefix="video-"))
    report, lines = {}, []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    for env_id in args.envs:
        results = []
        for seed in args.seeds:
            m = run_one(env_id, seed, work / env_id / f"seed{seed}", args, overrides)
            results.append(m)
            print(
                f"{env_id} seed {seed}: collected, trained and evaluated in {m['wall_s']:.0f} s",
                file=sys.stderr,
            )
        video = [m["video"] for m in results]
        probe = [m["state_probe"] for m in results]
        report[env_id] = {
            "seeds": args.seeds,
            "video": video,
            "state_probe": probe,
            "wall_s": [m["wall_s"] for m in results],
        }
        size = f"{args.frame_size}×{args.frame_size} {'grayscale' if args.grayscale else 'RGB'}"
        say(f"## {env_id}, {size}, {args.steps} steps: mean over seeds {args.seeds} (max − min)")
        say()
        say("| h | predictor | MSE per pixel | PSNR (dB) |")
        say("|---:|---|---:|---:|")
        for h in horizons:
            for name in PREDICTORS:
                mse = [v["mse"][name][h - 1] for v in video]
                psnr = [v["psnr"][name][h - 1] for v in video]
                say(f"| {h} | {name} | {summary(mse, '.3g')} | {summary(psnr, '.3g')} |")
        say()
        filtered = [q["filtered_r2"] for q in probe]
        imagined = {h: [q["imagined_r2"][h - 1] for q in probe] for h in horizons}
        say(
            f"state probe R², held out: filtered {summary(filtered, '.2f')}; imagined "
            + ", ".join(f"h={h} {summary(imagined[h], '.2f')}" for h in horizons)
        )
        say(f"targets for {env_id} (mean over seeds):")
        for key, label, better in (("mse", "MSE", min), ("psnr", "PSNR", max)):
            losing = []
            for h in horizons:
                scores = {n: mean([v[key][n][h - 1] for v in video]) for n in PREDICTORS}
                if better(scores, key=scores.get) != "model":
                    losing.append(h)
            verdict = "yes" if not losing else f"no, not at h = {', '.join(map(str, losing))}"
            say(
                f"- the model beats both baselines in {label} at h = {', '.join(map(str, horizons))}: {verdict}"
            )
        r2 = mean(filtered)
        say(f"- filtered R² ≥ {R2_TARGET}: {'yes' if r2 >= R2_TARGET else 'no'} ({r2:.2f})")
        walls = [m["wall_s"] for m in results]
        say(f"- collect, train and evaluate: {min(walls):.0f}–{max(walls):.0f} s per seed")
        say()
    if args.out is not None:
        (args.out / "video.json").write_text(json.dumps(report, indent=1))
        (args.out / "video.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
