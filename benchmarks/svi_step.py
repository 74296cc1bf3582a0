"""Time one SVI step: the library's default path, the same ELBO by hand, and stock Pyro.

    python benchmarks/svi_step.py                  # CPU, B=32, T in {10, 50, 200}
    python benchmarks/svi_step.py --device cuda --batch 32 256 1024
    python benchmarks/svi_step.py --tiny           # seconds; what CI runs
    python benchmarks/svi_step.py --pixels         # a model of 64×64 RGB frames, B=16, T=50
    python benchmarks/svi_step.py --compile        # and the library with torch.compile (inductor)

One step is the loss, its backward and the optimiser's step (ClippedAdam, as
`fit` uses), for a world model with vector observations: latent 16, hidden 64
(WorldModel.default and FilterGuide). Three ways of computing the same ELBO:

- library: what `pyro_worldmodel.fit` runs by default, SVI with
  `default_elbo()` (the batched mean-field path, `pyro_worldmodel.infer.batched`);
- reference: the floor. It calls the library's own factors, the guide's
  `initial_latent`, `context`, `step_weights` and `step_params` and the
  model's `priors` and `observation_sites`, so that no component is written
  twice; what it writes by hand is the rest of the objective: the loop over
  time with q's reparameterised draws, the analytic KL of each prior and the
  sum of the log-densities, then backward and ClippedAdam on the modules'
  parameters. It has none of Pyro's machinery (no param store, traces or
  sample sites, no input checks, validation off), which is what the library
  / reference column measures;
- stock: SVI with Pyro's own `TraceMeanField_ELBO`, eager, validation on (Pyro's default);
- compiled (with ``--compile``): the library with ``TraceMeanField_ELBO(compile=...)``, the
  guide's steps through ``torch.compile``; its compile time (forward and backward, per B
  and T) is printed, and its loss and gradients are checked against the reference's;
- floor (with ``--compile``): the reference with the guide's steps run in one call over
  B·T instead of a loop (each reads z_0 for z_{t-1}: not the ELBO), the same arithmetic
  without the per-step overhead: the best that compiling the guide's steps could reach.

With ``--pixels`` the model is the ``pixels`` preset's (the convolutional
encoder and decoder, depth 8) on 64×64×3 frames (``--frame-size``): the
library is given uint8 pixel values, as ``fit`` gives them, and converts each
batch; the reference is given them in float32.

Before timing, the reference and the library must give the same loss and
gradients on the same parameters and noise, to 1e-5 relative: the factors
being shared, this checks how the library assembles them (the order of the
draws, the KL terms, the sign and the sums). The variants
are timed interleaved in one process; each figure is the median after a
warm-up. The cost per timestep is the slope of a least-squares line in T.
Memory is the peak of tensor memory allocated during one step, above what
was allocated before it: `torch.cuda.max_memory_allocated` on a GPU, the
profiler's allocation events on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import pyro
import pyro.optim
import torch
from pyro.distributions import Normal
from pyro.infer import SVI
from pyro.optim.clipped_adam import ClippedAdam
from torch.distributions import kl_divergence

from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel
from pyro_worldmodel.evaluate.profiling import peak_memory
from pyro_worldmodel.infer import MAX_PLATE_NESTING, TraceMeanField_ELBO, default_elbo, default_optim

OBS_DIM, ACTION_DIM, LATENT, HIDDEN = 8, 2, 16, 64
# --pixels: the frames' (C, H, W), or None for vector observations
IMAGE = {"shape": None}


def build(device):
    if IMAGE["shape"] is not None:
        from pyro_worldmodel.config import Spec
        from pyro_worldmodel.config import build as build_spec

        spec = Spec.preset("pixels").with_overrides({"latent_dim": LATENT})
        C, H, W = IMAGE["shape"]
        built = build_spec(spec, C * H * W, ActionSpace.box(ACTION_DIM), image_shape=IMAGE["shape"])
        return built.model.to(device), built.guide.to(device)
    model = WorldModel.default(
        OBS_DIM, ActionSpace.box(ACTION_DIM), latent_dim=LATENT, hidden=(HIDDEN, HIDDEN)
    )
    guide = FilterGuide.for_model(model, rnn_dim=HIDDEN, hidden=(HIDDEN,))
    return model.to(device), guide.to(device)


def batch(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if IMAGE["shape"] is not None:  # pixel values, uint8, as fit gives them to the library
        X = IMAGE["shape"][0] * IMAGE["shape"][1] * IMAGE["shape"][2]
        obs = torch.randint(256, (B, T, X), generator=g, dtype=torch.uint8)
    else:
        obs = torch.randn(B, T, OBS_DIM, generator=g)
    actions = torch.randn(B, T, ACTION_DIM, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return obs.to(device), actions.to(device), mask.to(device)


# ---------------------------------------------------------------- the reference


def reference_loss(model, guide, obs, actions, mask, sequential=True):
    """−ELBO of the library's factors, assembled by hand: the guide step by step, then the
    model's priors and observed factors at the drawn latents. Every step is observed here.

    With ``sequential=False`` (the "floor" of ``--compile``) the guide's steps are not a
    recurrence: every step reads z_0 for z_{t-1} and all run in one call over B·T. Not the
    ELBO, but the same arithmetic without the loop's per-step overhead: what compiling the
    guide's steps could reach at best."""
    B, T = mask.shape
    obs = obs.float()  # pixel values: the reference reads them in float32
    # Validation off, as the library's batched path runs once its inputs are checked.
    with pyro.validation_enabled(False):
        a_feat = model.action_space.features(actions, obs.dtype)  # (B, T, A)
        context = guide.context(obs, a_feat, mask)  # (B, T, C): what q(z_t | ·) reads besides z_{t-1}
        weights = guide.step_weights()
        if sequential:
            z_prev = guide.initial_latent(B)  # (B, Z)
            zs, locs, scales = [], [], []
            for c_t in context.unbind(1):
                loc, scale = guide.step_params(z_prev, c_t, weights)
                z_prev = loc + torch.randn_like(loc) * scale  # the draw of Normal(loc, scale).rsample()
                zs.append(z_prev)
                locs.append(loc)
                scales.append(scale)
            z, q_loc, q_scale = (torch.stack(v, 1) for v in (zs, locs, scales))  # (B, T, Z) each
        else:
            z_0 = guide.initial_latent(B * T).contiguous()
            loc, scale = guide.step_params(z_0, context.reshape(B * T, -1), weights)
            z, q_loc, q_scale = (
                v.reshape(B, T, -1) for v in (loc + torch.randn_like(loc) * scale, loc, scale)
            )
        priors, features = model.priors(z, a_feat)  # p(z_1), then p(z_t | z_{t-1}, a_{t-1}) for t ≥ 2
        kl, t = 0.0, 0
        for prior in priors:  # each over the next n steps
            n = prior.batch_shape[-1]
            q = Normal(q_loc[:, t : t + n], q_scale[:, t : t + n]).to_event(1)
            kl = kl + kl_divergence(q, prior).sum()
            t += n
        log_lik = sum(  # log p(x_t | z_t) and log π(a_t | z_t)
            d.log_prob(value).sum()
            for d, value in model.observation_sites(features, a_feat, obs, actions).values()
        )
    return -(log_lik - kl)


