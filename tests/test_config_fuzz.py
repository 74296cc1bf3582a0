"""Property-based fuzzing of the spec reader: whatever a YAML document or a ``--set``
override holds, reading it either gives a Spec that writes and reads back equal, or
raises ValueError; it never raises anything else and never writes a file."""

import builtins
import contextlib
import inspect
import io
import math
import os
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_worldmodel import fit
from pyro_worldmodel.config import REGISTRY, SLOTS, SUPPLIED, Spec, wrapped_optimizer, yaml_value

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written, not even Hypothesis's examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# Every word a spec may use, so that documents reach the type checks and not only the key checks.
WORDS = sorted(
    {"latent_dim", "train", "name", *SLOTS}
    | {name for choices in REGISTRY.values() for name in choices}
    | {
        key
        for choices in REGISTRY.values()
        for cls in choices.values()
        for key in inspect.signature(cls).parameters
    }
    | {"lr", "clip_norm", "lrd", "betas", "eps", "weight_decay", "momentum", "dampening", "alpha"}
    | {"num_steps", "batch_size", "terms_every", "checkpoint_every", "device", "seed", "extra", "progress"}
)
# YAML scalars, as text, that readers disagree on or that must be refused.
SCALAR_TEXTS = [
    "1e-4", "1.0e-4", "1E5", "-2.5e+3", ".5", "1.", "-.5e-2", ".nan", ".NaN", ".inf", "-.inf", "+.inf",
    "0", "-0", "3", "8", "64", "65536", "65537", "1000000000", "9" * 30, "-" + "9" * 400, "1" * 5000,
    "0x1F", "0o17", "017", "0b101", "1_000", "1_000.5", "1:30", "1:30.5", "yes", "no", "on", "off",
    "true", "False", "~", "null", "", "''", '""', "'1e-4'", "'.inf'", '"3"', "'<<'", "2024-01-01",
    "2001-12-14t21:59:43.10-05:00", "!!binary aGk=", "!!set {a, b}", "!!float 3", "!!int '3'",
    "!!str 3", "!!timestamp x", "!!int x", "!!float x", "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system", "!!omap [{a: 1}]", "&a 1", "*a", "[1, 2", "{a: 1", "[]", "{}",
    "[8, 8]", "[8.0, 16]", "[0.5, 0.9]", "[.nan]", "[0.9, 1e-3]", "{name: gated}", "{name: cem, horizon: 3}",
    "'learned'", "learned", "filter", "all", "ClippedAdam", "SGD", "RenyiELBO", "|\n  text", "-", ":",
    "a: b: c", "\t", '"\\x00"', '"\\ud800"', '"\\u2028"', "é", "🙂", "[[[[[[1]]]]]]", "{1: 2}", "{[1]: 2}",
    "? [1]\n: 2", "{a: &x [1], b: *x}", "---\n1\n---\n2",
]  # fmt: skip
# Python values a caller of with_overrides may pass directly.
PYTHON_VALUES = [
    object(), b"x", {1, 2}, (8, 8), [8.0], math.nan, math.inf, -0.0, 10**100, 2**63, True, None,
    {"name": "gated", "hidden": (4,)}, {"name": 3}, {3: "x"}, [[1]], "1e-4", "nan",
]  # fmt: skip


def keywords(slot: str, name: str) -> list[str]:
    """The keywords a spec may give the part ``name`` of ``slot`` (an optimiser's: its torch class's)."""
    if slot == "train":
        cls = fit
    elif slot == "optim":
        cls = wrapped_optimizer(REGISTRY["optim"][name])
    else:
        cls = REGISTRY[slot][name]
    return [k for k in inspect.signature(cls).parameters if k not in SUPPLIED and k != "params"]


