"""Declarative specs: every part of a world model and its inference, named.

A spec is a dict (or :class:`Spec`, or a YAML file) such as::

    latent_dim: 8
    init:       {name: standard_normal}
    transition: {name: gaussian_mlp, hidden: [64, 64]}
    emission:   {name: gaussian_mlp}
    policy:     {name: auto}
    guide:      {name: filter, rnn_dim: 64}
    encoder:    {name: identity}
    elbo:       {name: TraceMeanField_ELBO, num_particles: 1}
    optim:      {name: ClippedAdam, lr: 1e-3, clip_norm: 10.0}
    train:      {num_steps: 1000, batch_size: 32}
    reward:       {name: gaussian}        # optional: p(r_t | z_t, a_t)
    continuation: {name: bernoulli}       # optional: p(c_t | z_t)
    planner:      {name: cem, horizon: 12}  # optional: how to act (act/planners.py)

Each ``name`` resolves through :data:`REGISTRY`; :func:`register` adds a
user's class under a name. The sizes a part needs from the data
(``latent_dim``, ``obs_dim``, ``action_dim``, ``action_space``) are filled in
by :func:`build`; a spec names only the choices. A registered class keeps
each constructor argument as an attribute of the same name, which is how
:func:`spec_of` reads a spec back from an object.

Every value is converted to the type its constructor declares and checked
(:meth:`Spec.check`) before anything is built, so a :class:`Spec` holds typed
values; YAML is read as YAML 1.2 reads numbers (:func:`load_yaml`), so
``1e-4`` is a float.

``Spec()`` is the one default: the spec of the default job. Named presets
(``pyro_worldmodel/presets.yaml``) are changes to it, merged over it left to
right: ``Spec.preset("planet", "smoke")``; :meth:`Spec.presets` lists them.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import importlib.resources
import inspect
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import pyro
import pyro.infer
import pyro.optim
import torch
import yaml
from torch import nn
from torch.overrides import TorchFunctionMode

from .act.planners import PLANNERS
from .infer.elbos import (
    FreeNats_ELBO,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    KLBalancing_ELBO,
    LatentOvershooting_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from .infer.training import MAX_PLATE_NESTING, fit
from .io import physical_memory
from .model.components import (
    BayesianMLPTransition,
    BernoulliContinue,
    BernoulliEmission,
    CategoricalInit,
    CategoricalMLPTransition,
    CategoricalPolicy,
    CategoricalRSSMTransition,
    ConvEncoder,
    ConvGaussianEmission,
    ConvLogisticEmission,
    EnsembleTransition,
    GatedTransition,
    GaussianMLPEmission,
    GaussianMLPTransition,
    GaussianReward,
    IdentityEncoder,
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
from .model.components.categorical import check_guide_state, latent_classes_of
from .model.guides import CategoricalFilterGuide, FilterGuide, IAFFilterGuide, MeanFieldGuide, SmoothingGuide
from .model.world_model import WorldModel
from .spaces import ActionSpace

# Optional parts: absent (None) unless the spec names them.
OPTIONAL = ("reward", "continuation", "planner")
SLOTS = ("init", "transition", "emission", "policy", "guide", "encoder", "elbo", "optim", *OPTIONAL)
# Filled in by build() from the data and the other parts, never written in a spec.
SUPPLIED = {
    "latent_dim",
    "latent_classes",
    "obs_dim",
    "image_shape",
    "action_dim",
    "action_space",
    "encoder",
    "name",
    "self",
}
# fit's arguments that are data or objects, not settings a spec can hold.
_FIT_OBJECTS = ("model", "guide", "obs", "actions", "mask", "elbo", "optim", "val")

#: The largest size a spec may ask for: latent_dim, every hidden width and
#: every other argument that sizes an allocation (see :func:`_is_size`).
MAX_SIZE = 2**16

REGISTRY: dict[str, dict[str, Callable]] = {slot: {} for slot in SLOTS}


def register(slot: str, name: str | None = None):
    """Class decorator: make ``cls`` available in specs as ``{name: ...}`` in ``slot``.

    ::

        @register("transition", "my_transition")
        class MyTransition(nn.Module):
            def __init__(self, latent_dim, action_dim, width=32): ...

    A spec's values for ``cls`` are converted to the types its constructor's
    annotations declare (or, without one, to the type of the default).
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


def _auto_policy(latent_dim: int, action_space: ActionSpace, hidden: Sequence[int] = (64,)):
    """Normal for box actions, Categorical for discrete ones."""
    cls = NormalPolicy if action_space.kind == "box" else CategoricalPolicy
    return cls(latent_dim, action_space, hidden)


for _slot, _name, _cls in (
    ("init", "standard_normal", StandardNormalInit),
    ("init", "learned_gaussian", LearnedGaussianInit),
    ("init", "categorical", CategoricalInit),
    ("transition", "categorical_mlp", CategoricalMLPTransition),
    ("transition", "categorical_rssm", CategoricalRSSMTransition),
    ("transition", "gaussian_mlp", GaussianMLPTransition),
    ("transition", "ensemble", EnsembleTransition),
    ("transition", "bayesian", BayesianMLPTransition),
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
    ("encoder", "identity", IdentityEncoder),
    ("encoder", "conv", ConvEncoder),
    ("emission", "conv_gaussian", ConvGaussianEmission),
    ("emission", "conv_logistic", ConvLogisticEmission),
    ("guide", "smoothing", SmoothingGuide),
    ("guide", "mean_field", MeanFieldGuide),
    ("guide", "iaf_filter", IAFFilterGuide),
    ("guide", "categorical_filter", CategoricalFilterGuide),
    ("reward", "gaussian", GaussianReward),
    ("continuation", "bernoulli", BernoulliContinue),
    *(("planner", _name, _cls) for _name, _cls in PLANNERS.items()),
):
    register(_slot, _name)(_cls)
