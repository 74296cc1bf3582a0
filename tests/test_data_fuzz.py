"""Property-based fuzzing of Episodes.load: whatever a file holds, loading it either
gives episodes that save and load back equal, or raises ValueError; it never writes."""

import functools
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_worldmodel.data import Episodes, collect

PER_EPISODE = ("obs", "actions", "rewards", "mask", "terminated", "truncated", "final_obs")
NORMALIZER = tuple(
    f"normalizer_{n}"
    for n in ("obs_loc", "obs_scale", "action_loc", "action_scale", "reward_loc", "reward_scale")
)
KEYS = (
    *PER_EPISODE,
    "format",
    "env_id",
    "action_kind",
    "action_dim",
    "action_low",
    "action_high",
    *NORMALIZER,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def valid_files() -> tuple[dict, ...]:
    """The arrays of two valid files: box actions with a normaliser, and discrete actions with padding."""
    box = collect("Pendulum-v1", 2, seed=0, max_episode_steps=6, progress=False).fit_normalizer()
    discrete = collect("CartPole-v1", 2, seed=0, max_episode_steps=12, progress=False)
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in (box, discrete):
            with np.load(eps.save(Path(tmp) / "valid.npz")) as f:
                files.append({k: f[k] for k in f.files})
    return tuple(files)


DTYPES = [
    "<f2", "<f4", "<f8", ">f4", "<i1", "<i4", "<i8", ">i8", "<u1", "<u2", "|b1", "<c8", "<c16", "<U5", "|S3", "O",
]  # fmt: skip


@st.composite
def arrays(draw, shape=None, dtype=None, elements=None):
    """Any array: numbers (NaN and ±inf included), strings, bytes or Python objects, of any small shape."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)) if dtype is None else dtype)
    if shape is None:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if dtype.kind == "O":
        return np.array(draw(st.lists(st.integers(), min_size=1, max_size=3)) + [None], dtype=object)
    if elements is None and dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def plausible_files(draw):
    """Files close to valid ones, so that fuzzing reaches every check and some files
    load: each part is drawn valid nine times in ten and anything at all otherwise."""

    def valid() -> bool:
        return draw(st.integers(0, 9)) < 9  # the simplest draw, 0, is the valid one

    def floats(shape, low=-8192.0, high=8192.0):  # bounds exact in float16
        if valid():
            dtype = draw(st.sampled_from(["<f4", "<f4", "<f8", "<f2"]))
            return draw(arrays(shape, dtype, st.floats(low, high, width=8 * np.dtype(dtype).itemsize)))
        return draw(arrays(shape, draw(st.sampled_from(["<f4", "<f8", "<i4", "|b1", "<c8", "<U5"]))))

    N = draw(st.integers(1, 3)) if valid() else 0
    T = draw(st.integers(1, 5)) if valid() else 0
    X = draw(st.integers(1, 3)) if valid() else 0
    A = draw(st.integers(1, 3)) if valid() else 0
    kind = draw(st.sampled_from(["box", "discrete"])) if valid() else "other"
    lengths = [draw(st.integers(1, T)) if valid() and T else 0 for _ in range(N)]
    mask = np.arange(T)[None, :] < np.array(lengths, dtype=int).reshape(N, 1)  # (N, T)
    if not valid() and mask.size:  # a hole, or an episode one step longer or shorter
        flat = mask.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] ^= True
    if kind == "discrete":
        if valid():
            dtype = draw(st.sampled_from(["<i8", "<i4", "<u1"]))
            actions = draw(arrays((N, T), dtype, st.integers(0, max(A - 1, 0))))
        else:
            actions = draw(arrays((N, T), draw(st.sampled_from(["<i8", "<f4", "|b1"])), None))
    else:
        actions = floats((N, T, A))
    data = {
        "obs": floats((N, T, X)),
        "actions": actions,
        "rewards": floats((N, T)),
        "mask": mask,
        "terminated": draw(arrays((N,), "|b1" if valid() else "<i8")),
        "truncated": draw(arrays((N,), "|b1")),
        "final_obs": floats((N, X)),
        "format": np.array("pyro_worldmodel.episodes/1" if valid() else "other/1"),
        "env_id": np.array(
            draw(st.sampled_from(["Pendulum-v1", "", "ALE/Pong-v5"] if valid() else ["../x", "/abs"]))
        ),
        "action_kind": np.array(kind),
        "action_dim": np.array(A if valid() else draw(st.sampled_from([0, -1, 2**21, 1.5]))),
    }
    if kind == "box" and draw(st.booleans()):
        low = draw(st.floats(-10, 0))
        for bound, value in (("action_low", low), ("action_high", low + draw(st.floats(0, 10)))):
            data[bound] = (
                np.full(A if valid() else 1, value) if valid() else floats((draw(st.integers(0, 2)),))
            )
    if draw(st.booleans()):
        for part, shape in {"obs": (X,), "action": (A,), "reward": ()}.items():
            if part == "obs" or (part == "action" and kind == "box" and valid()) or draw(st.booleans()):
                data[f"normalizer_{part}_loc"] = floats(shape)
                data[f"normalizer_{part}_scale"] = floats(shape, 2.0**-10, 1024.0)
    if not valid():
        del data[draw(st.sampled_from(sorted(data)))]
    if not valid():
        data[draw(st.sampled_from(KEYS))] = draw(arrays())
    for key in draw(st.lists(st.sampled_from(["junk", "notes"]), max_size=2)):
        data[key] = draw(arrays())
    return data


def check_load(content: bytes | dict) -> None:
    """Write ``content`` (an .npz's arrays, or raw bytes) in a fresh directory and load it:
    a ValueError, or episodes that round-trip; the directory is left as it was."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.savez(path, **content)
        before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(tmp).iterdir())
        try:
            eps = Episodes.load(path)
        except ValueError:
            eps = None
        after = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(tmp).iterdir())
        assert after == before
        if eps is None:
            return
        with tempfile.TemporaryDirectory() as out:
            back = Episodes.load(eps.save(Path(out) / "again.npz"))
        assert_same(back, eps)