# Spec() and every preset, so that fuzzed documents and overrides reach every preset's parts.
BASES = [
    Spec(),
    Spec(reward={"name": "gaussian"}, planner={"name": "actor_critic"}),
    *(Spec.preset(name) for name in Spec.presets()),
]
# Dotted keys that name a keyword of a part of BASES, as --set gives them.
KEYS = sorted(
    {"latent_dim"}
    | {f"train.{k}" for k in keywords("train", "") if k not in ("model", "guide", "obs", "actions", "mask")}
    | {
        f"{slot}.{k}"
        for base in BASES
        for slot, part in base.to_dict().items()
        if isinstance(part, dict) and "name" in part
        for k in ["name", *keywords(slot, part["name"])]
    }
)

printable = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=12)
scalar_texts = st.one_of(st.sampled_from(SCALAR_TEXTS), st.sampled_from(SCALAR_TEXTS), printable)
# Values as text that a part may well accept, so that many documents and overrides are specs.
LIKELY_TEXTS = [
    "1e-4",
    "1.0e-4",
    "1E-3",
    "0.5",
    ".5",
    "1.",
    "2.0",
    "1e3",
    "3",
    "8",
    "16",
    "[8, 8]",
    "[0.9, 0.999]",
]
LIKELY_TEXTS += ["true", "false", "learned", "all", "guide", "warn", "cpu", "null"]
value_texts = st.one_of(st.sampled_from(LIKELY_TEXTS), st.sampled_from(LIKELY_TEXTS), scalar_texts)
junk_words = st.text(alphabet="abcdelmnoprst_.", max_size=6)
words = st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), junk_words)
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(
        ["1e-4", "1.0e-4", ".nan", "3", "0x10", "1:30", "yes", "null", "~", "2024-01-01", "learned"]
    )
    | printable,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(words, children, max_size=4),
    max_leaves=12,
)
# Values a part may well accept, so that many documents are specs.
likely_values = st.one_of(
    st.integers(1, 100),
    st.floats(0.01, 0.99),
    st.lists(st.integers(1, 64), max_size=3),
    st.lists(st.floats(0.0, 0.99), min_size=2, max_size=2),
    st.booleans(),
    st.sampled_from(["learned", "all", "guide", "warn", "allow", "cpu", 1e-4, 1e-3, 1.0]),
)
values = st.one_of(likely_values, likely_values, plain_values)


@st.composite
def spec_like(draw) -> dict:
    """A spec with some parts replaced: mostly a registered name and some of its keywords, sometimes junk."""
    data = draw(st.sampled_from(BASES)).to_dict()
    for slot in draw(st.lists(st.sampled_from([*data, "continuation"]), max_size=4)):
        if slot == "latent_dim":
            data[slot] = draw(st.one_of(st.integers(1, 64), plain_values))
            continue
        choices = sorted(REGISTRY.get(slot, {}))
        name = draw(st.sampled_from(choices)) if choices else ""
        keys = keywords(slot, name)
        part = {} if slot == "train" else {"name": name if draw(st.integers(0, 5)) else draw(plain_values)}
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else []:
            part[key] = draw(values)
        if not draw(st.integers(0, 5)):
            part[draw(words)] = draw(values)
        data[slot] = part
    return data


@st.composite
def documents(draw) -> str:
    """YAML text: a dumped spec-like or random mapping, keys and tricky scalars in lines, or any text."""
    kind = draw(st.integers(0, 4))
    if kind <= 1:
        return yaml.safe_dump(draw(spec_like()), sort_keys=False, default_flow_style=draw(st.booleans()))
    if kind == 2:  # a valid shape, with a tricky scalar at each key
        nested: dict = {}
        for key, value in draw(st.lists(st.tuples(st.sampled_from(KEYS), value_texts), max_size=6)):
            *slot, last = key.split(".")
            nested.setdefault(slot[0] if slot else "", {})[last] = value
        top = "".join(f"{key}: {value}\n" for key, value in nested.pop("", {}).items())
        return top + "".join(
            f"{slot}:\n" + "".join(f"  {k}: {v}\n" for k, v in part.items()) for slot, part in nested.items()
        )
    if kind == 3:
        lines = draw(st.lists(st.tuples(st.integers(0, 4), words, scalar_texts), max_size=8))
        return "".join(f"{' ' * indent}{key}: {value}\n" for indent, key, value in lines)
    return draw(st.text(max_size=120))


