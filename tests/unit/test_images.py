"""Train-time image transforms of the workloads."""

import random

import numpy as np
from PIL import Image

from noisy_student_workloads.images import rand_augment


def test_rand_augment_low_magnitude_never_posterizes_to_zero_bits():
    # At magnitude 0 timm's Posterize asks for 0 bits, which Pillow rejects.
    augment = rand_augment(ops=3, magnitude=0, image_size=28, fill=[73, 73, 73])
    random.seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    for _ in range(200):
        out = augment(img)
        assert out.size == (28, 28) and out.mode == "RGB"
