"""The image parts: a convolutional encoder for the guide and a decoder emission over
pixel values, their shapes, their density, and their refusals."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_worldmodel import ActionSpace
from pyro_worldmodel.config import Spec, build
from pyro_worldmodel.model.components import ConvEncoder, ConvGaussianEmission
from pyro_worldmodel.model.components.images import PIXEL_FLOOR


def test_the_encoder_halves_the_frame_at_each_layer_and_reads_pixels_centred():
    enc = ConvEncoder(3 * 64 * 64, (3, 64, 64), depth=8, layers=4)
    assert enc.out_dim == 64 * 4 * 4  # 64 → 32 → 16 → 8 → 4, channels 8 · 2³
    x = torch.randint(256, (2, 5, 3 * 64 * 64)).float()
    assert enc(x).shape == (2, 5, enc.out_dim)
    # what the first convolution sees is x / 255 − 0.5: zero for a mid-grey frame, ±0.5 at the ends
    seen = []
    enc.net[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    enc(torch.full((1, 3 * 64 * 64), 127.5))
    enc(torch.cat([torch.zeros(1, 3 * 64 * 32), torch.full((1, 3 * 64 * 32), 255.0)], -1))
    assert (seen[0] == 0).all()
    assert (seen[1][0, :1, :32] == -0.5).all() and (seen[1][0, 2:, 32:] == 0.5).all()
    # frames flatten channel-major, as Episodes.frames.flatten(2) lays them out
    frame = torch.arange(3 * 4 * 4).reshape(3, 4, 4).float()
    small = ConvEncoder(48, (3, 4, 4), depth=1, layers=1)
    with torch.no_grad():
        small.net[0].weight.zero_()
        small.net[0].bias.zero_()
        small.net[0].weight[0, 2, 1, 1] = 1.0  # channel 2, the pixel at the kernel's centre-ish
    got = small.net[0]((frame / 255 - 0.5)[None])[0, 0]
    torch.testing.assert_close(small(frame.reshape(1, 48))[0], torch.nn.functional.elu(got).reshape(-1))


def test_the_decoder_density_is_a_gaussian_per_pixel_value():
    """With the decoder's output fixed at u (every weight zero, the last bias u per channel),
    the mean is 255 (u + 0.5), and a frame at the mean has density −X log(σ √(2π))."""
    em = ConvGaussianEmission(4, 3 * 16 * 16, (3, 16, 16), depth=4, layers=2, scale=2.0)
    with torch.no_grad():
        for p in em.parameters():
            p.zero_()
        em.net[-1].bias.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    z = torch.randn(7, 4)
    d = em(z)
    assert d.event_shape == (768,) and d.batch_shape == (7,)
    mean = d.mean.reshape(7, 3, 16, 16)
    assert (mean[:, 0] == 0).all() and (mean[:, 1] == 127.5).all() and (mean[:, 2] == 255).all()
    x = d.mean
    torch.testing.assert_close(d.log_prob(x), torch.full((7,), -768 * math.log(2.0 * math.sqrt(2 * math.pi))))
    # one pixel 2σ off costs 2 nats
    x2 = x.clone()
    x2[:, 300] += 4.0
    torch.testing.assert_close(d.log_prob(x) - d.log_prob(x2), torch.full((7,), 2.0))


def test_a_learned_scale_is_one_per_channel_and_never_below_a_pixel_levels_noise():
    em = ConvGaussianEmission(4, 1 * 8 * 8, (1, 8, 8), depth=2, layers=2)
    assert em.channel_scale().shape == (1,)
    torch.testing.assert_close(em.channel_scale(), torch.tensor([16.0]))
    with torch.no_grad():
        em.raw_scale.fill_(-50.0)
    assert em.channel_scale().item() == pytest.approx(PIXEL_FLOOR)
    assert em(torch.zeros(3, 4)).variance.min().item() == pytest.approx(1 / 12)


@pytest.mark.parametrize("shape, layers", [((3, 20, 28), 2), ((1, 64, 48), 4), ((3, 33, 33), 5)])
def test_frames_of_any_size_decode_to_their_shape(shape, layers):
    X = math.prod(shape)
    em = ConvGaussianEmission(5, X, shape, depth=2, layers=layers)
    assert em.decode(torch.randn(2, 3, 5)).shape == (2, 3, *shape)
    enc = ConvEncoder(X, shape, depth=2, layers=layers)
    assert enc(torch.zeros(4, X)).shape == (4, enc.out_dim)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_shape": None}, r"image_shape: expected \(C, H, W\) from data with frames .* got None"),
        ({"image_shape": (3, 8, 8)}, r"image_shape: expected C·H·W = obs_dim = 64, got \(3, 8, 8\) \(192\)"),
        ({"image_shape": (2, 8, 4)}, r"image_shape: expected 1 \(grayscale\) or 3 \(RGB\) channels, got 2"),
        ({"image_shape": (1, 8, 8), "layers": 4}, r"at least 16×16 for 4 stride-2 layers, got 8×8"),
        ({"image_shape": "1x8x8"}, r"image_shape: expected \(C, H, W\) of ints, got '1x8x8'"),
        ({"image_shape": (1, 8, 8), "layers": 0}, r"layers: expected an int in \[1, 8\], got 0"),
        ({"image_shape": (1, 8, 8), "depth": 0}, r"depth"),
    ],
)
def test_bad_image_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvEncoder(64, **kwargs)
    with pytest.raises(ValueError, match=message):
        ConvGaussianEmission(3, 64, **kwargs)


def test_a_spec_of_images_is_built_with_the_datas_frame_shape_and_refused_without():
    spec = {
        "encoder": {"name": "conv", "depth": 2, "layers": 2},
        "emission": {"name": "conv_gaussian", "depth": 2, "layers": 2},
    }
    b = build(spec, 3 * 16 * 16, ActionSpace.box(1), image_shape=(3, 16, 16))
    assert b.model.emission.image_shape == (3, 16, 16) and b.guide.encoder.image_shape == (3, 16, 16)
    with pytest.raises(
        ValueError,
        match=r"emission \(conv_gaussian\): image_shape: expected \(C, H, W\) from data with frames",
    ):
        build(spec, 3, ActionSpace.box(1))
    assert Spec.from_dict(spec).emission["name"] == "conv_gaussian"


def test_pixel_values_outside_0_to_255_are_refused_before_training():
    spec = {
        "encoder": {"name": "conv", "depth": 2, "layers": 2},
        "emission": {"name": "conv_gaussian", "depth": 2, "layers": 2},
    }
    b = build(spec, 64, ActionSpace.box(1), image_shape=(1, 8, 8))
    obs = torch.rand(2, 3, 64) - 0.5  # normalised, not pixel values
    actions = torch.zeros(2, 3, 1)
    with pytest.raises(
        ValueError, match=r"obs: expected pixel values in \[0, 255\] for ConvGaussianEmission, got -0\.\d+"
    ):
        b.model.check_inputs(obs, actions, check_values=True)
    with pyro.validation_enabled(False):
        b.model.check_inputs(obs * 0 + 3, actions, check_values=True)  # in range: accepted


@pytest.mark.parametrize(
    "loc, scale",
    [(0.0, 1.0), (127.3, 0.3), (255.0, 5.0), (-20.0, 2.0), (300.0, 10.0), (100.0, 0.01), (64.5, 40.0)],
)
def test_the_discretised_logistic_is_a_probability_mass_over_pixel_values(loc, scale):
    from pyro_worldmodel.model.components import DiscretizedLogistic

    x = torch.arange(256, dtype=torch.float64)
    d = DiscretizedLogistic(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    p = d.log_prob(x).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # each bin is the logistic CDF's mass over [x − ½, x + ½], the tails folded into 0 and 255
    cdf = torch.sigmoid((torch.cat([x - 0.5, x[-1:] + 0.5]) - loc) / scale)
    cdf[0], cdf[-1] = 0.0, 1.0
    exact = cdf[1:] - cdf[:-1]
    # in float64 the CDF differences are exact where they are not tiny; the log-space form
    # also keeps the tiny ones, which the differences lose
    big = exact > 1e-8
    torch.testing.assert_close(p[big], exact[big], rtol=1e-7, atol=0)
    assert (p > 0).all() or scale < 0.5


def test_the_discretised_logistic_samples_its_own_mass():
    from pyro_worldmodel.model.components import DiscretizedLogistic

    torch.manual_seed(0)
    d = DiscretizedLogistic(torch.tensor(250.2), torch.tensor(3.0))
    x = d.sample((200_000,))
    assert ((x >= 0) & (x <= 255) & (x == x.round())).all()
    freq = torch.bincount(x.long(), minlength=256).double() / len(x)
    p = d.log_prob(torch.arange(256.0)).exp().double()
    se = (p * (1 - p) / len(x)).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-6).all()
    assert freq[255] == pytest.approx(float(p[255]), abs=0.01) and p[255] > 0.1  # the folded upper tail


def test_the_logistic_decoder_reads_frames_like_the_gaussian_one():
    from pyro_worldmodel.model.components import ConvLogisticEmission

    em = ConvLogisticEmission(4, 3 * 16 * 16, (3, 16, 16), depth=4, layers=2, scale=2.0)
    with torch.no_grad():
        for p in em.parameters():
            p.zero_()
        em.net[-1].bias.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    d = em(torch.randn(5, 4))
    assert d.event_shape == (768,) and d.batch_shape == (5,)
    frame = d.mean  # 0, 127.5 and 255 per channel
    # at its location a bin holds σ(¼) − σ(−¼) of the mass (s = 2), at the ends the folded half and more
    inner = torch.sigmoid(torch.tensor(0.25)) - torch.sigmoid(torch.tensor(-0.25))
    x = frame.clone()
    x[:, 256:512] = 127.0  # half a level below the location
    expected = 256 * (2 * math.log(torch.sigmoid(torch.tensor(0.25)).item()))
    expected += 256 * math.log((torch.sigmoid(torch.tensor(0.5)) - torch.sigmoid(torch.tensor(0.0))).item())
    torch.testing.assert_close(d.log_prob(x), torch.full((5,), expected), rtol=1e-5, atol=1e-3)
    assert inner > 0
