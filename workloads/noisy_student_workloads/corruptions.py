"""Deterministic corrupted copies of evaluation images: the robustness check of the paper's ImageNet-C claim.

Noisy Student's students were far more robust than their teachers on
ImageNet-C (mCE 45.7 → 28.3). Each trained model is therefore also scored on
corrupted copies of the first evaluation images: five corruptions in the
spirit of ImageNet-C (Hendrycks & Dietterich, 2019), each at three
severities roughly matching its levels 1, 3 and 5 scaled to small images,
made with torchvision's transforms on uint8 batches. The same images get
the same corruption in every run, with any number of processes: Gaussian
noise draws from a generator per image, seeded by the corruption, the
severity and the image's position in the evaluation set.

Example::

    python -c "import torch; from noisy_student_workloads.corruptions import corrupt; \
print(corrupt(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), 'pixelate', 2, 0).shape)"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .config import CORRUPTIONS


def _noise(x: torch.Tensor, sigma: float, seeds: Sequence[int]) -> torch.Tensor:
    # One generator per image, seeded by its position: an image gets the same noise in whatever batch it is.
    noise = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return x + sigma * torch.stack(noise) if noise else x


def _blur(x: torch.Tensor, sigma: float, seeds: Sequence[int]) -> torch.Tensor:
    size = 2 * int(3 * sigma + 0.5) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def _contrast(x: torch.Tensor, factor: float, seeds: Sequence[int]) -> torch.Tensor:
    return TF.adjust_contrast(x, factor)


def _brightness(x: torch.Tensor, factor: float, seeds: Sequence[int]) -> torch.Tensor:
    return TF.adjust_brightness(x, factor)


def _pixelate(x: torch.Tensor, fraction: float, seeds: Sequence[int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, round(h * fraction)), max(1, round(w * fraction))],
                      interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [h, w], interpolation=InterpolationMode.NEAREST)


#: name → the corruption of a float batch in [0, 1] (per image), given its parameter and each image's seed.
#: Parameters per severity: :data:`.config.CORRUPTIONS` (the table the operator renders into configs).
FUNCTIONS: dict[str, Callable[[torch.Tensor, float, Sequence[int]], torch.Tensor]] = {
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, position: int,
            levels: Sequence[float] | None = None) -> torch.Tensor:
    """A uint8 N×C×H×W batch with corruption ``name`` at ``severity`` (1-based) of ``levels`` (default the
    table's); ``position`` is the batch's first image's index in the evaluation set. Each image's noise is
    seeded by its own index, so an image is corrupted the same whatever the batch, rank or number of ranks."""
    fn, levels = FUNCTIONS[name], list(levels or CORRUPTIONS[name])
    if not 1 <= severity <= len(levels):
        raise ValueError(f"severity {severity} is not in 1..{len(levels)}")
    seeds = [hash_seed(name, severity, position + i) for i in range(len(x))]
    out = fn(x.float().div(255), levels[severity - 1], seeds)
    return out.clamp(0, 1).mul(255).round().to(torch.uint8)


def hash_seed(name: str, severity: int, position: int) -> int:
    """A seed stable across processes (Python's ``hash`` of a string is salted per process)."""
    return (sum(ord(c) * 31**i for i, c in enumerate(name)) * 1009 + severity * 100_003 + position) % 2**31
