"""Train-time image transforms of the workloads."""

import random

import numpy as np
import torch
from PIL import Image

from noisy_student_workloads.images import rand_augment, random_flip


def test_rand_augment_low_magnitude_never_posterizes_to_zero_bits():
    # At magnitude 0 timm's Posterize asks for 0 bits, which Pillow rejects.
    augment = rand_augment(ops=3, magnitude=0, image_size=28, fill=[73, 73, 73])
    random.seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    for _ in range(200):
        out = augment(img)
        assert out.size == (28, 28) and out.mode == "RGB"


def test_random_flip_mirrors_about_half_the_images_and_leaves_the_others_as_they_were():
    ramp = torch.arange(8, dtype=torch.uint8).expand(3, 8, 8)  # brighter to the right: a mirror image is told apart
    batch = ramp.expand(1000, 3, 8, 8).clone()
    out = random_flip(batch, torch.Generator().manual_seed(0))
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    unchanged = (out == batch).flatten(1).all(1)
    assert (mirrored ^ unchanged).all()  # each image either mirrored whole or untouched
    assert 400 < int(mirrored.sum()) < 600
