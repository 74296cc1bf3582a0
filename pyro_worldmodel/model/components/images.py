"""Image observations: a convolutional encoder for the guide and a decoder emission.

A frame x_t of shape ``(C, H, W)`` travels through the model flattened, as a
vector of X = C·H·W pixel values in 0 … 255 (what the rendered uint8 frames
hold, in float): every plate, mask and ELBO of the vector models then serves
images unchanged. Only these parts see the image's shape. Each network reads
pixels as x / 255 − 0.5, as PlaNet and Dreamer do, and the decoder's
densities are over pixel values, so that log p(x_t | z_t) is in nats per
frame and −log p / (X ln 2) in bits per dimension, as image models report it.

Both networks follow DreamerV1: ``layers`` stride-2 convolutions (kernel 4,
padding 1, each halving the height and width) with ``depth``·2^i channels
and ELU activations, and the decoder mirrors them with transposed
convolutions from a linear map of the latent. Dreamer's depth is 32; the
default here is 8, which trains on a CPU.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from .nets import check_dim, check_hidden, mlp

#: Every part that reads frames says so; the workflow then trains it on ``Episodes.frames``.
FRAMES = "frames"
# The standard deviation of uniform noise over one pixel level, √(1/12): a learned scale
# below it would let the density of integer-valued data grow without bound.
PIXEL_FLOOR = math.sqrt(1.0 / 12.0)


def check_image_shape(image_shape, obs_dim: int, layers: int) -> tuple[int, int, int]:
    """``(C, H, W)`` checked against ``obs_dim`` = C·H·W and deep enough for ``layers`` halvings."""
    if image_shape is None:
        raise ValueError(
            "image_shape: expected (C, H, W) from data with frames (collect --pixels), got None:"
            " this part reads frames, not vector observations"
        )
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else None
    if (
        shape is None
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
    ):
        raise ValueError(f"image_shape: expected (C, H, W) of ints, got {image_shape!r}")
    C, H, W = shape
    if C not in (1, 3):
        raise ValueError(f"image_shape: expected 1 (grayscale) or 3 (RGB) channels, got {C}")
    if C * H * W != obs_dim:
        raise ValueError(f"image_shape: expected C·H·W = obs_dim = {obs_dim}, got {shape} ({C * H * W})")
    if min(H, W) < 2**layers:
        raise ValueError(
            f"image_shape: expected frames of at least {2**layers}×{2**layers} for {layers} stride-2"
            f" layers, got {H}×{W}; collect larger frames or use fewer layers"
        )
    return shape


def _check_layers(depth: int, layers: int) -> None:
    check_dim("depth", depth)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= 8:
        raise ValueError(f"layers: expected an int in [1, 8], got {layers!r}")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixel values 0 … 255 → x / 255 − 0.5, what the networks read."""
    return x / 255.0 - 0.5


class ConvEncoder(nn.Module):
    """e(x_t): ``layers`` stride-2 convolutions of the frame, flattened; the guide's
    observation slot for frames.

    :param obs_dim: X = C·H·W. :param image_shape: ``(C, H, W)``, supplied from the data.
    :param depth: channels of the first convolution, doubling at each.
    """

    observes = FRAMES

    def __init__(self, obs_dim: int, image_shape=None, depth: int = 8, layers: int = 4):
        super().__init__()
        _check_layers(depth, layers)
        self.obs_dim = check_dim("obs_dim", obs_dim)
        self.image_shape = check_image_shape(image_shape, obs_dim, layers)
        self.depth, self.layers = depth, layers
        C, H, W = self.image_shape
        convs, channels = [], C
        for i in range(layers):
            convs += [nn.Conv2d(channels, depth * 2**i, 4, stride=2, padding=1), nn.ELU()]
            channels = depth * 2**i
            H, W = H // 2, W // 2
        self.net = nn.Sequential(*convs)
        self.out_dim = channels * H * W

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``(..., X)`` pixel values → ``(..., E)``."""
        lead = obs.shape[:-1]
        x = to_unit(obs).reshape(-1, *self.image_shape)
        return self.net(x).reshape(*lead, self.out_dim)


class ConvGaussianEmission(nn.Module):
    """p(x_t | z_t) = N(decoder(z_t), σ²) per pixel value, σ one per channel (learned, at
    least :data:`PIXEL_FLOOR`) or fixed.

    The decoder maps z_t (linearly, or through an MLP of ``hidden`` widths) to
    ``depth``·2^(layers−1) channels at 1/2^layers of the frame's size, then ``layers`` transposed convolutions double the size back (cropped to
    the frame where it is not a multiple of 2^layers); its output u gives the mean
    255 (u + 0.5).

    :param latent_dim: what the emission reads ([h_t, z_t] with a recurrent transition).
    :param obs_dim: X = C·H·W. :param image_shape: ``(C, H, W)``, supplied from the data.
    :param scale: ``"learned"``, or a fixed σ in pixel levels.
    :param hidden: widths of an MLP (ELU) before the transposed convolutions; none by
        default, as in DreamerV1.
    """

    observes = FRAMES

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        image_shape=None,
        depth: int = 8,
        layers: int = 4,
        scale: float | str = "learned",
        hidden=(),
    ):
        super().__init__()
        _check_layers(depth, layers)
        self.hidden = check_hidden(hidden)
        self.latent_dim = check_dim("latent_dim", latent_dim)
        self.obs_dim = check_dim("obs_dim", obs_dim)
        self.image_shape = check_image_shape(image_shape, obs_dim, layers)
        self.depth, self.layers = depth, layers
        C, H, W = self.image_shape
        self.start = (depth * 2 ** (layers - 1), -(-H // 2**layers), -(-W // 2**layers))
        self.linear = mlp(latent_dim, self.hidden, math.prod(self.start))
        deconvs, channels = [], self.start[0]
        for i in reversed(range(layers)):
            out = C if i == 0 else depth * 2 ** (i - 1)
            deconvs.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if i:
                deconvs.append(nn.ELU())
            channels = out
        self.net = nn.Sequential(*deconvs)
        if scale == "learned":
            # log(σ − floor), per channel, started at σ = 16 pixel levels
            self.raw_scale = nn.Parameter(torch.full((C,), math.log(16.0 - PIXEL_FLOOR)))
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf:
            self.register_buffer("fixed_scale", torch.full((C,), float(scale)))
        else:
            raise ValueError(f"scale: expected 'learned' or a positive float (pixel levels), got {scale!r}")
        self.scale = scale

    def channel_scale(self) -> torch.Tensor:
        """σ per channel, ``(C,)``, in pixel levels."""
        return self.raw_scale.exp() + PIXEL_FLOOR if self.scale == "learned" else self.fixed_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., Z)`` → the mean frame ``(..., C, H, W)`` in pixel values."""
        lead = z.shape[:-1]
        C, H, W = self.image_shape
        u = self.net(self.linear(z.reshape(-1, self.latent_dim)).reshape(-1, *self.start))
        return (255.0 * (u[..., :H, :W] + 0.5)).reshape(*lead, C, H, W)

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a Normal with event shape ``(X,)``."""
        loc = self.decode(z)  # (..., C, H, W)
        scale = self.channel_scale()[:, None, None].expand(self.image_shape)
        return dist.Normal(loc.flatten(-3), scale.reshape(-1).expand(*loc.shape[:-3], self.obs_dim)).to_event(
            1
        )

    def check_obs(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Refuse values outside 0 … 255: frames are modelled in pixel values, not normalised."""
        bad = ((obs < 0) | (obs > 255)).any(-1)  # (B, T)
        if mask is not None:
            bad = bad & mask
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(
                f"obs: expected pixel values in [0, 255] for {type(self).__name__}, got"
                f" {float(obs[b, t].min()):.4g} … {float(obs[b, t].max()):.4g} at episode {b}, step {t}"
            )


