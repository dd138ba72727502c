"""Deterministic corrupted copies of evaluation images: the robustness check of the paper's ImageNet-C claim.

Noisy Student's students were far more robust than their teachers on
ImageNet-C (mCE 45.7 → 28.3). Each trained model is therefore also scored on
corrupted copies of the first evaluation images: five corruptions in the
spirit of ImageNet-C (Hendrycks & Dietterich, 2019), each at three
severities roughly matching its levels 1, 3 and 5 scaled to small images,
made with torchvision's transforms on uint8 batches. The same images get
the same corruption in every run: Gaussian noise draws from a generator
seeded by the corruption, the severity and the batch's first position.

Example::

    python -c "import torch; from noisy_student_workloads.corruptions import corrupt; \
print(corrupt(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), 'pixelate', 2, 0).shape)"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def _noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=generator)


def _blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    size = 2 * int(3 * sigma + 0.5) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def _contrast(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    return TF.adjust_contrast(x, factor)


def _brightness(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    return TF.adjust_brightness(x, factor)


def _pixelate(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, round(h * fraction)), max(1, round(w * fraction))],
                      interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [h, w], interpolation=InterpolationMode.NEAREST)


#: name → (corruption of a float batch in [0, 1], its parameter at severities 1, 2, 3).
CORRUPTIONS: dict[str, tuple[Callable[[torch.Tensor, float, torch.Generator], torch.Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (_noise, (0.08, 0.18, 0.38)),  # ImageNet-C's sigma at levels 1, 3, 5
    "gaussian_blur": (_blur, (0.5, 1.0, 1.5)),  # pixels at 28 px (ImageNet-C: 1, 3, 6 at 224 px)
    "contrast": (_contrast, (0.4, 0.2, 0.05)),  # ImageNet-C's factor at levels 1, 3, 5
    "brightness": (_brightness, (1.5, 2.0, 3.0)),  # multiplies every pixel (saturates bright ones)
    "pixelate": (_pixelate, (0.6, 0.4, 0.25)),  # ImageNet-C's resize factor at levels 1, 3, 5
}
SEVERITIES = 3


def corrupt(x: torch.Tensor, name: str, severity: int, position: int) -> torch.Tensor:
    """A uint8 N×C×H×W batch with corruption ``name`` at ``severity`` (1..3); ``position`` is the batch's
    first image's index in the evaluation set (it seeds the noise, so every run sees the same images)."""
    fn, levels = CORRUPTIONS[name]
    if not 1 <= severity <= len(levels):
        raise ValueError(f"severity {severity} is not in 1..{len(levels)}")
    generator = torch.Generator().manual_seed(hash_seed(name, severity, position))
    out = fn(x.float().div(255), levels[severity - 1], generator)
    return out.clamp(0, 1).mul(255).round().to(torch.uint8)


def hash_seed(name: str, severity: int, position: int) -> int:
    """A seed stable across processes (Python's ``hash`` of a string is salted per process)."""
    return (sum(ord(c) * 31**i for i, c in enumerate(name)) * 1009 + severity * 100_003 + position) % 2**31
