"""In-memory image sets and the train / eval transforms of the workloads.

Data sets here are small (tens of thousands of 28×28 images), so every stage
decodes its shards once into a uint8 tensor N×C×S×S already resized to the
model's ``image_size``; per-step work is then indexing, a random crop, and
(for a noisy student) timm's RandAugment. Normalisation happens on the
device, per batch, in float.

Transforms, chosen for small images:

* eval (validation, labeling): resize only — no crop, no flip, no noise;
* train: a random crop with ``image_size // 8`` zero padding (translation,
  the classic small-image augmentation), no horizontal flip (it changes the
  meaning of digits and letters);
* student input noise: timm ``RandAugment`` (``rand-m{M}-n{N}-mstd0.5``),
  applied before the crop, with the data set's mean pixel as fill colour so
  rotated or sheared borders look like background.

Example::

    python -c "from noisy_student_workloads.images import load_image_set; \
print(load_image_set('file:///tmp/digits/validation-{000000..000000}.tar', 32).images.shape)"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .shards import load_shards


@dataclass
class ImageSet:
    """Decoded images (uint8 N×C×S×S, C is 1 or 3), their keys and labels (-1 = unlabeled)."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)


def _to_tensor(images: Any, image_size: int) -> torch.Tensor:
    if len(images) == 0:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # N×C×H×W
        if x.shape[1] not in (1, 3):  # RGBA, LA: drop alpha the way PIL's convert does
            x = x[:, :3] if x.shape[1] == 4 else x[:, :1]
    else:  # mixed sizes or modes: normalise each image with PIL first
        arrays = [np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if x.shape[-2:] != (image_size, image_size):
        resized = []
        for chunk in x.split(4096):  # bounded float memory
            y = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            resized.append(y.round_().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(resized)
    return x


def load_image_set(pattern: str | Sequence[str], image_size: int) -> ImageSet:
    """Decode the shards of ``pattern`` once into an :class:`ImageSet` of ``image_size`` pixels."""
    keys, images, labels = load_shards(pattern if isinstance(pattern, str) else list(pattern))
    return ImageSet(list(keys), _to_tensor(images, image_size), torch.from_numpy(np.asarray(labels, dtype=np.int64)))


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


def rand_augment(ops: int, magnitude: float, image_size: int, fill: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A uint8 C×S×S → uint8 3×S×S function applying timm's RandAugment to one image."""
    from timm.data import rand_augment_transform

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(int(v) for v in fill)}
    transform = rand_augment_transform(f"rand-m{magnitude:g}-n{ops}-mstd0.5", hparams)
    for op in transform.ops:
        if op.name == "Posterize":
            # timm maps levels below 2.5 to 0 bits, which Pillow >= 10 rejects; any magnitude
            # up to about 4 reaches such levels (mstd 0.5) and would crash a training job.
            op.level_fn = _posterize_at_least_one_bit(op.level_fn)

    def apply(img: torch.Tensor) -> torch.Tensor:
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB")
        out = np.asarray(transform(pil), dtype=np.uint8)
        return torch.from_numpy(out.copy()).permute(2, 0, 1)

    return apply


def _posterize_at_least_one_bit(level_fn: Callable[..., tuple[int]]) -> Callable[..., tuple[int]]:
    def bits(level: float, hparams: dict[str, Any]) -> tuple[int]:
        return (max(1, level_fn(level, hparams)[0]),)

    return bits


def mean_pixel(images: torch.Tensor) -> list[int]:
    """The data set's mean RGB pixel (0-255), the fill colour for RandAugment."""
    m = images.float().mean(dim=(0, 2, 3))
    if m.numel() == 1:
        m = m.expand(3)
    return [int(round(v)) for v in m.tolist()]
