"""SimCLR-style augmentations: random resized crop, flip, colour jitter, grayscale, blur,
and BYOL's solarisation.

Two forms of one recipe (Chen et al., 2020, appendix A):

* :class:`BatchAugment` applies it to a whole batch [B, C, H, W] with per-sample random
  parameters using batched tensor ops (crop + flip as two small matmuls per image). On a CPU
  this is far faster than per-image transforms, which matters for small images.
* :func:`simclr_transforms` builds the same recipe as a torchvision ``v2`` pipeline for
  one image at a time (data-loader workers, large images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

_LUMA = (0.299, 0.587, 0.114)


def _check_prob(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


def _interpolation_matrix(coords: torch.Tensor, n: int) -> torch.Tensor:
    """Bilinear weights [B, S, n] that sample a length-n axis at ``coords`` [B, S].

    ``coords`` are in grid_sample's normalised units (−1 and 1 are the outer pixel edges,
    align_corners=False) and lie in [−1, 1]; a sample in the outer half pixel takes the
    edge pixel, as grid_sample's border and reflection padding do.
    """
    u = (((coords + 1) * n - 1) / 2).clamp(0, n - 1)
    i0 = u.floor()
    frac = (u - i0).unsqueeze(-1)
    i0 = i0.long().unsqueeze(-1)
    i1 = (i0 + 1).clamp(max=n - 1)
    m = torch.zeros(*coords.shape, n, device=coords.device, dtype=coords.dtype)
    m.scatter_add_(-1, i0, 1 - frac)
    return m.scatter_add_(-1, i1, frac)


class BatchAugment(nn.Module):
    """Batched SimCLR augmentations on float images in [0, 1].

    Args:
        size: output side length.
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio.
        flip_prob: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths.
        jitter_prob: probability of applying colour jitter.
        gray_prob: probability of converting to grayscale.
        blur_prob: probability of a Gaussian blur (σ ∈ [0.1, 2.0] px at output size).
        solarize_prob: probability of solarisation (values ≥ 0.5 become 1 − value), BYOL's
            extra photometric transform.

    Examples:
        >>> aug = BatchAugment(32)
        >>> aug(torch.rand(8, 3, 28, 28)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_prob: float = 0.8,
        gray_prob: float = 0.2,
        blur_prob: float = 0.0,
        solarize_prob: float = 0.0,
    ):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be ≥ 1, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo ≤ hi ≤ 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo ≤ hi, got {ratio}")
        self.size = size
        self.scale, self.ratio = scale, ratio
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.jitter = jitter
        self.jitter_prob = _check_prob("jitter_prob", jitter_prob)
        self.gray_prob = _check_prob("gray_prob", gray_prob)
        self.blur_prob = _check_prob("blur_prob", blur_prob)
        self.solarize_prob = _check_prob("solarize_prob", solarize_prob)

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        return self._crop_flip_boxes(x)[0]

    def _crop_flip_boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cropped, flipped batch and each view's box (see :meth:`forward`)."""
        B = x.shape[0]
        dev = x.device
        area = torch.empty(B, device=dev).uniform_(*self.scale)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = torch.empty(B, device=dev).uniform_(lo, hi).exp()
        w = (area * r).sqrt().clamp(max=1.0)  # fraction of the width
        h = (area / r).sqrt().clamp(max=1.0)
        cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
        cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(B, device=dev) < self.flip_prob, -1.0, 1.0)
        # The map has no shear, so bilinear resampling is separable: out = R_y · x · R_xᵀ
        # with one [size, H] and one [size, W] interpolation matrix per sample. Two small
        # matmuls take a fraction of grid_sample's time on a CPU and give the same pixels.
        t = (torch.arange(self.size, device=dev, dtype=x.dtype) * 2 + 1) / self.size - 1
        rx = _interpolation_matrix((w * flip)[:, None] * t + cx[:, None], x.shape[-1])
        ry = _interpolation_matrix(h[:, None] * t + cy[:, None], x.shape[-2])
        # The view's outer edges (t = ∓1) in image fractions: left, top, right, bottom.
        boxes = torch.stack([cx - w * flip, cy - h, cx + w * flip, cy + h], dim=1).add(1) / 2
        return ry[:, None] @ x @ rx[:, None].transpose(-1, -2), boxes

    @staticmethod
    def _gray(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x
        w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)

    def _color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        b, c, s, h = self.jitter

        def factor(strength):
            return torch.empty(B, 1, 1, 1, device=x.device).uniform_(1 - strength, 1 + strength)

        x = (x * factor(b)).clamp(0, 1)
        mean = self._gray(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * factor(c) + mean).clamp(0, 1)
        if x.shape[1] == 3:
            gray = self._gray(x)
            x = ((x - gray) * factor(s) + gray).clamp(0, 1)
            if h > 0:  # hue: rotate the chroma plane of YIQ
                angle = torch.empty(B, device=x.device).uniform_(-h, h) * 2 * math.pi
                yiq = torch.tensor(
                    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    device=x.device,
                )
                cos, sin = angle.cos(), angle.sin()
                rot = torch.zeros(B, 3, 3, device=x.device)
                rot[:, 0, 0] = 1
                rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
                rot[:, 2, 1], rot[:, 2, 2] = sin, cos
                m = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3]
                x = torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)
        return x

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        sigma = torch.empty(B, device=x.device).uniform_(0.1, 2.0)
        radius = max(1, int(math.ceil(2 * 2.0)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B·C, 2r+1]
        y = x.reshape(1, B * C, H, W)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=B * C)
        y = F.conv2d(y, k[:, None, :, None], groups=B * C)
        return y.reshape(B, C, H, W)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, return_boxes: bool = False):
        """x: [B, C, H, W] float in [0, 1] (C = 1 or 3). Returns [B, C, size, size], and with
        ``return_boxes`` also each view's box [B, 4] in image fractions: the image
        coordinates of the view's left, top, right and bottom edges. A flipped view has
        left > right, so the point at fraction (u, v) of a view lies at image
        (x_l + u·(x_r − x_l), y_t + v·(y_b − y_t)) either way: what dense losses use to
        find the image location two views share."""
        if x.ndim != 4:
            raise ValueError(f"expected [B, C, H, W], got {tuple(x.shape)}")
        x, boxes = self._crop_flip_boxes(x.float())
        B = x.shape[0]

        def chosen(p):
            return torch.rand(B, 1, 1, 1, device=x.device) < p

        if self.jitter_prob > 0:
            m = chosen(self.jitter_prob)
            x = torch.where(m, self._color_jitter(x), x)
        if self.gray_prob > 0 and x.shape[1] == 3:
            m = chosen(self.gray_prob)
            x = torch.where(m, self._gray(x), x)
        if self.blur_prob > 0:
            m = chosen(self.blur_prob)
            x = torch.where(m, self._blur(x), x)
        if self.solarize_prob > 0:
            m = chosen(self.solarize_prob)
            x = torch.where(m & (x >= 0.5), 1 - x, x)
        return (x, boxes) if return_boxes else x


def simclr_transforms(size: int, *, blur: bool = True):
    """SimCLR's per-image pipeline (torchvision ``transforms.v2``): PIL/uint8 → float [0, 1]."""
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        k = max(3, (size // 10) | 1)  # odd kernel ≈ 10% of the image, as in SimCLR
        steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
