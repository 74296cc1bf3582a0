"""Figures: the plotted data against the numbers they were made from, and atomic PNG files."""

import io
from dataclasses import replace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_worldmodel.evaluate import Imagination, OpenLoop
from pyro_worldmodel.infer import History
from pyro_worldmodel.plots import (
    DPI,
    plot_imagination,
    plot_imagination_windows,
    plot_kl_per_t,
    plot_open_loop,
    plot_training,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
S, B, C, H, X = 4000, 2, 4, 6, 3
Z_95 = 1.6448536269514722  # Φ⁻¹(0.95)


def by_gid(ax, gid):
    return [a for a in [*ax.get_lines(), *ax.collections] if a.get_gid() == gid]


def assert_png_of(fig, path):
    """``path`` is a PNG of ``fig`` at DPI, cropped to its tight bounding box."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)  # (rows, cols, RGBA)
    bbox = fig.get_tightbbox()  # inches
    pad = 0.1  # savefig's default pad_inches
    assert img.shape[2] == 4
    # the bbox is measured at the figure's own dpi, so text may come out a pixel or two wider
    assert img.shape[0] == pytest.approx((bbox.height + 2 * pad) * DPI, rel=0.01)
    assert img.shape[1] == pytest.approx((bbox.width + 2 * pad) * DPI, rel=0.01)


# -- plot_training -------------------------------------------------------------------


@pytest.fixture
def history():
    loss = [3.0, 1.0, 2.0, 6.0, 0.0, -1.0, 4.0, 2.0]
    terms = [
        {"step": 0, "elbo": -3.0, "log_px": -1.0, "log_pa": -0.5, "kl": 1.5},
        {"step": 4, "elbo": -0.5, "log_px": 1.0, "log_pa": -0.25, "kl": 1.25},
    ]
    return History(loss=loss, terms=terms)


def test_training_shows_the_loss_its_trailing_mean_and_the_elbo_terms(history):
    fig = plot_training(history, window=3)
    assert isinstance(fig, Figure)
    ax_loss, ax_terms = fig.axes
    (raw,) = by_gid(ax_loss, "loss")
    (mean,) = by_gid(ax_loss, "loss_ma")
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(8))
    np.testing.assert_array_equal(raw.get_ydata(), history.loss)
    # by hand: the first two average over what exists, then over the last 3
    expected = [3.0, 2.0, 2.0, 3.0, 8 / 3, 5 / 3, 1.0, 5 / 3]
    np.testing.assert_allclose(mean.get_ydata(), expected)
    assert "nats per timestep" in ax_loss.get_ylabel()
    for key in ("elbo", "log_px", "log_pa", "kl"):
        (line,) = by_gid(ax_terms, key)
        np.testing.assert_array_equal(line.get_xdata(), [0, 4])
        np.testing.assert_array_equal(line.get_ydata(), [row[key] for row in history.terms])
    assert {t.get_text() for t in ax_terms.get_legend().get_texts()} == {
        "ELBO",
        "log p(x | z)",
        "log π(a | z)",
        "KL(q ‖ p)",
    }
    assert "nats per timestep" in ax_terms.get_ylabel()


def test_training_without_terms_has_one_panel_and_saves_a_png(history, tmp_path):
    history.terms = []
    path = tmp_path / "training.png"
    fig = plot_training(history, path)
    assert len(fig.axes) == 1
    assert_png_of(fig, path)


def test_training_draws_held_out_against_trained_on_with_the_best_check_and_the_stop(history):
    history.validation = [
        {"step": 2, "train_elbo": 1.0, "val_elbo": 0.5},
        {"step": 4, "train_elbo": 2.0, "val_elbo": 1.5},
        {"step": 6, "train_elbo": 3.0, "val_elbo": 1.0},
    ]
    history.best_step, history.stopped_at = 4, 6
    fig = plot_training(history)
    assert len(fig.axes) == 3
    ax = fig.axes[-1]
    for key, ys in (("train_elbo", [1.0, 2.0, 3.0]), ("val_elbo", [0.5, 1.5, 1.0])):
        (line,) = by_gid(ax, key)
        np.testing.assert_array_equal(line.get_xdata(), [2, 4, 6])
        np.testing.assert_array_equal(line.get_ydata(), ys)
    (best,) = by_gid(ax, "best")
    assert list(best.get_xdata()) == [4] and list(best.get_ydata()) == [1.5]
    (stop,) = by_gid(ax, "stopped")
    assert list(stop.get_xdata()) == [6, 6]


def test_training_rejects_an_empty_history_and_a_bad_window(history):
    with pytest.raises(ValueError, match="history: expected at least one recorded step, got none"):
        plot_training(History())
    with pytest.raises(ValueError, match="window: expected an int >= 1, got 0"):
        plot_training(history, window=0)


# -- plot_kl_per_t -------------------------------------------------------------------


@pytest.mark.parametrize("as_type", [torch.tensor, list], ids=["tensor", "list"])
def test_kl_per_t_draws_one_bar_per_time_index_at_its_height(as_type):
    kl = [0.5, 2.0, 1.25, 0.0]
    fig = plot_kl_per_t(as_type(kl))
    (ax,) = fig.axes
    bars = ax.patches
    assert [b.get_height() for b in bars] == kl
    assert [b.get_x() + b.get_width() / 2 for b in bars] == pytest.approx([0, 1, 2, 3])
    assert ax.get_xlabel() == "t"
    assert ax.get_ylabel() == "KL(q ‖ p) nats"


def test_kl_per_t_says_when_it_is_a_monte_carlo_estimate():
    assert "Monte Carlo" not in plot_kl_per_t([1.0, 2.0]).axes[0].get_title()
    assert "Monte Carlo estimate" in plot_kl_per_t([1.0, 2.0], monte_carlo=True).axes[0].get_title()


def test_kl_per_t_rejects_a_matrix():
    with pytest.raises(ValueError, match=r"kl_per_t: expected shape \(T,\) with T >= 1, got \(2, 3\)"):
        plot_kl_per_t(torch.zeros(2, 3))


# -- plot_imagination ----------------------------------------------------------------


@pytest.fixture
def imagined():
    """S samples x ~ Normal(loc, scale) with a known loc and scale per episode, step and dim."""
    loc = torch.arange(B * H * X, dtype=torch.float32).reshape(B, H, X)  # (B, H, X)
    scale = 0.5 + 0.1 * torch.arange(X, dtype=torch.float32)  # (X,)
    obs = torch.distributions.Normal(loc, scale).sample((S,))  # (S, B, H, X)
    imagination = Imagination(
        latents=torch.zeros(S, B, H, 2),
        actions=torch.zeros(S, B, H, 1),
        obs_mean=loc.expand(S, B, H, X),
        obs=obs,
        context_obs=-torch.arange(B * C * X, dtype=torch.float32).reshape(B, C, X),
    )
    future = loc + 0.25  # (B, H, X)
    return imagination, future, loc, scale


def test_imagination_band_covers_the_sample_quantiles_which_match_the_normal(imagined):
    imagination, future, loc, scale = imagined
    episode = 1
    fig = plot_imagination(imagination, future, episode=episode, band=0.9)
    assert len(fig.axes) == X
    samples = imagination.obs[:, episode].double()  # (S, H, X)
    t = np.arange(C, C + H)
    for i, ax in enumerate(fig.axes):
        (band,) = by_gid(ax, "band")
        verts = np.concatenate([p.vertices for p in band.get_paths()])
        lo = torch.quantile(samples[..., i], 0.05, dim=0).numpy()
        hi = torch.quantile(samples[..., i], 0.95, dim=0).numpy()
        for k, t_k in enumerate(t):
            at_t = verts[np.isclose(verts[:, 0], t_k), 1]
            assert at_t.min() == pytest.approx(lo[k])
            assert at_t.max() == pytest.approx(hi[k])
        # ... and the samples' quantiles are those of Normal(loc, scale), within sampling error
        known = loc[episode, :, i].numpy()
        np.testing.assert_allclose(lo, known - Z_95 * scale[i].item(), atol=0.15 * scale[i].item())
        np.testing.assert_allclose(hi, known + Z_95 * scale[i].item(), atol=0.15 * scale[i].item())
        (median,) = by_gid(ax, "median")
        np.testing.assert_array_equal(median.get_xdata(), t)
        np.testing.assert_allclose(median.get_ydata(), torch.quantile(samples[..., i], 0.5, dim=0).numpy())


def test_imagination_draws_context_paths_truth_and_the_context_end(imagined):
    imagination, future, _, _ = imagined
    fig = plot_imagination(imagination, future[0], episode=0, max_paths=3, dim_names=["a", "b", "c"])
    for i, ax in enumerate(fig.axes):
        (context,) = by_gid(ax, "context")
        np.testing.assert_array_equal(context.get_xdata(), np.arange(C))
        np.testing.assert_array_equal(context.get_ydata(), imagination.context_obs[0, :, i].numpy())
        paths = by_gid(ax, "sample")
        assert len(paths) == 3
        for s, line in enumerate(paths):
            np.testing.assert_allclose(line.get_ydata(), imagination.obs[s, 0, :, i].numpy())
        (truth,) = by_gid(ax, "future")
        assert truth.get_linestyle() == "--"
        np.testing.assert_allclose(truth.get_ydata(), future[0, :, i].numpy())
        (end,) = by_gid(ax, "context_end")
        assert list(end.get_xdata()) == [C - 0.5, C - 0.5]
        assert ax.get_ylabel() == "abc"[i]
    assert fig.axes[-1].get_xlabel() == "t"


def test_imagination_without_truth_and_fewer_samples_than_paths(imagined):
    imagination, _, _, _ = imagined
    few = Imagination(**{**vars(imagination), "obs": imagination.obs[:2]})
    fig = plot_imagination(few, max_paths=5)
    for ax in fig.axes:
        assert len(by_gid(ax, "sample")) == 2
        assert by_gid(ax, "future") == []


def test_imagination_with_five_dims_keeps_five_axes_in_a_grid():
    X5 = 5
    imagination = Imagination(
        latents=torch.zeros(10, 1, H, 2),
        actions=torch.zeros(10, 1, H),
        obs_mean=torch.zeros(10, 1, H, X5),
        obs=torch.randn(10, 1, H, X5),
        context_obs=torch.zeros(1, C, X5),
    )
    fig = plot_imagination(imagination)
    assert len(fig.axes) == X5
    assert [ax.get_ylabel() for ax in fig.axes] == [f"x[{i}]" for i in range(X5)]
    # one axes per column at the bottom of its column carries the "t" label
    assert sum(ax.get_xlabel() == "t" for ax in fig.axes) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"episode": 2}, r"episode: expected an int in \[0, 2\), got 2"),
        ({"episode": -1}, r"episode: expected an int in \[0, 2\), got -1"),
        ({"band": 0.0}, r"band: expected a probability in \(0, 1\), got 0.0"),
        ({"band": 1.5}, r"band: expected a probability in \(0, 1\), got 1.5"),
        ({"dim_names": ["a", "b"]}, r"dim_names: expected 3 names, .* got 2"),
        ({"max_paths": -1}, r"max_paths: expected an int >= 0, got -1"),
        (
            {"future_obs": torch.zeros(H, X + 1)},
            r"future_obs: expected shape .*\(H, X\) = \(6, 3\), got \(6, 4\)",
        ),
        (
            {"future_obs": torch.zeros(B + 1, H, X)},
            r"future_obs: expected shape \(B, H, X\) = \(2, 6, 3\).* got \(3, 6, 3\)",
        ),
    ],
)
def test_imagination_rejects_bad_arguments_by_name(imagined, kwargs, message):
    imagination, _, _, _ = imagined
    with pytest.raises(ValueError, match=message):
        plot_imagination(imagination, **kwargs)


# -- plot_open_loop ------------------------------------------------------------------


@pytest.fixture
def open_loop():
    return OpenLoop(
        context=10,
        horizon=4,
        mse={"model": [0.01, 0.02, 0.05, 0.1], "last value": [0.02, 0.08, 0.3, 0.9]},
        log_lik={"model": [2.0, 1.5, 1.0, 0.2], "last value": [1.0, -0.5, -2.0, -4.0]},
        num_windows=37,
        count=[37, 30, 22, 15],
    )


def test_open_loop_plots_each_predictors_numbers_against_horizon(open_loop):
    fig = plot_open_loop(open_loop)
    ax_mse, ax_ll, ax_crps, ax_cal = fig.axes
    assert ax_mse.get_yscale() == "log"
    for ax, numbers in ((ax_mse, open_loop.mse), (ax_ll, open_loop.log_lik)):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["model", "last value"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model", "last value"]
        for line, name in zip(lines, numbers):
            np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4])
            np.testing.assert_array_equal(line.get_ydata(), numbers[name])
            assert line.get_marker() == "o"
    # the same predictor has the same colour in both panels
    assert [line.get_color() for line in ax_mse.get_lines()] == [
        line.get_color() for line in ax_ll.get_lines()
    ]
    # without the probabilistic scores, their panels stay empty
    assert not ax_crps.get_lines() and not ax_cal.get_lines()
    title = fig.get_suptitle()
    assert "10 context steps" in title and "37 windows" in title


def test_open_loop_draws_the_spread_crps_and_calibration(open_loop):
    open_loop.log_lik_median = {"model": [2.5, 2.0, 1.5, 1.0]}
    open_loop.log_lik_p10 = {"model": [0.0, -1.0, -20.0, -300.0]}
    open_loop.log_lik_gaussian = {
        "model": [2.1, 1.7, 1.3, 0.9],
        "last value": open_loop.log_lik["last value"],
    }
    open_loop.crps = {"model": [0.1, 0.2, 0.3, 0.4], "last value": [0.2, 0.4, 0.6, 0.8]}
    open_loop.coverage = {
        "0.5": {"model": [0.6, 0.55, 0.5, 0.45], "last value": [0.3, 0.3, 0.3, 0.3]},
        "0.9": {"model": [0.95, 0.9, 0.88, 0.85], "last value": [0.7, 0.7, 0.7, 0.7]},
    }
    open_loop.num_samples = 100
    fig = plot_open_loop(open_loop)
    _, ax_ll, ax_crps, ax_cal = fig.axes
    ys = [list(line.get_ydata()) for line in ax_ll.get_lines()]
    # median, 10th percentile and the Gaussian for the model; the baseline's Gaussian is its log-lik
    assert open_loop.log_lik_p10["model"] in ys and open_loop.log_lik_median["model"] in ys
    assert open_loop.log_lik_gaussian["model"] in ys and ys.count(open_loop.log_lik["last value"]) == 1
    assert ax_ll.get_yscale() == "symlog"
    assert [list(line.get_ydata()) for line in ax_crps.get_lines()] == list(open_loop.crps.values())
    cal = {(line.get_linestyle(), tuple(line.get_ydata())) for line in ax_cal.get_lines()}
    for level, style in (("0.5", "--"), ("0.9", "-")):
        for values in open_loop.coverage[level].values():
            assert (style, tuple(values)) in cal
    nominal = sorted(float(line.get_ydata()[0]) for line in ax_cal.get_lines() if line.get_color() == "grey")
    assert nominal == [0.5, 0.9]
    assert "100 draws" in fig.get_suptitle()


def test_imagination_windows_side_by_side():
    S, H, X, C = 20, 6, 2, 3
    ims = []
    for k in range(3):
        obs = torch.randn(S, 1, H - k, X) + k
        im = Imagination(
            latents=torch.zeros(S, 1, H - k, 2), actions=torch.zeros(S, 1, H - k, 1),
            obs_mean=obs, obs=obs, context_obs=torch.randn(1, C, X),
        )  # fmt: skip
        ims.append((f"window {k}", im, torch.randn(1, H - k, X)))
    fig = plot_imagination_windows(ims, dim_names=["a", "b"])
    axes = np.array(fig.axes).reshape(X, 3)
    assert [axes[0, j].get_title() for j in range(3)] == ["window 0", "window 1", "window 2"]
    for j, (_, _im, future) in enumerate(ims):
        truth = [line for line in axes[1, j].get_lines() if line.get_gid() == "future"][0]
        np.testing.assert_array_equal(truth.get_ydata(), future[0, :, 1].numpy())
        np.testing.assert_array_equal(truth.get_xdata(), np.arange(C, C + H - j))
    with pytest.raises(ValueError, match="windows: expected at least one"):
        plot_imagination_windows([])
    with pytest.raises(ValueError, match=r"windows\[0\]: expected an imagination of one episode"):
        plot_imagination_windows([("x", replace(ims[0][1], obs=torch.zeros(S, 2, H, X)), None)])


def test_open_loop_rejects_a_list_of_the_wrong_length(open_loop):
    open_loop.log_lik["model"] = [1.0, 2.0]
    with pytest.raises(
        ValueError, match=r"open_loop: expected log_lik\['model'\] to hold horizon = 4 values, got 2"
    ):
        plot_open_loop(open_loop)


# -- saving --------------------------------------------------------------------------


def test_saving_creates_missing_directories(open_loop, tmp_path):
    path = tmp_path / "new" / "deeper" / "open_loop.png"
    fig = plot_open_loop(open_loop, path=path)
    assert_png_of(fig, path)


def test_saving_replaces_an_existing_file_and_leaves_no_temporary_files(imagined, tmp_path):
    imagination, future, _, _ = imagined
    path = tmp_path / "imagination.png"
    path.write_bytes(b"old")
    fig = plot_imagination(imagination, future, path=str(path))
    assert_png_of(fig, path)
    assert [p.name for p in tmp_path.iterdir()] == ["imagination.png"]


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "kl.png"
    path.write_bytes(b"old")

    def half_written(self, f, **kwargs):
        f.write(PNG_MAGIC)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plot_kl_per_t([1.0, 2.0], path=path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["kl.png"]


def test_figures_are_not_registered_with_pyplot(history):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_training(history)
    assert plt.get_fignums() == before


# -- live training ----------------------------------------------------------------------


def test_live_training_redraws_the_training_plot_as_fit_runs():
    """A real fit: the callback sees every step and redraws every `every` steps from the history so far."""
    from pyro_worldmodel import ActionSpace, FilterGuide, WorldModel, fit
    from pyro_worldmodel.plots import LiveTraining

    model = WorldModel.default(3, ActionSpace.box(1), latent_dim=2, hidden=(8,))
    guide = FilterGuide.for_model(model, rnn_dim=8, hidden=(8,))
    obs, actions = torch.randn(6, 5, 3), torch.randn(6, 5, 1)
    seen = []
    live = LiveTraining(every=4)

    def callback(step, history):
        seen.append((step, len(history.loss)))
        live(step, history)

    history = fit(model, guide, obs, actions, num_steps=10, batch_size=3, progress=False, callback=callback)
    assert seen == [(s, s + 1) for s in range(10)]
    assert live.redraws == 2  # after steps 4 and 8
    (line,) = [ln for ln in live.figure.axes[0].lines if ln.get_gid() == "loss"]
    assert list(line.get_ydata()) == history.loss[:8]
    with pytest.raises(ValueError, match=r"every: expected an int >= 1, got 0"):
        LiveTraining(every=0)
    with pytest.raises(ValueError, match=r"callback: expected a callable f\(step, history\), got int"):
        fit(model, guide, obs, actions, num_steps=1, progress=False, callback=3)


def test_bounds_are_bars_from_the_exact_value_down_to_each_bound():
    from pyro_worldmodel.plots import plot_bounds

    fig = plot_bounds(-119.3, {"filter": (-132.9, 0.1), "smoothing": (-128.6, 0.2)})
    (ax,) = fig.axes
    bars = ax.patches
    assert [b.get_y() for b in bars] == pytest.approx([-119.3, -119.3])
    assert [b.get_y() + b.get_height() for b in bars] == pytest.approx([-132.9, -128.6])
    (exact,) = [ln for ln in ax.lines if ln.get_gid() == "exact"]
    assert list(exact.get_ydata()) == pytest.approx([-119.3, -119.3])
    assert [t.get_text() for t in ax.texts] == ["gap 13.60", "gap 9.30"]
    with pytest.raises(ValueError, match=r"bounds: expected at least one"):
        plot_bounds(0.0, {})


def test_a_figure_shows_itself_as_a_png_in_a_notebook():
    """The figures are built without pyplot, so no backend would show them: IPython's own
    formatter, which a notebook's kernel runs on a cell's value, must find a PNG."""
    from IPython.core.formatters import DisplayFormatter

    data, _ = DisplayFormatter().format(plot_kl_per_t([1.0, 2.0]))
    png = data["image/png"]
    assert png[:8] == PNG_MAGIC
    assert mpimg.imread(io.BytesIO(png)).shape[2] in (3, 4)