@contextlib.contextmanager
def no_writes():
    """Fail on any attempt to open a file for writing, or to create, move or remove one."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the spec reader tried to change the file system: {args!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            refuse(file, mode)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            refuse(path, flags)
        return real_os_open(path, flags, *args, **kwargs)

    real_open, real_os_open = builtins.open, os.open
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(builtins, "open", guarded_open))
        stack.enter_context(mock.patch.object(io, "open", guarded_open))
        stack.enter_context(mock.patch.object(os, "open", guarded_os_open))
        for name in ("mkdir", "makedirs", "rename", "replace", "remove", "unlink", "rmdir"):
            stack.enter_context(mock.patch.object(os, name, refuse))
        yield


def reads_back_or_refuses(read) -> Spec | None:
    """``read()``'s Spec, checked to write and read back equal; None if it raised ValueError."""
    with no_writes():
        try:
            spec = read()
        except ValueError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))  # one line that says something
            return None
        text = spec.to_yaml()
        again = Spec.from_yaml(text)
    assert again == spec and again.to_yaml() == text, text
    return spec


@FUZZ
@given(documents())
def test_a_yaml_document_gives_a_spec_that_round_trips_or_a_value_error(text):
    reads_back_or_refuses(lambda: Spec.from_yaml(text))


@FUZZ
@given(spec_like())
def test_a_spec_dict_gives_a_spec_that_round_trips_or_a_value_error(data):
    reads_back_or_refuses(lambda: Spec.from_dict(data))


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(KEYS),
                st.sampled_from(KEYS),
                st.lists(words, min_size=1, max_size=3).map(".".join),
            ),
            value_texts.map(lambda text: ("yaml", text))
            | st.sampled_from(PYTHON_VALUES).map(lambda v: ("python", v)),
        ),
        max_size=3,
    ),
    st.sampled_from(BASES),
)
def test_set_overrides_give_a_spec_that_round_trips_or_a_value_error(pairs, base):
    def read():
        overrides = {
            key: yaml_value(value, f"--set {key}") if kind == "yaml" else value
            for key, (kind, value) in pairs
        }
        return base.with_overrides(overrides)

    reads_back_or_refuses(read)


@FUZZ
@given(
    spec_like(),
    st.lists(st.one_of(st.sampled_from(sorted(Spec.presets())), junk_words, plain_values), max_size=3),
)
def test_presets_over_a_spec_give_a_spec_that_round_trips_or_a_value_error(data, names):
    reads_back_or_refuses(lambda: Spec.from_dict(data).with_presets(*names))


def test_the_fuzzed_documents_reach_both_outcomes():
    """The properties above are not vacuous: known documents give each outcome."""
    assert reads_back_or_refuses(
        lambda: Spec.from_yaml("optim: {name: SGD, lr: 1e-4, momentum: 0.9}\n")
    ) == Spec(optim={"name": "SGD", "lr": 1e-4, "momentum": 0.9})
    assert reads_back_or_refuses(lambda: Spec.from_yaml("optim: {name: SGD, lr: .nan}\n")) is None
    assert reads_back_or_refuses(lambda: Spec().with_overrides({"train.extra": {"x": "1e-4"}})).train == {
        "extra": {"x": "1e-4"}
    }
    assert reads_back_or_refuses(lambda: Spec().with_presets("planet", "smoke")) == Spec.preset(
        "planet", "smoke"
    )
    assert (
        reads_back_or_refuses(lambda: Spec(transition={"name": "linear_gaussian"}).with_presets("smoke"))
        is None
    )


def test_the_guard_catches_a_write(tmp_path):
    for write in (
        lambda: (tmp_path / "a.yaml").write_text("x"),
        lambda: open(tmp_path / "b", "a"),
        lambda: os.close(os.open(tmp_path / "c", os.O_CREAT | os.O_WRONLY)),
        lambda: os.mkdir(tmp_path / "d"),
    ):
        with no_writes(), pytest.raises(AssertionError, match="tried to change the file system"):
            write()
    assert list(tmp_path.iterdir()) == []