# ---------------------------------------------------------------- steps


COMPILE = {"backend": None}  # --compile: torch.compile's backend for the "compiled" variant


class Variant:
    def __init__(self, name, device, B, T):
        self.name = name
        pyro.clear_param_store()
        torch.manual_seed(0)
        self.model, self.guide = build(device)
        self.args = batch(B, T, device)
        self.params = [*self.model.parameters(), *self.guide.parameters()]
        if name in ("reference", "floor"):
            self.optim = ClippedAdam(self.params, lr=1e-4, clip_norm=10.0)
        else:
            if name == "library":
                elbo = default_elbo()
            elif name == "compiled":
                elbo = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, compile=COMPILE["backend"])
            else:
                elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
            self.elbo = elbo
            self.svi = SVI(self.model.model, self.guide, default_optim(lr=1e-4), elbo)

    def step(self):
        if self.name in ("reference", "floor"):
            for p in self.params:
                p.grad = None
            loss = reference_loss(self.model, self.guide, *self.args, sequential=self.name == "reference")
            loss.backward()
            self.optim.step()
            return loss.item()  # the one host-device sync, as SVI's
        return self.svi.step(*self.args)  # Pyro's validation at its default, on, as a user runs it


def check_same_elbo(device, B=8, T=12):
    """The reference and the library: same loss and gradients on the same parameters and noise."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = build(device)
    args = batch(B, T, device, seed=1)
    params = [*model.parameters(), *guide.parameters()]
    variants = {
        "library": lambda: default_elbo().differentiable_loss(model.model, guide, *args),
        "reference": lambda: reference_loss(model, guide, *args),
    }
    if COMPILE["backend"] is not None:
        compiled = TraceMeanField_ELBO(max_plate_nesting=MAX_PLATE_NESTING, compile=COMPILE["backend"])
        variants["compiled"] = lambda: compiled.differentiable_loss(model.model, guide, *args)
    results = {}
    for name, fn in variants.items():
        for p in params:
            p.grad = None
        pyro.set_rng_seed(7)
        loss = fn()
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in params])
    l_ref, g_ref = results.pop("reference")
    for name, (l_lib, g_lib) in results.items():
        worst = max(
            ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(g_lib, g_ref)
        )
        loss_rel = ((l_lib - l_ref).abs() / l_ref.abs()).item()
        tolerance = 1e-5 if name == "library" else 1e-4  # compiled kernels sum in another order
        if loss_rel > tolerance or worst > tolerance:
            sys.exit(
                f"the reference and the {name} step differ: loss by {loss_rel:.2e}, gradients by {worst:.2e}"
                " (relative)"
            )
        print(
            f"same ELBO ({name}): loss {l_lib.item():.6g}, relative difference {loss_rel:.1e} (loss),"
            f" {worst:.1e} (gradients)"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="B for the timings")
    parser.add_argument("--T", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument(
        "--memory-batch", type=int, nargs="+", default=[16, 32, 64], help="B for the memory grid"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-stock", action="store_true", help="skip stock Pyro (slow at large B on a GPU)")
    parser.add_argument("--tiny", action="store_true", help="B=4, T in {5, 10}, 2 repeats: a smoke run")
    parser.add_argument(
        "--pixels", action="store_true", help="the pixels preset on frames: B=16, T=50 unless given"
    )
    parser.add_argument("--frame-size", type=int, default=64, help="with --pixels: N×N RGB frames")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="time the library with torch.compile too (default backend: inductor)",
    )
    args = parser.parse_args(argv)
    COMPILE["backend"] = args.compile
    if args.pixels:
        IMAGE["shape"] = (3, args.frame_size, args.frame_size)
        given = set(argv if argv is not None else sys.argv[1:])
        if "--batch" not in given:
            args.batch = [16]
        if "--T" not in given:
            args.T = [50]
        if "--memory-batch" not in given:
            args.memory_batch = [4, 16]
        if "--repeats" not in given:
            args.repeats = 8
        if "--warmup" not in given:
            args.warmup = 2
    if args.tiny:
        args.batch, args.T, args.memory_batch, args.repeats, args.warmup = [4], [5, 10], [2, 4], 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ["library", "reference"] + ([] if args.no_stock else ["stock"])
    names += ["compiled", "floor"] if args.compile else []
    what = (
        f"frames {'×'.join(map(str, IMAGE['shape']))} (pixels preset)" if IMAGE["shape"] else f"obs {OBS_DIM}"
    )
    print(f"device {device}, {torch.get_num_threads()} threads; latent {LATENT}, hidden {HIDDEN}, {what}")
    if device.type == "cuda":
        print(f"card: {torch.cuda.get_device_name(device)}")
    check_same_elbo(device)

    rows = []
    for B in args.batch:
        for T in args.T:
            variants = [Variant(n, device, B, T) for n in names]
            times = {n: [] for n in names}
            for i in range(args.warmup + args.repeats):
                for v in variants:  # interleaved
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    v.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times[v.name].append(time.perf_counter() - start)
                if i == args.warmup - 1:
                    gc.collect()
                    gc.freeze()  # no collector pauses inside the timings (docs/pyro_pitfalls.md)
            gc.unfreeze()
            row = {"B": B, "T": T, **{n: statistics.median(times[n]) * 1e3 for n in names}}
            row["library_mem"] = peak_memory(variants[0].step, device) / 2**20
            if args.compile:  # compiled in the warm-up: its first step
                compiled = next(v.elbo for v in variants if v.name == "compiled")
                if compiled.compile_error is not None:
                    sys.exit(f"compiling failed: {compiled.compile_error}")
                row["compile_s"] = compiled.compile_seconds
            rows.append(row)

    print()
    head = "| B | T | " + " | ".join(f"{n} ms" for n in names) + " | library / reference |"
    head += (
        " stock / library |" if "stock" in names else ""
    ) + " sequences/s (library) | peak MiB (library) |"
    head += " compiled / reference | floor / reference | compile s |" if args.compile else ""
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for r in rows:
        cells = [str(r["B"]), str(r["T"])] + [f"{r[n]:.1f}" for n in names]
        cells.append(f"{r['library'] / r['reference']:.2f}")
        if "stock" in names:
            cells.append(f"{r['stock'] / r['library']:.2f}")
        cells += [f"{r['B'] / (r['library'] / 1e3):.0f}", f"{r['library_mem']:.2f}"]
        if args.compile:
            cells += [f"{r['compiled'] / r['reference']:.2f}", f"{r['floor'] / r['reference']:.2f}"]
            cells.append(f"{r['compile_s']:.0f}")
        print("| " + " | ".join(cells) + " |")

    for B in args.batch:
        sub = [r for r in rows if r["B"] == B]
        if len(sub) < 2:
            continue
        Ts = torch.tensor([float(r["T"]) for r in sub])
        print(f"\nB={B}: time per step against T, least squares (cost per timestep, fixed cost, R²):")
        for n in names:
            slope, intercept, r2 = _line(Ts, torch.tensor([r[n] for r in sub]))
            print(f"  {n:10s} {slope * 1e3:8.1f} µs per timestep + {intercept:6.2f} ms; R² {r2:.4f}")

    # Memory against B·T: the library's step alone, on a grid of B and T.
    grid = []
    for B in args.memory_batch:
        for T in args.T:
            v = Variant("library", device, B, T)
            v.step()  # warm: first-call allocations (optimiser state) are not a step's
            grid.append((B * T, peak_memory(v.step, device) / 2**20))
    x = torch.tensor([float(bt) for bt, _ in grid])
    y = torch.tensor([m for _, m in grid])
    slope, intercept, r2 = _line(x, y)
    print(f"\npeak memory of one library step over B in {args.memory_batch} and T in {args.T}:")
    print("  " + ", ".join(f"B·T={bt}: {m:.2f} MiB" for bt, m in grid))
    print(
        f"  least squares in B·T: {slope * 1024:.2f} KiB per sequence-step + {intercept:.2f} MiB; R² {r2:.4f}"
    )

    if device.type == "cuda":
        print(f"\nhost-device synchronisations in one library step: {count_syncs(Variant('library', device, 32, 50))}"
              " (1 is reading the loss)")  # fmt: skip


def count_syncs(variant) -> int:
    """Synchronising CUDA calls during one step, by torch's sync debug mode.

    With Pyro's validation off, as `pyro-worldmodel train` trains: with it on,
    each check of the inputs' values is a sync.
    """
    import warnings

    variant.step()
    with warnings.catch_warnings(record=True) as record, pyro.validation_enabled(False):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            variant.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


def _line(x, y):
    A = torch.stack([x, torch.ones_like(x)], 1)
    sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    fit = A @ sol
    ss_res, ss_tot = ((y - fit) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    return sol[0].item(), sol[1].item(), (1 - ss_res / ss_tot).item() if ss_tot > 0 else 1.0


if __name__ == "__main__":
    main()
