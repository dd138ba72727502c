"""The train / eval transforms of the workloads.

Images arrive one at a time from :mod:`.pipeline`, decoded to RGB and resized
to the model's ``image_size``; per-image work is (for a noisy student) timm's
RandAugment on the PIL image, per-batch work a random crop; normalisation
happens on the device, per batch, in float.

Transforms, chosen for small images:

* eval (validation, labeling): resize only — no crop, no flip, no noise;
* train: a random crop with ``image_size // 8`` zero padding (translation,
  the classic small-image augmentation), and a horizontal flip of half the
  images only when asked (``hflip``: the official code flips every training
  image with probability 0.5, but a mirror image changes the meaning of
  digits and letters);
* student input noise: timm ``RandAugment`` (``rand-m{M}-n{N}-mstd0.5-mmax{X}``),
  applied before the crop, with a fill colour for rotated or sheared borders
  (the data set's mean pixel, or black for a black background).

Example::

    python -c "from PIL import Image; from noisy_student_workloads.images import rand_augment; \
print(rand_augment(2, 9, 32, [0, 0, 0])(Image.new('RGB', (32, 32))).size)"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×C×S×S (C = 1 or 3) → float N×3×S×S normalised with ``mean``/``std``."""
    x = x.float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch (translation by up to ``padding`` pixels)."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # n×1×h×1
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # n×1×1×w
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of a batch mirrored left-right with probability 0.5."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def rand_augment(ops: int, magnitude: float, image_size: int, fill: Sequence[int],
                 magnitude_max: int = 30) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for RGB PIL images of ``image_size`` pixels, borders filled with ``fill``.

    Each image's magnitude is drawn around ``magnitude`` (std 0.5) and clipped to ``[0, magnitude_max]``
    (timm's ``mmax``; without it timm clips at 10, silently weakening any magnitude above 10).
    """
    from timm.data import rand_augment_transform

    if magnitude > magnitude_max:
        raise ValueError(f"magnitude {magnitude:g} is above magnitude_max {magnitude_max:g}")
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(int(v) for v in fill)}
    transform = rand_augment_transform(f"rand-m{magnitude:g}-n{ops}-mstd0.5-mmax{int(magnitude_max)}", hparams)
    for op in transform.ops:
        if op.name == "Posterize":
            # timm maps levels below 2.5 to 0 bits, which Pillow >= 10 rejects; any magnitude
            # up to about 4 reaches such levels (mstd 0.5) and would crash a training job.
            op.level_fn = _posterize_at_least_one_bit(op.level_fn)
    return transform


def _posterize_at_least_one_bit(level_fn: Callable[..., tuple[int]]) -> Callable[..., tuple[int]]:
    def bits(level: float, hparams: dict[str, Any]) -> tuple[int]:
        return (max(1, level_fn(level, hparams)[0]),)

    return bits


def mean_pixel(images: Sequence[Image.Image]) -> list[int]:
    """The mean RGB pixel (0-255) of some images, the fill colour for RandAugment."""
    if not images:
        return [0, 0, 0]
    m = np.mean([np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0) for im in images], axis=0)
    return [int(round(v)) for v in m.tolist()]