# TraceMeanField_ELBO is Pyro's with its Monte Carlo fallback made loud; the
# world-model objectives and a Jit mean-field ELBO that compiles once per shape (elbos.py).
for _cls in (
    TraceMeanField_ELBO,
    JitTraceMeanField_ELBO,
    KLAnnealing_ELBO,
    FreeNats_ELBO,
    KLBalancing_ELBO,
    LatentOvershooting_ELBO,
    TraceEnum_ELBO,
):
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


# ---------------------------------------------------------------- YAML

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats: PyYAML reads YAML 1.1, whose floats need a dot, so that
# 1e-4 would be the string '1e-4'. Ints keep YAML 1.1's rules.
_YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# A number written as text, e.g. '1e-4' read by a YAML 1.1 reader.
_NUMBER_TEXT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
# A spec is a few dozen values a few levels deep; YAML aliases can make a
# short document expand to billions of values, or refer to itself.
_MAX_VALUES = 100_000
_MAX_DEPTH = 32
_MAX_FILE_BYTES = 16 * 2**20


def _with_yaml12_floats(cls):
    """``cls``, a loader or dumper class, resolving plain scalars to floats as YAML 1.2 does.

    The table is replaced on ``cls`` alone: PyYAML's own loaders are left as they are.
    """
    cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in cls.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_FLOAT_TAG, _YAML12_FLOAT, list("-+0123456789."))
    return cls


@_with_yaml12_floats
class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats."""


@_with_yaml12_floats
class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes what :class:`_Loader` would read as a float, e.g. the str '1e-4'."""


def load_yaml(text: str, what: str):
    """One YAML document, read safely, with YAML 1.2's floats (``1e-4``, ``1E5``, ``.5``, ``1.``).

    Only plain data is built: a ``!!python/...`` tag is refused, never run.

    :param text: the document.
    :param what: what the text is, e.g. a file's path or ``--set optim.lr``;
        every error names it.
    :raises ValueError: on text that is not YAML, with the problem and its
        line and column in one line; on a document of more than 100000 values
        or 32 levels (e.g. aliases that expand).
    """
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected YAML text, got {type(text).__name__}")
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: expected valid YAML, got {_yaml_problem(e)}") from None
    except RecursionError:
        raise ValueError(f"{what}: expected at most {_MAX_DEPTH} levels of nesting, got more") from None
    except Exception as e:
        # PyYAML's constructors raise bare ValueError, TypeError or AttributeError
        # on some explicit tags (!!int x, !!timestamp x) and on ints too long to convert.
        raise ValueError(f"{what}: expected valid YAML, got {type(e).__name__}: {_one_line(e)}") from None
    _check_extent(data, what)
    return data


def yaml_value(text: str, what: str):
    """One value, e.g. of ``--set optim.lr=1e-4``, read as :func:`load_yaml` reads a document.

    ``'1e-4'`` gives the float 1e-4, ``'[128, 128]'`` a list, ``'filter'`` a str,
    ``''`` None.

    :raises ValueError: naming ``what``, on text that is not YAML.
    """
    return load_yaml(text, what)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({_one_line(e.context)})" if e.context else ""
        return f"{_one_line(e.problem or type(e).__name__)}{where}{context}"
    return _one_line(e)


def _one_line(obj) -> str:
    text = " ".join(str(obj).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_extent(data, what: str) -> None:
    """Refuse data of more than ``_MAX_VALUES`` values or ``_MAX_DEPTH`` levels, counted as expanded."""
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            raise ValueError(
                f"{what}: expected at most {_MAX_VALUES} values, got more (YAML aliases that repeat a part?)"
            )
        if depth > _MAX_DEPTH:
            raise ValueError(f"{what}: expected at most {_MAX_DEPTH} levels of nesting, got more")
        if isinstance(node, dict):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in node)


# ---------------------------------------------------------------- specs


