"""Declarative specs: every part of a world model and its inference, named.

A spec is a dict (or :class:`Spec`, or a YAML file) such as::

    latent_dim: 16
    init:       {name: standard_normal}
    transition: {name: gaussian_mlp, hidden: [64, 64]}
    emission:   {name: gaussian_mlp}
    policy:     {name: auto}
    guide:      {name: filter, rnn_dim: 64}
    elbo:       {name: TraceMeanField_ELBO, num_particles: 1}
    optim:      {name: ClippedAdam, lr: 0.001}
    train:      {num_steps: 1000, batch_size: 32}
    reward:       {name: gaussian}        # optional: p(r_t | z_t, a_t)
    continuation: {name: bernoulli}       # optional: p(c_t | z_t)
    planner:      {name: cem, horizon: 12}  # optional: how to act (planning.py)

Each ``name`` resolves through :data:`REGISTRY`; :func:`register` adds a
user's class under a name. The sizes a part needs from the data
(``latent_dim``, ``obs_dim``, ``action_dim``, ``action_space``) are filled in
by :func:`build`; a spec names only the choices. A registered class keeps
each constructor argument as an attribute of the same name, which is how
:func:`spec_of` reads a spec back from an object.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyro
import pyro.infer
import pyro.optim
from torch import nn

from .components import (
    BernoulliContinue,
    BernoulliEmission,
    CategoricalPolicy,
    GatedTransition,
    GaussianMLPEmission,
    GaussianMLPTransition,
    GaussianReward,
    LearnedGaussianInit,
    LinearGaussianEmission,
    LinearGaussianPolicy,
    LinearGaussianTransition,
    NormalPolicy,
    RSSMTransition,
    StandardNormalInit,
    StudentTEmission,
    StudentTMLPTransition,
    TanhNormalPolicy,
)
from .elbos import (
    FreeNats_ELBO,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    TraceMeanField_ELBO,
)
from .guides import FilterGuide, IAFFilterGuide, MeanFieldGuide, SmoothingGuide
from .inference import MAX_PLATE_NESTING, fit
from .model import WorldModel
from .planning import PLANNERS
from .spaces import ActionSpace

# Optional parts: absent (None) unless the spec names them.
OPTIONAL = ("reward", "continuation", "planner")
SLOTS = ("init", "transition", "emission", "policy", "guide", "elbo", "optim", *OPTIONAL)
# Filled in by build() from the data and the other parts, never written in a spec.
_SUPPLIED = {"latent_dim", "obs_dim", "action_dim", "action_space", "name", "self"}

REGISTRY: dict[str, dict[str, Callable]] = {slot: {} for slot in SLOTS}


def register(slot: str, name: str | None = None):
    """Class decorator: make ``cls`` available in specs as ``{name: ...}`` in ``slot``.

    ::

        @register("transition", "my_transition")
        class MyTransition(nn.Module):
            def __init__(self, latent_dim, action_dim, width=32): ...
    """
    if slot not in REGISTRY:
        raise ValueError(f"slot: expected one of {list(SLOTS)}, got {slot!r}")

    def add(cls):
        key = name or cls.__name__
        if key in REGISTRY[slot] and REGISTRY[slot][key] is not cls:
            raise ValueError(
                f"name: {key!r} is already registered for {slot} as {REGISTRY[slot][key].__name__}"
            )
        REGISTRY[slot][key] = cls
        return cls

    return add


def _auto_policy(latent_dim: int, action_space: ActionSpace, hidden=(64,)):
    """Normal for box actions, Categorical for discrete ones."""
    cls = NormalPolicy if action_space.kind == "box" else CategoricalPolicy
    return cls(latent_dim, action_space, hidden)


for _slot, _name, _cls in (
    ("init", "standard_normal", StandardNormalInit),
    ("init", "learned_gaussian", LearnedGaussianInit),
    ("transition", "gaussian_mlp", GaussianMLPTransition),
    ("transition", "linear_gaussian", LinearGaussianTransition),
    ("transition", "gated", GatedTransition),
    ("transition", "rssm", RSSMTransition),
    ("transition", "student_t", StudentTMLPTransition),
    ("emission", "gaussian_mlp", GaussianMLPEmission),
    ("emission", "linear_gaussian", LinearGaussianEmission),
    ("emission", "student_t", StudentTEmission),
    ("emission", "bernoulli", BernoulliEmission),
    ("policy", "auto", _auto_policy),
    ("policy", "normal", NormalPolicy),
    ("policy", "categorical", CategoricalPolicy),
    ("policy", "linear_gaussian", LinearGaussianPolicy),
    ("policy", "tanh_normal", TanhNormalPolicy),
    ("guide", "filter", FilterGuide),
    ("guide", "smoothing", SmoothingGuide),
    ("guide", "mean_field", MeanFieldGuide),
    ("guide", "iaf_filter", IAFFilterGuide),
    ("reward", "gaussian", GaussianReward),
    ("continuation", "bernoulli", BernoulliContinue),
    *(("planner", _name, _cls) for _name, _cls in PLANNERS.items()),
):
    register(_slot, _name)(_cls)
# TraceMeanField_ELBO is Pyro's with its Monte Carlo fallback made loud; the
# world-model objectives and a Jit mean-field ELBO that compiles once per shape (elbos.py).
for _cls in (TraceMeanField_ELBO, JitTraceMeanField_ELBO, KLAnnealing_ELBO, FreeNats_ELBO, KLBalancing_ELBO):
    register("elbo", _cls.__name__)(_cls)
for _name in (
    "Trace_ELBO",
    "TraceGraph_ELBO",
    "RenyiELBO",
    "TraceTailAdaptive_ELBO",
    "JitTrace_ELBO",
    "JitTraceGraph_ELBO",
):
    register("elbo", _name)(getattr(pyro.infer, _name))
for _name in ("ClippedAdam", "Adam", "SGD", "RMSprop"):
    register("optim", _name)(getattr(pyro.optim, _name))


@dataclass
class Spec:
    """Every choice of a world model, its guide and its training, by name."""

    latent_dim: int = 16
    init: dict = field(default_factory=lambda: {"name": "standard_normal"})
    transition: dict = field(default_factory=lambda: {"name": "gaussian_mlp"})
    emission: dict = field(default_factory=lambda: {"name": "gaussian_mlp"})
    policy: dict = field(default_factory=lambda: {"name": "auto"})
    guide: dict = field(default_factory=lambda: {"name": "filter"})
    elbo: dict = field(default_factory=lambda: {"name": "TraceMeanField_ELBO"})
    optim: dict = field(default_factory=lambda: {"name": "ClippedAdam", "lr": 1e-3})
    train: dict = field(default_factory=dict)
    reward: dict | None = None
    continuation: dict | None = None
    planner: dict | None = None

    @classmethod
    def from_dict(cls, spec: dict) -> Spec:
        """A spec from a plain dict; unknown keys are refused."""
        if isinstance(spec, Spec):
            return spec
        if not isinstance(spec, dict):
            raise ValueError(f"spec: expected a dict or a Spec, got {type(spec).__name__}")
        known = [f.name for f in fields(cls)]
        for key in spec:
            if key not in known:
                raise ValueError(f"spec: unknown key {key!r}{_closest(key, known)}; expected some of {known}")
        out = cls(**{k: _plain(v) for k, v in spec.items()})
        out.check()
        return out

    def to_dict(self) -> dict:
        """Every part; an optional part that is absent is left out."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in fields(self)
            if not (f.name in OPTIONAL and getattr(self, f.name) is None)
        }

    @classmethod
    def from_yaml(cls, text_or_path) -> Spec:
        """From YAML text or a ``.yaml`` file; read with ``yaml.safe_load``."""
        import yaml

        text = str(text_or_path)
        if "\n" not in text and Path(text).suffix in (".yaml", ".yml"):
            text = Path(text).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        return cls.from_dict(data or {})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)

    def check(self) -> None:
        """Every name is registered and every keyword is accepted; raises ``ValueError``."""
        if not isinstance(self.latent_dim, int) or isinstance(self.latent_dim, bool) or self.latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive int, got {self.latent_dim!r}")
        for slot in SLOTS:
            part = getattr(self, slot)
            if part is None and slot in OPTIONAL:
                continue
            if not isinstance(part, dict) or "name" not in part:
                raise ValueError(f"{slot}: expected a dict with a 'name', got {part!r}")
            _check_kwargs(slot, resolve(slot, part["name"]), _kwargs(part))
        _check_kwargs(
            "train", fit, self.train, skip=("model", "guide", "obs", "actions", "mask", "elbo", "optim")
        )

    def with_overrides(self, overrides: dict[str, object]) -> Spec:
        """A copy with dotted keys set, e.g. ``{"transition.hidden": [128, 128]}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            *path, last = key.split(".")
            node = data
            for part in path:
                if node is data and part in OPTIONAL and data.get(part) is None:  # adding an absent part
                    data[part] = {}
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(
                        f"--set {key}: {part!r} is not a part of the spec; expected one of"
                        f" {list(data) + [k for k in OPTIONAL if k not in data]}"
                    )
                node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {'.'.join(path)} is not a dict")
            node[last] = value
        return Spec.from_dict(data)


def resolve(slot: str, name: str) -> Callable:
    """The class registered under ``name`` in ``slot``; the error lists the choices."""
    choices = REGISTRY[slot]
    if name not in choices:
        raise ValueError(
            f"{slot}.name: unknown {name!r}{_closest(name, list(choices))}; registered: {sorted(choices)}"
        )
    return choices[name]


@dataclass
class Built:
    """What :func:`build` returns: everything :func:`~pyro_worldmodel.fit` takes."""

    model: WorldModel
    guide: nn.Module
    elbo: pyro.infer.ELBO
    optim: pyro.optim.PyroOptim
    train: dict
    spec: Spec
    planner: object | None = None


def build(spec, obs_dim: int, action_space: ActionSpace) -> Built:
    """Model, guide, ELBO and optimiser from a spec, checked before anything is built.

    :param spec: a dict, a :class:`Spec`, or YAML text / a ``.yaml`` path.
    :param obs_dim: X, from the data.
    :param action_space: the data's :class:`ActionSpace`.
    """
    if isinstance(spec, (str, Path)):
        spec = Spec.from_yaml(spec)
    spec = Spec.from_dict(spec)
    Z = spec.latent_dim
    policy_cls = resolve("policy", spec.policy["name"])
    _check_policy(policy_cls, spec.policy["name"], action_space)
    supplied = {
        "latent_dim": Z,
        "obs_dim": obs_dim,
        "action_space": action_space,
        "action_dim": action_space.feature_dim,
    }
    parts = {slot: _make(slot, spec, supplied) for slot in ("init", "transition")}
    # The emission and the policy read [h_t, z_t] when the transition is recurrent.
    readers = {**supplied, "latent_dim": Z + getattr(parts["transition"], "deter_dim", 0)}
    parts.update({slot: _make(slot, spec, readers) for slot in ("emission", "policy")})
    parts.update(
        {slot: _make(slot, spec, readers) for slot in ("reward", "continuation") if getattr(spec, slot)}
    )
    model = WorldModel(**parts)  # each part, model and guide gets a unique param-store name
    guide = _make("guide", spec, supplied)
    elbo_kwargs = {"max_plate_nesting": MAX_PLATE_NESTING, **_kwargs(spec.elbo)}
    elbo = resolve("elbo", spec.elbo["name"])(**elbo_kwargs)
    optim = resolve("optim", spec.optim["name"])(_kwargs(spec.optim))
    planner = _make("planner", spec, readers) if spec.planner else None
    return Built(model, guide, elbo, optim, dict(spec.train), spec, planner)


def spec_of(
    model: WorldModel, guide: nn.Module, elbo=None, optim=None, train: dict | None = None, planner=None
) -> Spec:
    """The spec that :func:`build` turns back into an equal model and guide."""
    out = Spec(latent_dim=model.latent_dim, train=dict(train or {}))
    for slot in ("init", "transition", "emission", "policy"):
        setattr(out, slot, _part_spec(slot, getattr(model, slot)))
    for slot in ("reward", "continuation"):
        if getattr(model, slot, None) is not None:
            setattr(out, slot, _part_spec(slot, getattr(model, slot)))
    if planner is not None:
        out.planner = _part_spec("planner", planner)
    out.guide = _part_spec("guide", guide)
    if elbo is not None:
        out.elbo = _part_spec("elbo", elbo)
        out.elbo.pop("max_plate_nesting", None)
    if optim is not None:
        # pyro.optim.Adam & co. are factories of PyroOptim; the torch class names them.
        name = optim.pt_optim_constructor.__name__
        if name not in REGISTRY["optim"]:
            raise ValueError(f"optim: {name} is not registered; use @register('optim', name)")
        out.optim = {"name": name, **_plain(optim.pt_optim_args)}
    return out


# ---------------------------------------------------------------- helpers


def _make(slot, spec, supplied):
    part = getattr(spec, slot)
    cls = resolve(slot, part["name"])
    params = inspect.signature(cls).parameters
    given = {k: v for k, v in supplied.items() if k in params}
    try:
        return cls(**given, **_kwargs(part))
    except ValueError as e:
        raise ValueError(f"{slot} ({part['name']}): {e}") from None


def _check_policy(cls, name, action_space):
    kinds = {
        NormalPolicy: "box",
        LinearGaussianPolicy: "box",
        TanhNormalPolicy: "box",
        CategoricalPolicy: "discrete",
    }
    kind = kinds.get(cls)
    if kind is not None and kind != action_space.kind:
        raise ValueError(
            f"policy.name: {name!r} is for {kind} actions, but the data's actions are {action_space};"
            f" use 'auto' or {'normal' if action_space.kind == 'box' else 'categorical'}"
        )


def _part_spec(slot, obj) -> dict:
    cls = type(obj)
    name = _registered_name(slot, cls)
    out = {"name": name}
    for key, param in inspect.signature(cls).parameters.items():
        if key in _SUPPLIED or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, key):
            if slot == "elbo":  # Pyro's ELBOs keep most, not all, of their arguments
                continue
            raise ValueError(
                f"{slot}: {cls.__name__} keeps no attribute {key!r} for its argument of that name,"
                " so its spec cannot be read back"
            )
        value = _plain(getattr(obj, key))
        if param.default is inspect.Parameter.empty or value != _plain(param.default):
            out[key] = value
    return out


# Classes read back under the name of the registered class that computes the same thing.
_ALIASES = {pyro.infer.TraceMeanField_ELBO: "TraceMeanField_ELBO"}


def _registered_name(slot, cls) -> str:
    for name, registered in REGISTRY[slot].items():
        if registered is cls:
            return name
    if cls in _ALIASES:
        return _ALIASES[cls]
    raise ValueError(f"{slot}: {cls.__name__} is not registered; use @register({slot!r}, name)")


def _check_kwargs(slot, cls, kwargs, skip=()):
    if slot == "optim":  # a Pyro optimiser takes one dict, checked by torch when it is built
        return
    params = inspect.signature(cls).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k in params if k not in _SUPPLIED and k not in skip]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(
                f"{slot}.{key}: {getattr(cls, '__name__', cls)} takes no keyword {key!r}"
                f"{_closest(key, accepted)}; it accepts {accepted}"
            )


def _kwargs(part: dict) -> dict:
    return {k: _plain(v) for k, v in part.items() if k != "name"}


def _closest(word, choices) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _plain(value):
    """Tuples as lists, so that a spec survives YAML unchanged."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