def assert_same(a: Episodes, b: Episodes) -> None:
    for name in PER_EPISODE:
        # NaN may sit on padding, which is not data; it must come back as NaN
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)
    assert a.action_space == b.action_space and a.env_id == b.env_id
    assert (a.normalizer is None) == (b.normalizer is None)
    if a.normalizer is not None:
        for stat in NORMALIZER:
            x, y = (getattr(n.normalizer, stat.removeprefix("normalizer_")) for n in (a, b))
            assert (x is None and y is None) or torch.equal(x, y), stat


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS + ("junk",)), arrays(), max_size=8))
def test_random_arrays_under_the_real_keys(data):
    check_load(data)


@FUZZ
@given(plausible_files())
def test_nearly_valid_files(data):
    check_load(data)


@FUZZ
@given(st.data())
def test_mutations_of_valid_files(data):
    arrays_of = dict(data.draw(st.sampled_from(valid_files())))
    mutation = data.draw(st.sampled_from(["drop", "replace", "nan", "junk"]))
    numeric = sorted(k for k, v in arrays_of.items() if v.dtype.kind in "biuf" and v.size)
    key = data.draw(st.sampled_from(numeric if mutation == "nan" else sorted(arrays_of)))
    if mutation == "drop":
        del arrays_of[key]
    elif mutation == "replace":
        arrays_of[key] = data.draw(arrays())
    elif mutation == "nan":
        flat = arrays_of[key].astype(np.float64).reshape(-1)  # a float copy, whatever the dtype was
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays_of[key] = flat.reshape(arrays_of[key].shape)
    else:
        arrays_of[data.draw(st.sampled_from(["junk", "notes"]))] = data.draw(arrays())
    check_load(arrays_of)


@functools.cache
def valid_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **valid_files()[0])
    return buf.getvalue()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(content):
    check_load(content)


@FUZZ
@given(st.data())
def test_truncated_and_corrupted_valid_files(data):
    content = bytearray(valid_bytes())
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    check_load(bytes(content))


def test_the_valid_files_load():
    """The mutations above start from files that load: otherwise they test only refusals."""
    for arrays_of in valid_files():
        check_load(arrays_of)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "x.npz").write_bytes(valid_bytes())
        eps = Episodes.load(Path(tmp) / "x.npz")
        assert len(eps) == 2 and eps.action_space.kind == "box" and eps.normalizer is not None