_NO_SHAPE = torch.Size()


class DiscretizedLogistic(dist.TorchDistribution):
    """A logistic distribution of location μ and scale s, discretised to the pixel values
    0 … 255 (PixelCNN++): P(x) = σ((x + ½ − μ)/s) − σ((x − ½ − μ)/s), with the tails
    below 0 and above 255 folded into the end values. It is a probability mass function,
    so its log-likelihood in bits per pixel value is the image models' bits per dimension.

    The log of each bin's mass is computed without subtracting two nearly equal
    sigmoids: log(σ(a) − σ(b)) = log σ(a) + log(−expm1(log σ(b) − log σ(a))), on the side of
    the logistic where σ is small (σ(a) − σ(b) = σ(−b) − σ(−a)), so it stays accurate in the
    tails and for scales far below a pixel level.
    """

    arg_constraints = {"loc": dist.constraints.real, "scale": dist.constraints.positive}
    support = dist.constraints.integer_interval(0, 255)
    has_rsample = False

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        """The mean of the undiscretised logistic, clamped to [0, 255]: exact up to the folded
        tails, which matter only where μ lies within a few s of an end."""
        return self.loc.clamp(0.0, 255.0)

    @property
    def variance(self):
        return (self.scale * math.pi) ** 2 / 3.0

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_sigmoid = torch.nn.functional.logsigmoid
        centred = value - self.loc
        plus, minus = (centred + 0.5) / self.scale, (centred - 0.5) / self.scale
        # σ(plus) − σ(minus), as σ(hi) − σ(lo) on the side where both are small
        right = minus > 0
        hi, lo = torch.where(right, -minus, plus), torch.where(right, -plus, minus)
        log_hi = log_sigmoid(hi)
        inner = log_hi + torch.log(-torch.expm1(log_sigmoid(lo) - log_hi))
        first = log_sigmoid(plus)  # x = 0 takes all the mass below ½
        last = log_sigmoid(-minus)  # x = 255 all above 254.5
        return torch.where(value < 0.5, first, torch.where(value > 254.5, last, inner))

    def sample(self, sample_shape=_NO_SHAPE):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return x.round().clamp(0.0, 255.0)


class ConvLogisticEmission(ConvGaussianEmission):
    """p(x_t | z_t) = a discretised logistic per pixel value (:class:`DiscretizedLogistic`),
    its location the decoder's frame as in :class:`ConvGaussianEmission` and its scale one
    per channel (learned, at least :data:`PIXEL_FLOOR`, or fixed). A probability mass over
    the 256 values, so its bound is in bits per dimension exactly."""

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        """:param z: ``(..., Z)``. :returns: a discretised logistic with event shape ``(X,)``."""
        loc = self.decode(z)  # (..., C, H, W)
        scale = self.channel_scale()[:, None, None].expand(self.image_shape)
        scale = scale.reshape(-1).expand(*loc.shape[:-3], self.obs_dim)
        return DiscretizedLogistic(loc.flatten(-3), scale).to_event(1)
