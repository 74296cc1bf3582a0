"""Held-out monitoring for :func:`~pyro_worldmodel.fit`: the bound on data not trained on,
on fixed draws, beside the same bound on a fixed subset of the training data."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state

from ..spaces import check_int
from . import batched
from .elbos import TraceEnum_ELBO
from .terms import elbo_terms, iwae_log_likelihood

# The validation draws are the same at every check, whatever the training has drawn:
# the curve then moves only with the parameters.
VALIDATION_SEED = 20_261_201


@contextmanager
def isolated_rng(seed: int):
    """Run the block from ``seed`` (Python, NumPy and torch, as ``pyro.set_rng_seed``) and leave
    the random state as it was, CUDA's included."""
    state = get_rng_state()  # Python, NumPy and torch's CPU generator
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def set_training_mode(training: bool, *parts) -> None:
    """``part.train(training)`` for each part that is a module (a guide may be a plain function)."""
    for part in parts:
        if isinstance(part, torch.nn.Module):
            part.train(training)


def as_sequences(name: str, data) -> tuple:
    """``(obs, actions, mask)`` from a tuple ``(obs, actions[, mask])`` or a dict with those keys."""
    if isinstance(data, dict):
        unknown = set(data) - {"obs", "actions", "mask"}
        if unknown or not {"obs", "actions"} <= set(data):
            raise ValueError(
                f"{name}: expected a dict with keys obs, actions and optionally mask, got keys {sorted(data)}"
            )
        return data["obs"], data["actions"], data.get("mask")
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return (*data, None)[:3]
    raise ValueError(
        f"{name}: expected (obs, actions), (obs, actions, mask) or a dict of them, got {type(data).__name__}"
        + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
    )


def bound_per_step(
    model, guide, obs, actions, mask, *, num_particles: int, seed: int = VALIDATION_SEED
) -> float:
    """The ELBO of the observations and actions in nats per observed timestep, averaged over
    ``num_particles`` draws that are the same at every call (the global RNG is left as it was).

    The batched path computes it where it applies; otherwise Pyro's traces
    (:func:`~pyro_worldmodel.elbo_terms`). A Bayesian transition's weights are drawn from their
    posterior, without their KL, as for any data not trained on.
    """
    with torch.no_grad(), isolated_rng(seed):
        why = batched.supports(model.model, guide, (obs, actions, mask), {}, vectorize_particles=False)
        if why is not None:
            return elbo_terms(model, guide, obs, actions, mask, num_particles=num_particles).elbo
        total = sum(
            float(batched.heldout_loss(model, guide, obs, actions, mask)) for _ in range(num_particles)
        )
        return -total / (num_particles * float(mask.sum()))


def iwae_per_step(
    model, guide, obs, actions, mask, *, num_particles: int, seed: int = VALIDATION_SEED
) -> float:
    """IWAE-``num_particles`` in nats per observed timestep, on fixed draws."""
    with torch.no_grad(), isolated_rng(seed):
        iwae = iwae_log_likelihood(model, guide, obs, actions, mask, num_particles=num_particles)
    return float(iwae.sum() / mask.sum())


class Monitor:
    """What :func:`~pyro_worldmodel.fit` measures every ``every`` steps: the bound on the
    held-out sequences and on a fixed subset of as many training sequences (at most 256),
    the best held-out value so far, and whether ``patience`` checks have passed without it
    improving.

    With ``exact`` (training by :class:`~pyro_worldmodel.infer.TraceEnum_ELBO`, which trains
    no guide), ``val_elbo`` and ``train_elbo`` are the exact log-likelihood per observed
    timestep, summed out by enumeration, not a bound through the untrained guide."""

    def __init__(self, model, guide, val, train, *, every, particles, iwae, patience, exact=False):
        self.exact = exact
        self.every = check_int("val_every", every, 1)
        self.particles = check_int("val_particles", particles, 1)
        self.iwae = check_int("val_iwae", iwae, 0)
        if patience is not None:
            check_int("patience", patience, 1)
        self.patience = patience
        self.model, self.guide = model, guide
        self.val = val
        obs, actions, mask = train
        n = min(obs.shape[0], max(val[0].shape[0], 1), 256)
        pick = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(VALIDATION_SEED))[:n]
        pick = pick.to(obs.device)
        T = int(mask[pick].sum(1).max())
        self.train = (obs[pick, :T], actions[pick, :T], mask[pick, :T])
        self.best_value = -math.inf
        self.best_step: int | None = None
        self.best_state: dict | None = None
        self.since_best = 0

    def due(self, step: int, last: int) -> bool:
        """Whether to measure after ``step`` updates (of ``last``)."""
        return step % self.every == 0 or step == last

    def measure(self, step: int) -> dict:
        """The record of one check; remembers the parameters when the held-out bound is the best so far."""
        record = {"step": step}
        modes = [getattr(part, "training", None) for part in (self.model, self.guide)]
        set_training_mode(False, self.model, self.guide)  # measured as used: without training-time noise
        try:
            for name, data in (("train", self.train), ("val", self.val)):
                if self.exact:
                    with torch.no_grad():
                        exact = TraceEnum_ELBO().log_likelihood(self.model, *data)
                    record[f"{name}_elbo"] = float(exact.sum() / data[2].sum())
                    continue
                record[f"{name}_elbo"] = bound_per_step(
                    self.model, self.guide, *data, num_particles=self.particles
                )
                if self.iwae:
                    record[f"{name}_iwae"] = iwae_per_step(
                        self.model, self.guide, *data, num_particles=self.iwae
                    )
        finally:
            for part, mode in zip((self.model, self.guide), modes):
                set_training_mode(bool(mode), part)
        value = record["val_elbo"]
        if math.isfinite(value) and value > self.best_value:
            self.best_value, self.best_step, self.since_best = value, step, 0
            self.best_state = {
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "guide": {k: v.detach().clone() for k, v in self.guide.state_dict().items()},
            }
        else:
            self.since_best += 1
        return record

    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def restore_best(self) -> None:
        """Load the best parameters back into the model and the guide."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state["model"])
            self.guide.load_state_dict(self.best_state["guide"])

    def checkpoint_entry(self) -> dict | None:
        """What a checkpoint keeps of the best: its step, value and parameters."""
        if self.best_state is None:
            return None
        return {
            "step": self.best_step,
            "val_elbo": self.best_value,
            **self.best_state,
            "since": self.since_best,
        }

    def load_entry(self, entry: dict | None) -> None:
        if entry:
            self.best_step, self.best_value = int(entry["step"]), float(entry["val_elbo"])
            self.best_state = {"model": entry["model"], "guide": entry["guide"]}
            self.since_best = int(entry.get("since", 0))