@dataclass
class Spec:
    """Every choice of a world model, its guide and its training, by name.

    ``Spec()`` is the default job's spec, and the base that every preset
    (:meth:`preset`) changes.
    """

    latent_dim: int = 8
    init: dict = field(default_factory=lambda: {"name": "standard_normal"})
    transition: dict = field(default_factory=lambda: {"name": "gaussian_mlp"})
    emission: dict = field(default_factory=lambda: {"name": "gaussian_mlp"})
    policy: dict = field(default_factory=lambda: {"name": "auto"})
    guide: dict = field(default_factory=lambda: {"name": "filter"})
    encoder: dict = field(default_factory=lambda: {"name": "identity"})
    elbo: dict = field(default_factory=lambda: {"name": "TraceMeanField_ELBO"})
    optim: dict = field(default_factory=lambda: {"name": "ClippedAdam", "lr": 1e-3, "clip_norm": 10.0})
    train: dict = field(default_factory=dict)
    reward: dict | None = None
    continuation: dict | None = None
    planner: dict | None = None

    @classmethod
    def from_dict(cls, spec: dict) -> Spec:
        """A checked spec (:meth:`check`) from a plain dict, or a checked copy of a Spec;
        unknown keys are refused."""
        if isinstance(spec, Spec):
            return cls.from_dict(spec.to_dict())
        if not isinstance(spec, dict):
            raise ValueError(f"spec: expected a dict or a Spec, got {type(spec).__name__}")
        known = [f.name for f in fields(cls)]
        for key in spec:
            if key not in known:
                raise ValueError(
                    f"spec: unknown key {_show(key)}{_closest(key, known)}; expected some of {known}"
                )
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
        """From YAML text, or from a file: a path object, or a str ending in ``.yaml`` / ``.yml``.

        Read by :func:`load_yaml`; an empty document is the default spec.
        """
        if isinstance(text_or_path, os.PathLike):
            return cls.from_file(text_or_path)
        text = str(text_or_path)
        if "\n" not in text and Path(text).suffix in (".yaml", ".yml"):
            return cls.from_file(text)
        return cls._from_text(text, "spec")

    @classmethod
    def from_file(cls, path) -> Spec:
        """From the YAML file at ``path``, whatever its suffix (``--config``).

        :raises ValueError: naming the path, for a directory or other non-file, a
            missing or unreadable file, one over 16 MiB, text that is not UTF-8
            or not YAML, or a document that is not a mapping; and as :meth:`from_dict`.
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = f.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ValueError(f"{path}: expected a YAML spec file, got no such file") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: expected a YAML spec file, got a directory") from None
        except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
            raise ValueError(f"{path}: expected a readable YAML spec file, got {_one_line(e)}") from None
        if len(raw) > _MAX_FILE_BYTES:
            raise ValueError(f"{path}: expected a YAML spec file of at most 16 MiB, got a larger one")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: expected UTF-8 text, got the byte 0x{raw[e.start]:02x} at offset {e.start}"
            ) from None
        return cls._from_text(text, str(path))

    @classmethod
    def _from_text(cls, text: str, what: str) -> Spec:
        data = load_yaml(text, what)
        if data is None:  # an empty document
            data = {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{what}: expected a mapping of spec keys (latent_dim, transition, ...) at the top level,"
                f" got {type(data).__name__} {_show(data)}"
            )
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.dump(
            self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True
        )

    def check(self) -> None:
        """Check every name and value, and convert the values to their types, in place.

        Each part's keywords must be its constructor's (``train``'s are
        :func:`~pyro_worldmodel.fit`'s, ``optim``'s the torch optimiser's), and each value is
        converted to the type the constructor declares, or that of its default:
        an int where an int is expected (``3.0`` is 3, ``0.9`` is refused), a
        float from an int or from text such as ``'1e-4'``, NaN refused. Sizes
        (``latent_dim`` and every argument named ``*dim`` or ``*hidden``, ``candidates``,
        ``top_k``, ``num_particles``, ``num_iafs``, ``horizon``, a planner's ``batch_size``)
        are ints in [1, :data:`MAX_SIZE`]; learning rates, decays, momenta, training
        steps and ELBO particles are range-checked by name.

        :raises ValueError: naming the key, what was expected and what was given.
        """
        self.latent_dim = _converted("latent_dim", self.latent_dim, int, _SIZE_RANGE)
        for slot in SLOTS:
            part = getattr(self, slot)
            if part is None and slot in OPTIONAL:
                continue
            if not isinstance(part, dict) or "name" not in part:
                raise ValueError(f"{slot}: expected a dict with a 'name', got {_show(part)}")
            name = part["name"]
            if not isinstance(name, str):
                raise ValueError(f"{slot}.name: expected a str, got {_show(name)}")
            cls = resolve(slot, name)
            if slot == "optim":
                kwargs = _optim_kwargs(cls, _kwargs(part))
            else:
                kwargs = _typed_kwargs(slot, cls, _kwargs(part))
            setattr(self, slot, {"name": name, **kwargs})
        train = {} if self.train is None else self.train  # `train:` with nothing under it
        if not isinstance(train, dict):
            raise ValueError(f"train: expected a dict of fit's keywords, got {_show(train)}")
        self.train = _typed_kwargs("train", fit, train, skip=_FIT_OBJECTS)

    def with_overrides(self, overrides: dict[str, object]) -> Spec:
        """A copy with dotted keys set, e.g. ``{"transition.hidden": [128, 128]}``.

        A value given as text is not read: pass ``--set`` values through :func:`yaml_value`.
        """
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
            node[last] = _plain(value)  # a copy: a later key must not write into the caller's value
        return Spec.from_dict(data)

    @classmethod
    def preset(cls, *names: str) -> Spec:
        """``Spec()`` with the named presets merged over it, left to right; no names: ``Spec()``.

        ``Spec.preset("planet", "smoke")`` is PlaNet's transition at smoke-test sizes.
        Each preset is a change to a spec (``pyro_worldmodel/presets.yaml``), merged
        into the spec so far: a part that names a different class (``name``) replaces
        the part there, whose keywords were that class's; any other mapping is merged
        key by key, so ``smoke``'s widths refine whichever transition is there; any
        other value replaces. So order matters where two presets set the same thing:
        the later one wins.

        :raises ValueError: as :meth:`with_presets`.
        """
        return cls().with_presets(*names)

    def with_presets(self, *names: str) -> Spec:
        """A copy with the named presets merged over it, left to right, as :meth:`preset` merges
        them over ``Spec()``: e.g. a spec file's parts at ``smoke``'s sizes.

        :raises ValueError: for a name that is not a preset, listing the presets and the
            closest; for presets whose merge is not a valid spec, naming them and the key.
        """
        table = _preset_table()
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise ValueError(
                    f"names[{i}]: expected a preset name (str), got {_show(name)}; pass each name as its"
                    " own argument"
                )
            if name not in table:
                raise ValueError(
                    f"names[{i}]: unknown preset {_show(name)}{_closest(name, table)};"
                    f" expected one of {list(table)}"
                )
        data = Spec.from_dict(self).to_dict()  # a bad spec is refused as itself, before any merge
        for name in names:
            data = _merged(data, table[name][1])
        try:
            return Spec.from_dict(data)
        except ValueError as e:
            raise ValueError(f"presets {list(names)}: {e}") from None

    @classmethod
    def presets(cls) -> dict[str, str]:
        """Each preset's name and its one-line description, in the order of ``presets.yaml``."""
        return {name: description for name, (description, _) in _preset_table().items()}


# ---------------------------------------------------------------- presets

PRESETS_FILE = "presets.yaml"


@functools.cache
def _preset_table() -> dict[str, tuple[str, dict]]:
    """``presets.yaml``, read once; read as package data, so that an installed wheel finds it."""
    source = importlib.resources.files(__package__).joinpath(PRESETS_FILE)
    return _parse_presets(source.read_text(encoding="utf-8"), f"{__package__}/{PRESETS_FILE}")


def _parse_presets(text: str, what: str) -> dict[str, tuple[str, dict]]:
    """``{name: (description, delta)}`` from a presets document; ``what`` names it in every error.

    Each entry is ``name: {description: one line, delta: {spec key: value, ...}}``;
    the deltas' values are checked when a preset is used, as a spec's are.
    """
    data = load_yaml(text, what)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{what}: expected a mapping of preset names to presets, got {_show(data)}")
    known = [f.name for f in fields(Spec)]
    out = {}
    for name, entry in data.items():
        if not isinstance(name, str):
            raise ValueError(f"{what}: expected preset names (str), got {_show(name)}")
        if not isinstance(entry, dict) or set(entry) != {"description", "delta"}:
            raise ValueError(
                f"{what}: {name}: expected a mapping with the keys 'description' and 'delta',"
                f" got {_show(entry)}"
            )
        description, delta = entry["description"], entry["delta"]
        if not isinstance(description, str) or not description.strip() or "\n" in description.strip():
            raise ValueError(
                f"{what}: {name}.description: expected one line of text, got {_show(description)}"
            )
        delta = {} if delta is None else delta  # `delta:` with nothing under it changes nothing
        if not isinstance(delta, dict):
            raise ValueError(f"{what}: {name}.delta: expected a mapping of spec keys, got {_show(delta)}")
        for key in delta:
            if key not in known:
                raise ValueError(
                    f"{what}: {name}.delta: unknown key {_show(key)}{_closest(key, known)};"
                    f" expected some of {known}"
                )
        out[name] = (description.strip(), delta)
    return out


def _merged(base, delta):
    """A copy of ``delta`` merged over ``base``, as :meth:`Spec.preset` describes."""
    if not isinstance(base, dict) or not isinstance(delta, dict):
        return _plain(delta)
    if "name" in delta and delta["name"] != base.get("name"):
        return _plain(delta)  # another class: the keywords given for the old one mean nothing to it
    out = dict(base)
    for key, value in delta.items():
        out[key] = _merged(base[key], value) if key in base else _plain(value)
    return out


def resolve(slot: str, name: str) -> Callable:
    """The class registered under ``name`` in ``slot``; the error lists the choices."""
    choices = REGISTRY[slot]
    if not isinstance(name, str) or name not in choices:
        raise ValueError(
            f"{slot}.name: unknown {_show(name)}{_closest(name, list(choices))}; registered: {sorted(choices)}"
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


def build(spec, obs_dim: int, action_space: ActionSpace, image_shape=None) -> Built:
    """Model, guide, ELBO and optimiser from a spec, checked before anything is built.

    The spec is checked (:meth:`Spec.check`), then its parts are built on
    PyTorch's meta device, which allocates nothing, so that a bad argument
    fails and the parameters are counted first: a spec whose parameters, with
    their gradients and Adam's state, would not fit in this machine's memory
    is refused (:func:`count_parameters`).

    :param spec: a dict, a :class:`Spec`, or YAML text / a ``.yaml`` path.
    :param obs_dim: X, from the data.
    :param action_space: the data's :class:`ActionSpace`.
    :param image_shape: ``(C, H, W)`` of the frames a model of images reads (X = C·H·W),
        from the data (:attr:`Episodes.image_shape <pyro_worldmodel.data.Episodes.image_shape>`);
        None for vector observations.
    :raises ValueError: for a bad spec, or one that does not fit in memory.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = Spec.from_yaml(spec)
    spec = Spec.from_dict(spec)
    _check_policy(resolve("policy", spec.policy["name"]), spec.policy["name"], action_space)
    _check_memory(spec, _estimate(spec, obs_dim, action_space, image_shape))
    try:
        model, guide, planner = _make_all(spec, obs_dim, action_space, image_shape=image_shape)
    except Exception as e:
        if _is_out_of_memory(e):
            raise _out_of_memory(spec, e) from None
        raise
    elbo_kwargs = {"max_plate_nesting": MAX_PLATE_NESTING, **_kwargs(spec.elbo)}
    elbo = resolve("elbo", spec.elbo["name"])(**elbo_kwargs)
    optim = resolve("optim", spec.optim["name"])(_kwargs(spec.optim))
    return Built(model, guide, elbo, optim, dict(spec.train), spec, planner)


def count_parameters(spec, obs_dim: int, action_space: ActionSpace, image_shape=None) -> int | None:
    """The number of parameters :func:`build` would make for ``spec``: model, guide and planner.

    Counted on PyTorch's meta device, without allocating them; None where a
    part cannot be built there (e.g. a user's class that reads a tensor's values).

    :raises ValueError: for a bad spec, as :func:`build`.
    """
    spec = Spec.from_dict(Spec.from_yaml(spec) if isinstance(spec, (str, os.PathLike)) else spec)
    _check_policy(resolve("policy", spec.policy["name"]), spec.policy["name"], action_space)
    estimate = _estimate(spec, obs_dim, action_space, image_shape)
    return None if estimate is None else estimate[0]


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
    if getattr(guide, "encoder", None) is not None:
        out.encoder = _part_spec("encoder", guide.encoder)
    if elbo is not None:
        out.elbo = _part_spec("elbo", elbo)
        out.elbo.pop("max_plate_nesting", None)
    if optim is not None:
        # pyro.optim.Adam & co. are factories of PyroOptim; the torch class names them.
        name = optim.pt_optim_constructor.__name__
        if name not in REGISTRY["optim"]:
            raise ValueError(f"optim: {name} is not registered; use @register('optim', name)")
        out.optim = {"name": name, **_plain(optim.pt_optim_args)}
    return Spec.from_dict(out)  # typed as a spec read from YAML is, so the two compare equal


# ---------------------------------------------------------------- building


def _make(slot, spec, supplied):
    part = getattr(spec, slot)
    cls = resolve(slot, part["name"])
    params = inspect.signature(cls).parameters
    given = {k: v for k, v in supplied.items() if k in params}
    try:
        return cls(**given, **_kwargs(part))
    except ValueError as e:
        raise ValueError(f"{slot} ({part['name']}): {e}") from None


def _make_all(spec: Spec, obs_dim: int, action_space: ActionSpace, name: str | None = None, image_shape=None):
    """``(model, guide, planner)`` of a checked spec; ``name``, if given, names the model and the guide."""
    Z = spec.latent_dim
    supplied = {
        "latent_dim": Z,
        "obs_dim": obs_dim,
        "image_shape": image_shape,
        "action_space": action_space,
        "action_dim": action_space.feature_dim,
    }
    parts = {"init": _make("init", spec, supplied)}
    # A categorical state's classes are the init's setting; the transition and the guide get them.
    supplied["latent_classes"] = latent_classes_of(parts["init"])
    parts["transition"] = _make("transition", spec, supplied)
    # The emission and the policy read [h_t, z_t] when the transition is recurrent.
    readers = {**supplied, "latent_dim": Z + getattr(parts["transition"], "deter_dim", 0)}
    parts.update({slot: _make(slot, spec, readers) for slot in ("emission", "policy")})
    parts.update(
        {slot: _make(slot, spec, readers) for slot in ("reward", "continuation") if getattr(spec, slot)}
    )
    model = WorldModel(**parts, name=name)  # each model and guide gets a unique param-store name
    # The guide reads observations through the encoder (the identity for vectors).
    encoder = _make("encoder", spec, supplied)
    guide_supplied = {**supplied, "encoder": encoder, **({} if name is None else {"name": name})}
    guide = _make("guide", spec, guide_supplied)
    check_guide_state(model, guide)
    if hasattr(guide, "attach_globals"):
        guide.attach_globals(model)  # a Bayesian transition's weights are drawn by the guide
    planner = _make("planner", spec, readers) if spec.planner else None
    return model, guide, planner


# Factories that allocate by size; tensors made from data (torch.tensor,
# as_tensor) stay real, as constructors read them (Pyro's AutoRegressiveNN calls .item()).
_SIZED_FACTORIES = frozenset(
    {
        torch.empty,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.eye,
    }
)
_RANGES = frozenset({torch.arange, torch.linspace, torch.logspace})
# Elements: an allocation this small is made for real, as is what small
# tensors make (at most this squared, e.g. a mask from two index vectors).
_REAL_UP_TO = 1024


class _MetaAllocations(TorchFunctionMode):
    """Sized allocations of more than ``_REAL_UP_TO`` elements go to the meta device, which stores nothing.

    Small tensors are made for real because constructors read them (Pyro's
    AutoRegressiveNN slices by the values of ``torch.zeros(1)``), and because
    most operations on meta tensors load ``torch._dynamo`` the first time
    (about a second); an operation that mixes real and meta tensors is done on
    the meta device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is None and kwargs.get("out") is None:
            if func in _SIZED_FACTORIES:
                meta = func(*args, **{**kwargs, "device": "meta"})
                if meta.numel() > _REAL_UP_TO:
                    return meta
            elif func in _RANGES:
                shape = _range_shape(func, args, kwargs)
                if shape is not None and shape[0] > _REAL_UP_TO:
                    return torch.empty(shape[0], dtype=shape[1], device="meta")
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError):
            tensors = _tensors_in((args, kwargs))
            if not (any(t.is_meta for t in tensors) and any(not t.is_meta for t in tensors)):
                raise
            return func(*_on_meta(args), **_on_meta(kwargs))


def _range_shape(func, args, kwargs) -> tuple[int, torch.dtype] | None:
    """``(length, dtype)`` of ``torch.arange`` / ``linspace`` / ``logspace`` called with
    plain numbers, without calling it (on the meta device it loads ``torch._dynamo``)."""
    numbers = [*args, *(kwargs[k] for k in ("start", "end", "step", "steps") if k in kwargs)]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return None
    if func is torch.arange:
        if any(k in kwargs for k in ("start", "end", "step")) or not 1 <= len(args) <= 3:
            return None
        start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
        if step == 0:
            return None
        length = max(0, math.ceil((end - start) / step))
        integral = all(isinstance(x, int) for x in args)
        return length, kwargs.get("dtype") or (torch.int64 if integral else torch.get_default_dtype())
    steps = args[2] if len(args) > 2 else kwargs.get("steps")
    if not isinstance(steps, int):
        return None
    return steps, kwargs.get("dtype") or torch.get_default_dtype()


def _tensors_in(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors_in(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors_in(item)]
    return []


def _on_meta(tree):
    if isinstance(tree, torch.Tensor):
        return tree if tree.is_meta else tree.to("meta")
    if isinstance(tree, list):
        return [_on_meta(item) for item in tree]
    if isinstance(tree, tuple):
        return tuple(_on_meta(item) for item in tree)
    if isinstance(tree, dict):
        return {k: _on_meta(v) for k, v in tree.items()}
    return tree


def _estimate(
    spec: Spec, obs_dim: int, action_space: ActionSpace, image_shape=None
) -> tuple[int, int] | None:
    """``(parameters, bytes)`` that :func:`build` would allocate, the bytes counting each
    parameter four times (value, gradient, Adam's two moments) and each buffer once;
    None where a part cannot be built on the meta device.

    The parts are built for the count and dropped: under a fixed name (the
    param-store names of later models and guides are unchanged) and with the
    random number generator's state restored.
    """
    try:
        with torch.random.fork_rng(devices=[]), _MetaAllocations():
            model, guide, planner = _make_all(
                spec, obs_dim, action_space, name="_size_estimate", image_shape=image_shape
            )
    except ValueError:
        raise
    except Exception as e:
        if _is_out_of_memory(e):  # a part that allocates on a device of its own choosing
            raise _out_of_memory(spec, e) from None
        return None  # a part that needs real tensors to be built: not counted, not refused
    tensors = {}  # by id: a tensor shared by two parts is counted once
    for obj in (model, guide, planner):
        for module in _modules_of(obj):
            tensors.update({id(p): (p, 4) for p in module.parameters()})
            tensors.update({id(b): (b, 1) for b in module.buffers() if id(b) not in tensors})
    count = sum(t.numel() for t, copies in tensors.values() if copies == 4)
    size = sum(t.numel() * t.element_size() * copies for t, copies in tensors.values())
    return count, size


def _modules_of(obj) -> list[nn.Module]:
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    return [v for v in vars(obj).values() if isinstance(v, nn.Module)]  # e.g. CEMPlanner's critic


def _check_memory(spec: Spec, estimate: tuple[int, int] | None) -> None:
    memory = physical_memory()
    if estimate is None or memory is None or memory <= 0:
        return
    count, size = estimate
    if size > memory:
        raise ValueError(
            f"spec: expected parameters that fit in this machine's {_gib(memory)} of memory, got"
            f" {count:,} parameters, which need {_gib(size)} with their gradients and Adam's state"
            f" (16 bytes each); make latent_dim ({spec.latent_dim}) or the hidden widths smaller"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _out_of_memory(spec: Spec, e: BaseException) -> ValueError:
    return ValueError(
        f"spec: building its parts ran out of memory ({type(e).__name__}: {_one_line(e)});"
        f" make latent_dim ({spec.latent_dim}) or the hidden widths smaller"
    )


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "not enough memory")
    )


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
        if key in SUPPLIED or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
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


# ---------------------------------------------------------------- keywords and their types


def _check_kwargs(slot, cls, kwargs, skip=()):
    """Refuse a keyword that ``cls`` does not take (unless it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        k for k, p in params.items() if k not in SUPPLIED and k not in skip and p.kind != p.VAR_POSITIONAL
    ]
    for key in kwargs:
        if key == "latent_classes" and key in params:
            raise ValueError(
                f"{slot}.latent_classes: build gives {getattr(cls, '__name__', cls)} the init's classes;"
                f" set init.classes instead, got {slot}.latent_classes={_show(kwargs[key])}"
            )
        if key not in accepted:
            raise ValueError(
                f"{slot}.{key}: {getattr(cls, '__name__', cls)} takes no keyword {_show(key)}"
                f"{_closest(key, accepted)}; it accepts {accepted}"
            )


def typed_kwargs(slot: str, cls, kwargs: dict) -> dict:
    """The keyword arguments of a part of ``slot`` (e.g. an ELBO class), checked against
    ``cls``'s signature and converted to its parameters' types, as :meth:`Spec.check` does."""
    return _typed_kwargs(slot, cls, kwargs)


def _typed_kwargs(slot: str, cls, kwargs: dict, skip=(), rules=None) -> dict:
    """``kwargs`` checked against ``cls``'s signature and converted to its parameters' types."""
    for key in kwargs:
        if not isinstance(key, str):
            raise ValueError(f"{slot}: expected keyword names (str), got {_show(key)}")
    _check_kwargs(slot, cls, kwargs, skip)
    params = inspect.signature(cls).parameters
    for key, p in params.items():
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and key not in kwargs and key not in SUPPLIED and key not in skip:
            raise ValueError(
                f"{slot}.{key}: {getattr(cls, '__name__', cls)} needs a value for {key!r}, got none"
            )
    hints = _param_types(cls)
    out = {}
    for key, value in kwargs.items():
        tp, bounds = _rule(slot, cls, key) if rules is None else rules(key)
        out[key] = _converted(f"{slot}.{key}", value, hints.get(key, _ANY) if tp is None else tp, bounds)
    return out


def _optim_kwargs(factory, kwargs: dict) -> dict:
    """An optimiser's dict, checked against the torch optimiser that ``factory`` wraps.

    Pyro's optimisers are factories of ``PyroOptim(torch_class, optim_args)``;
    for a user's factory whose torch class cannot be found, only the
    learning rates, decays and momenta are checked, by name.
    """
    target = wrapped_optimizer(factory)
    rmsprop = target is not None and issubclass(target, torch.optim.RMSprop)

    def rules(key):
        if key == "alpha" and rmsprop:
            return float, _Range(0, 1, high_open=True)
        return _OPTIM_RULES.get(key, (None, None))

    if target is None:
        return _typed_kwargs("optim", _any_keywords, kwargs, rules=rules)
    return _typed_kwargs("optim", target, kwargs, skip=("params",), rules=rules)


def _any_keywords(**kwargs):
    """The signature of an optimiser whose keywords are unknown."""


def wrapped_optimizer(factory) -> type[torch.optim.Optimizer] | None:
    """The ``torch.optim.Optimizer`` subclass ``factory`` builds: itself, or the one
    its closure or the globals it names hold (as ``pyro.optim.Adam`` and
    ``pyro.optim.ClippedAdam`` do), if exactly one."""

    def optimizer_class(obj) -> bool:
        return (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        )

    if optimizer_class(factory):
        return factory
    fn = inspect.unwrap(factory) if callable(factory) else factory
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    code, namespace = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    if code is not None:
        found += [namespace[n] for n in code.co_names if n in namespace]
    classes = {obj for obj in found if optimizer_class(obj)}
    return classes.pop() if len(classes) == 1 else None


@dataclass(frozen=True)
class _Range:
    """An interval of numbers; ``not_equal`` excludes one value."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    not_equal: float | None = None

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return self.not_equal is None or v != self.not_equal

    def describe(self, integer: bool) -> str:
        what = "an int" if integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        what = what if integer else "a finite number"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return f"{what} other than {self.not_equal:g}" if self.not_equal is not None else what


_SIZE_RANGE = _Range(1, MAX_SIZE)
_POSITIVE = _Range(0, low_open=True)
_UNIT = _Range(0, 1, high_open=True)  # [0, 1)
_OPTIM_RULES = {
    "lr": (float, _POSITIVE),
    "eps": (float, _POSITIVE),
    "clip_norm": (float, _POSITIVE),
    "lrd": (float, _Range(0, 1, low_open=True)),
    "weight_decay": (float, _Range(0)),
    "momentum": (float, _UNIT),
    "dampening": (float, _UNIT),
    "betas": (tuple[float, float], _UNIT),
}
_TRAIN_RULES = {
    "num_steps": (int, _Range(1)),
    "batch_size": (int, _Range(1)),
    "checkpoint_every": (int, _Range(1)),
    "terms_every": (int, _Range(0)),
    "lr": (float, _POSITIVE),
    "train": (Literal["all", "model", "guide"], None),
    "val_every": (int, _Range(1)),
    "val_particles": (int, _Range(1)),
    "val_iwae": (int, _Range(0)),
    "patience": (int | None, _Range(1)),
}
# Sizes that are not named *dim or *hidden.
_SIZE_NAMES = frozenset({"candidates", "top_k", "num_particles", "num_iafs", "horizon", "batch_size"})


def _is_size(name: str) -> bool:
    """Whether an argument sizes an allocation: ``latent_dim``, ``*_dim``, ``*hidden``
    widths, ``candidates``, ``num_particles``, ..., each bounded by :data:`MAX_SIZE`."""
    return name.endswith(("dim", "hidden")) or name in _SIZE_NAMES


def _rule(slot: str, cls, key: str) -> tuple[object | None, _Range | None]:
    """``(type, range)`` that override the signature's for ``key``; None for either: none."""
    if slot == "train":
        return _TRAIN_RULES.get(key, (None, None))
    if slot == "elbo":
        if key == "max_plate_nesting":  # annotated float for its default, inf; a count of dims
            return int, _Range(0)
        if key == "alpha" and isinstance(cls, type) and issubclass(cls, pyro.infer.RenyiELBO):
            return float, _Range(not_equal=1)  # alpha = 1 is Trace_ELBO's bound
    return (None, _SIZE_RANGE) if _is_size(key) else (None, None)


_ANY = object()  # no type known: any plain YAML value


@functools.cache
def _param_types(cls) -> dict[str, object]:
    """The type of each parameter of ``cls``: its annotation, else its default's type."""
    fn = cls.__init__ if isinstance(cls, type) else cls
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name an annotation uses is not importable: type what resolves
        hints = {}
        for key, annotation in getattr(fn, "__annotations__", {}).items():
            try:
                hints[key] = (
                    eval(annotation, getattr(fn, "__globals__", {}))
                    if isinstance(annotation, str)
                    else annotation
                )
            except Exception:
                continue
    out = {}
    for key, p in inspect.signature(cls).parameters.items():
        out[key] = hints[key] if key in hints else _type_of_default(p.default)
    return out


def _type_of_default(default) -> object:
    if default is inspect.Parameter.empty or default is None:
        return _ANY
    if isinstance(default, (bool, int, float, str)):
        return type(default)
    if isinstance(default, (list, tuple)):
        if default and all(type(v) is int for v in default):
            return Sequence[int]
        if default and all(type(v) in (int, float) for v in default):
            return Sequence[float]
        return list
    if isinstance(default, dict):
        return dict
    return _ANY


def _converted(key: str, value, tp, bounds: _Range | None = None):
    """``value`` as type ``tp``, in ``bounds`` (each element's, for a list); else a ValueError naming ``key``."""
    if bounds is not None and type(value) is int and value.bit_length() > 63 and value not in bounds:
        # Out of range, and too large for an int64 as well: the range is what to say.
        raise ValueError(f"{key}: expected {bounds.describe(tp is int)}, got {_show(value)}")
    value = _convert(key, value, tp)
    if bounds is not None:
        for k, v in (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        ):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in bounds:
                raise ValueError(f"{k}: expected {bounds.describe(isinstance(v, int))}, got {_show(v)}")
    return value


def _convert(key: str, value, tp):
    if tp is _ANY or tp is typing.Any or tp is object:
        return _plain_value(key, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(key, value, args[0])
    if origin in (typing.Union, types.UnionType):
        # A value of one of the types as it is first, so 'learned' stays a str
        # and 3 an int; then conversions, so 3 is 3.0 where a float or a str is expected.
        for arg in args:
            if _is_exactly(value, arg):
                return _convert(key, value, arg)
        for arg in args:
            try:
                return _convert(key, value, arg)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {_describe(tp)}, got {_show(value)}")
    if tp is type(None) or tp is None:
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        return _to_int(key, value)
    elif tp is float:
        return _to_float(key, value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if any(type(a) is type(value) and a == value for a in args):
            return value
        raise ValueError(f"{key}: expected one of {list(args)}, got {_show(value)}")
    elif _is_sequence_type(tp):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError(f"{key}: expected {_describe(tp)}, got {_show(value)}")
                return [_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
            item = args[0] if args else _ANY
            return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is dict or origin in (dict, collections.abc.Mapping) or tp is collections.abc.Mapping:
        if isinstance(value, dict):
            return _plain_value(key, value)
    elif not isinstance(origin or tp, type):  # a typing construct this reader does not know
        return _plain_value(key, value)
    # A class no YAML value is (ActionSpace, torch.device, a Tensor), or a value of the wrong type.
    raise ValueError(f"{key}: expected {_describe(tp)}, got {_show(value)}")


def _is_sequence_type(tp) -> bool:
    origin = typing.get_origin(tp) or tp
    return origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def _is_exactly(value, tp) -> bool:
    """Whether ``value`` already is of type ``tp``, with no conversion."""
    if tp is type(None) or tp is None:
        return value is None
    if tp in (bool, int, float, str):
        return type(value) is tp
    if typing.get_origin(tp) is Literal:
        return any(type(a) is type(value) and a == value for a in typing.get_args(tp))
    if _is_sequence_type(tp):
        return isinstance(value, (list, tuple))
    return False


def _to_int(key: str, value) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # 3.0, or 1e3 from YAML
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}: expected an int, got {_show(value)}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{key}: expected an int of at most 64 bits, got {_show(value)}")
    return value


def _to_float(key: str, value) -> float:
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        value = float(value)  # '1e-4', as a YAML 1.1 reader gives it
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{key}: expected a number, got {_show(value)}") from None
    if not isinstance(value, float):
        raise ValueError(f"{key}: expected a number, got {_show(value)}")
    if math.isnan(value):
        raise ValueError(f"{key}: expected a number, got nan")
    return value


def _plain_value(key: str, value, depth: int = 0):
    """A copy of ``value`` if it is what YAML reads as plain data: null, a bool, an int,
    a float (not NaN), a str, a list, or a mapping with str keys; else a ValueError."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{key}: expected at most {_MAX_DEPTH} levels of nesting, got more")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return _to_int(key, value)
    if isinstance(value, float):
        return _to_float(key, value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(f"{key}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise ValueError(f"{key}: expected a mapping with str keys, got the key {_show(k)}")
        return {k: _plain_value(f"{key}.{k}", v, depth + 1) for k, v in value.items()}
    raise ValueError(
        f"{key}: expected null, a bool, a number, a str, a list or a mapping, got {_show(value)}"
    )


def _describe(tp) -> str:
    if tp is _ANY or tp is typing.Any or tp is object:
        return "a YAML value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        return f"one of {list(args)}"
    if _is_sequence_type(tp):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list of {len(args)}: {', '.join(_describe(a) for a in args)}"
        return f"a list of {_plural(args[0])}" if args else "a list"
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an int",
        float: "a number",
        str: "a str",
        dict: "a mapping",
    }
    if tp in names:
        return names[tp]
    name = getattr(origin or tp, "__name__", str(tp))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _plural(tp) -> str:
    return {int: "ints", float: "numbers", str: "strs", bool: "bools"}.get(
        tp, f"values of type {_describe(tp)}"
    )


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def _show(value) -> str:
    """``repr(value)``, shortened: a message names the value, it does not dump it."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    try:
        return _repr.repr(value)
    except ValueError:  # an int too long for str() inside a list
        return f"a {type(value).__name__}"


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
